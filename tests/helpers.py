"""What several test files share: tiny run settings, writers of miniature data sets and
plugin distributions, fixture runs written without training, the CLI called in-process,
a torchrun-like environment for spawned processes, and the contract's per-method cases.

Test files import from here, never from each other.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import socket
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from sslcli import api, registry
from sslcli.backbones import make_spec
from sslcli.cli.app import main
from sslcli.config import save_json
from sslcli.method import Batch
from sslcli.runs import checkpoint as ckpt
from sslcli.testing import ContractCase

# Small enough for a 2-core CPU: the contract and CLI tests use these sizes.
TINY = {
    "backbone": {"name": "test_resnet"},
    "data": {"image_size": 16},
    "trainer": {"epochs": 1, "batch_size": 8, "max_steps": 2, "eval_knn": False},
}
DIGITS_TRAIN = 1438


# --------------------------------------------------------------------------------------------
# The CLI, in-process
# --------------------------------------------------------------------------------------------


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_lines(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """As :func:`cli`, with stderr as its non-blank lines."""
    code, out, err = cli(argv, capsys)
    return code, out, [line for line in err.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------
# One method, built directly, and a batch for its training step
# --------------------------------------------------------------------------------------------


def build_method(name: str, *sets: str, backbone: str = "test_resnet", size: int = 16) -> Any:
    """The registered method ``name`` with its defaults and ``--set`` values ``sets``, on a
    tiny backbone, its weights drawn after seeding 0."""
    cls, _, cfg = api.resolve_config(name, sets=list(sets))
    torch.manual_seed(0)
    return cls(cfg, make_spec(backbone, size).build())


def two_view_batch(n: int = 8, *, size: int = 16, seed: int = 1) -> Batch:
    """``n`` images as two views of Gaussian noise, indices 0..n-1."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]
    return Batch(views=views, index=torch.arange(n))


# --------------------------------------------------------------------------------------------
# Plugin distributions
# --------------------------------------------------------------------------------------------


def write_plugin_dist(
    root: Path,
    dist_name: str,
    entry_points: dict[str, str],
    modules: dict[str, str],
    version: str = "0.0.1",
) -> Path:
    """A minimal installed distribution (dist-info + modules) under ``root``.

    importlib.metadata finds it through sys.path exactly as it finds pip-installed
    packages, so registry tests exercise the real discovery path.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n"
    )
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[sslcli.methods]\n{eps}\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    return root


# --------------------------------------------------------------------------------------------
# Miniature data sets, one writer per detected format
# --------------------------------------------------------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_cifar(root: Path, variant: str = "cifar10", n_train: int = 16, n_test: int = 8) -> Path:
    """CIFAR-10 batches (two training batches) or CIFAR-100 pickles under ``root``."""
    rng = _rng(0)
    if variant == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        half = n_train // 2
        for name, n in (("data_batch_1", half), ("data_batch_2", n_train - half),
                        ("test_batch", n_test)):  # fmt: skip
            batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     "labels": [k % 10 for k in range(n)]}  # fmt: skip
            (d / name).write_bytes(pickle.dumps(batch))
        (d / "batches.meta").write_bytes(
            pickle.dumps({"label_names": [f"c{k}" for k in range(10)]})
        )
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for name, n in (("train", n_train), ("test", n_test)):
            batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                     "fine_labels": [k % 100 for k in range(n)],
                     "coarse_labels": [k % 20 for k in range(n)]}  # fmt: skip
            (d / name).write_bytes(pickle.dumps(batch))
    return root


def write_stl10(root: Path, n_train: int = 6, n_unlabelled: int = 10, n_test: int = 4) -> Path:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    rng = _rng(1)
    for stem, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabelled)):
        (d / f"{stem}_X.bin").write_bytes(
            rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tobytes()
        )
        if stem != "unlabeled":  # STL-10 labels are 1..10
            (d / f"{stem}_y.bin").write_bytes(bytes([1 + k % 10 for k in range(n)]))
    return root


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_idx(root: Path, n_train: int = 40, n_test: int = 10, gz: bool = False) -> Path:
    """MNIST-style IDX files in ``root/MNIST/raw`` (as torchvision lays them out)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = _rng(2)
    ext = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        files = {
            f"{prefix}-images-idx3-ubyte{ext}": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            f"{prefix}-labels-idx1-ubyte{ext}": np.arange(n) % 10,
        }
        for name, arr in files.items():
            data = _idx_bytes(arr)
            (raw / name).write_bytes(gzip.compress(data) if gz else data)
    return root


def write_image_tree(root: Path, per_class: int = 4, classes: int = 2, split: bool = True) -> Path:
    """ImageFolder classes (under train/ and val/ when ``split``), PNG and JPEG mixed."""
    rng = _rng(3)
    parts = {"train": per_class, "val": 2} if split else {"": per_class}
    for part, count in parts.items():
        for c in range(classes):
            d = root / part / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                h, w = int(rng.integers(12, 30)), int(rng.integers(12, 30))
                img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                img.save(d / f"img{k}.{'png' if k % 2 else 'jpg'}")
    return root


def write_flat_folder(root: Path, n: int = 8) -> Path:
    rng = _rng(4)
    (root / "sub").mkdir(parents=True)
    for k in range(n):
        img = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
        img.save(root / ("sub" if k % 3 == 0 else "") / f"im{k}.png")
    return root


def write_coloured_digits(root: Path) -> Path:
    """digits as an ImageFolder tree, each image with its own random ink and paper colour.

    The embedded digits are grey, so their ab (CbCr) channels are constant and CMC's
    chroma view would carry nothing. Random colours make both views carry the digit's
    shape, and make colour a nuisance that the raw pixels (and a random network) cluster
    by, which the cross-view objective has to see through.
    """
    from sklearn.datasets import load_digits

    from sslcli.data.datasets import digits_split_indices

    d = load_digits()
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for i in digits_split_indices(split):
            while True:
                ink, paper = rng.rand(3), rng.rand(3)
                if np.linalg.norm(ink - paper) > 0.6:
                    break
            t = (d.images[i] / 16.0)[..., None]
            rgb = np.clip(np.round(255 * (t * ink + (1 - t) * paper)), 0, 255).astype(np.uint8)
            folder = root / split / str(d.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(folder / f"{i}.png")
    return root


# --------------------------------------------------------------------------------------------
# Fixture runs, written directly (no training): config.json, metrics.jsonl, a checkpoint
# --------------------------------------------------------------------------------------------


def make_run(
    out: Path,
    method: str = "simclr",
    backbone: str = "test_resnet",
    image_size: int = 16,
    small_stem: bool | None = None,
    step: int = 2,
    seed: int = 0,
    sets: list[str] | None = None,
    state_prefix: str = "",
) -> Path:
    """A run directory as the trainer leaves it, with non-trivial weights and BN statistics.

    ``state_prefix`` mimics torch.compile's ``backbone._orig_mod.`` keys in the checkpoint.
    """
    from sslcli.engine.resume import CHECKPOINT_FORMAT

    overrides: dict[str, Any] = {
        "backbone": {"name": backbone, "small_stem": small_stem},
        "data": {"image_size": image_size},
        "trainer": {"epochs": 1, "batch_size": 16, "eval_knn": False, "out": str(out)},
    }
    method_cls, run, mcfg = api.resolve_config(method, overrides=overrides, sets=sets or [])
    b = run.backbone
    spec = make_spec(
        b.name, run.data.image_size, b.small_stem, b.drop_path_rate, b.kwargs, method=method_cls
    )
    torch.manual_seed(seed)
    m = method_cls(mcfg, spec.build(), dataset_size=DIGITS_TRAIN)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g) * 0.05
                t.add_(noise.abs() if "running_var" in name else noise)
    out.mkdir(parents=True, exist_ok=True)
    save_json(run, out / "config.json")
    state = m.state_dict()
    if state_prefix:
        state = {
            (k.replace("backbone.", state_prefix, 1) if k.startswith("backbone.") else k): v
            for k, v in state.items()
        }
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "epoch": 0,
        "dataset_size": DIGITS_TRAIN,
        "config": run.to_json_dict(),
        "backbone": {
            "timm_name": spec.timm_name,
            "alias": spec.alias,
            "image_size": spec.image_size,
            "small_stem": spec.small_stem,
            "kwargs": spec.kwargs,
        },  # fmt: skip
    }
    ckpt.save(out / "checkpoints", step, {"model": state}, meta, keep=2)
    t0 = time.time()
    recs = [
        {"event": "start", "method": method, "backbone": backbone, "dataset": "digits",
         "knn_random": 0.5, "time": t0},
        {"step": 1, "epoch": 0, "lr": 0.1, "loss": 5.0, "images_per_s": 100.0},
        {"step": step, "epoch": 0, "lr": 0.1, "loss": 4.0, "images_per_s": 110.0},
        {"event": "end", "step": step, "loss": 4.0, "knn_top1": 0.6, "knn_random": 0.5,
         "images_per_s": 105.0, "wall_s": 3.0, "peak_mem_mb": 900.0, "time": t0 + 3},
    ]  # fmt: skip
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return out


def write_fake_export(d: Path, **changes: Any) -> Path:
    """An export directory as ``ssl export`` writes it (timm's ``test_resnet`` at random
    init, safetensors and config.json), with ``changes`` over the top level of its config."""
    import timm
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    cfg: dict[str, Any] = {
        "architecture": "test_resnet", "num_classes": 0, "model_args": {},
        "pretrained_cfg": {"input_size": [3, 16, 16], "mean": [0.5] * 3, "std": [0.5] * 3},
        "sslcli": {"format": 1, "method": "simclr", "step": 2},
    }  # fmt: skip
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


# --------------------------------------------------------------------------------------------
# Processes as torchrun starts them (gloo, loopback only)
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_env(rank: int, world: int, port: int) -> None:
    """What torchrun puts in each process's environment."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)


def spawn(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """``fn(rank, world, port, *args)`` in ``world`` processes."""
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


# --------------------------------------------------------------------------------------------
# The contract's case of every registered method
# --------------------------------------------------------------------------------------------

METHODS = sorted(registry.find())
VIT_AWARE = {"moco-v3", "dino"}
# Methods whose heavy official defaults are shrunk so one CPU step stays fast; the code path
# is the same, only widths/queue lengths differ.
SMALL: dict[str, list[str]] = {
    "moco-v1": ["method.queue_size=64"],
    "moco-v2": ["method.queue_size=64"],
    "instdisc": ["method.nce_k=32"],
    "cmc": ["method.nce_k=32"],
    "dino": ["method.out_dim=512"],
    "swav": ["method.num_prototypes=30", "method.queue_length=0"],
}
# Buffers a first step leaves as they are, by design: CPC's causal masks are constants,
# SwAV's collapse counter only moves while the codes are collapsed.
STATIC: dict[str, tuple[str, ...]] = {
    "cpc": ("context.*.masked.mask",),
    "swav": ("collapse_run",),
}
# Methods that draw random numbers inside their step, so two processes cannot reproduce one
# process's draws: NCE noise rows (InstDisc, CMC), the shuffle of shuffling BN (MoCo v1/v2),
# CPC's per-patch augmentation.
NOT_DISTRIBUTED_EQUAL: set[str] = {"instdisc", "cmc", "moco-v1", "moco-v2", "cpc"}
# SwAV's Sinkhorn (exp of scores / 0.05) amplifies float32 rounding: over the kit's three
# steps one process in float32 ends 4.5e-5 from the same run in float64 (largest update
# 8.3e-4), two float32 processes 7e-5 from one; in float64 two processes equal one to 2e-16.
DIST_UPDATE_SHARE: dict[str, float] = {"swav": 0.25}


def _sets(name: str) -> tuple[str, ...]:
    fields = registry.load(name).Config.model_fields
    return tuple(s for s in SMALL.get(name, []) if s.split(".")[1].split("=")[0] in fields)


def contract_case(name: str) -> ContractCase:
    """The registered method ``name``, made small enough for a CPU step."""
    return ContractCase(
        name,
        sets=_sets(name),
        backbones=("test_resnet", "test_vit") if name in VIT_AWARE else ("test_resnet",),
        static_buffers=STATIC.get(name, ()),
        distributed=name not in NOT_DISTRIBUTED_EQUAL,
        dist_update_share=DIST_UPDATE_SHARE.get(name, 2e-2),
    )
