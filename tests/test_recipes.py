"""Every recipe file in ``examples/recipes/`` is rehearsed on CPU.

CI, every file (parametrised over the directory listing, so a new file is included):
- it parses (``api.read_recipe``) and resolves against its method as ``ssl train --config``
  resolves it, to the values listed for it in ``STATES`` (and ``SYNC_BN``) below;
- the command its header states (``ssl train -c FILE -d DATA``, alone or under
  ``torchrun``) plans with ``--dry-run`` for the header's GPU count, at full size, and the
  per-GPU batch is the one the header states.
Also each method's own recipe (bare ``ssl train METHOD``) where a value is stated
(``BUILT_IN``).

Rehearsal (two steps, one resumed step, an export that reloads in timm) with the
recipe's own method, method options, views, optimiser, schedule and backbone family, on
a generated folder of variable-size, non-square JPEGs. Scaled down, and nothing else:
- batch: ``trainer.batch_size`` 8 (the learning rate follows the recipe's own scaling
  rule);
- image size: views of 224-256 px become 64 px, and every other crop size of the method
  (``*crops_size``: DINO's and SwAV's local crops) by the same factor (for ViTs rounded to
  the patch size); 32-px CIFAR recipes keep 32 px. The recipe's stem is kept
  (``backbone.small_stem`` as the recipe has it, ImageNet stem otherwise);
- depth: the same backbone with one residual block per stage (ResNets: ``layers`` 1,1,1,1)
  or two transformer blocks (ViTs: ``depth`` 2) — same block type, widths, heads, patch
  size and constructor arguments as the recipe's.
The full set takes about 3 CPU-minutes (11 minutes of wall time on a shared 2-core CPU;
CPC's 7x7 patch grid alone 3.5), so it is ``slow``; CI rehearses a representative subset
(a ViT with a frozen patch projection, multi-crop with a queue, a memory bank, a
small-stem CIFAR recipe: about 50 s) and plans every file's header command at full size
(about 60 s).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import tomllib
import torch
from PIL import Image

import sslcli
from sslcli import api
from sslcli.backbones import resolve_name
from sslcli.cli.app import main
from sslcli.runs.targets import load_target

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"
FILES = sorted(p for p in RECIPES.iterdir() if p.suffix in (".toml", ".yaml", ".yml", ".json"))
CI_SUBSET = {
    "moco-v3-vit-s-imagenet.toml",
    "swav-imagenet-bs256.toml",
    "instdisc-imagenet.toml",
    "simclr-cifar.toml",
}
SMALL = 64
BATCH = 8


def test_the_listing_is_what_is_parametrised() -> None:
    assert len(FILES) >= 20 and CI_SUBSET <= {p.name for p in FILES}


# -- the header's command, planned at full size ---------------------------------------------------
def header_layout(text: str) -> tuple[int, int, list[str]]:
    """(GPUs, images per GPU, ssl arguments) from a recipe header."""
    head = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    m = re.search(r"Made for (\d+) GPUs? x (\d+) images", head)
    assert m, "the header does not state the GPU count and per-GPU batch it was made for"
    gpus, per_gpu = int(m.group(1)), int(m.group(2))
    cmd = re.search(r"^#\s+(?:Run: )?((?:torchrun|ssl) .*)$", head, re.M)
    assert cmd, "the header does not state the command that runs it"
    toks = shlex.split(cmd.group(1))
    if toks[0] == "torchrun":
        nproc = int(next(t.split("=")[1] for t in toks if t.startswith("--nproc_per_node=")))
        nodes = next((int(t.split("=")[1]) for t in toks if t.startswith("--nnodes=")), 1)
        assert nproc * nodes == gpus, "the torchrun command starts another number of processes"
        toks = toks[toks.index("-m") + 2 :]
    else:
        assert gpus == 1, "a multi-GPU recipe must state its torchrun command"
        toks = toks[1:]
    return gpus, per_gpu, toks


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_header_command_plans_at_full_size(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    gpus, per_gpu, args = header_layout(path.read_text())
    assert f"examples/recipes/{path.name}" in args
    monkeypatch.chdir(ROOT)  # the header's paths are relative to the repository
    batch = _recipe(path)["trainer"]["batch_size"]
    # The data is not here: plan for ImageNet-1k's size, or CIFAR-10's 50,000 images.
    images = 50_000 if "cifar" in " ".join(args) else 1_281_167
    code = main([*args, "--dry-run", "--json", "--no-memory", "--processes", str(gpus),
                 "--images", str(images), "--out", str(tmp_path / "never")])  # fmt: skip
    cap = capsys.readouterr()
    assert code == 0, cap.err
    plan = json.loads(cap.out)
    assert plan["trainer"]["global_batch"] == batch == gpus * per_gpu
    assert plan["trainer"]["batch_per_process"] == per_gpu
    assert plan["method"]["name"] == _recipe(path)["method"]["name"]
    assert not (tmp_path / "never").exists()


# -- what each recipe resolves to --------------------------------------------------------------
# What a recipe states, as the resolved run reads it: dotted paths into the run config, where
# ``method.name`` is the method and ``method.KEY`` the method's option KEY.
STATES: dict[str, dict[str, Any]] = {
    "byol-imagenet.toml": {"trainer.batch_size": 4096, "trainer.epochs": 1000,
                           "data.image_size": 224, "backbone.name": "resnet50"},
    "byol-cifar.toml": {"data.image_size": 32, "method.blur_p": (0.0, 0.0)},
    # grid 7 on 256 px: 64-px patches at stride 32 (test_cpc.py)
    "cpc-imagenet.toml": {"backbone.name": "resnet50", "data.image_size": 256,
                          "trainer.batch_size": 128, "method.grid_size": 7},
    # demo_seen.py after the authors' "fix lr bug": lr x0.1 from epoch 120, x0.05 from 160,
    # x0.01 from 200 (each relative to the base lr), 301 epochs. The old code took only the
    # first branch of an if/elif chain (x0.1 from 120).
    "invaspread-cifar.toml": {"schedule.kind": "step", "schedule.milestones": [120, 160, 200],
                              "schedule.milestone_factors": [0.1, 0.05, 0.01],
                              "trainer.epochs": 301},
    "moco-v1-imagenet.toml": {"schedule.milestones": [120, 160], "trainer.epochs": 200,
                              "method.temperature": 0.07, "trainer.batch_size": 256},
    "moco-v2-cifar.toml": {"method.queue_size": 4096, "method.momentum": 0.99,
                           "method.temperature": 0.1, "method.head": "linear", "optim.lr": 0.06,
                           "optim.weight_decay": 5e-4, "trainer.batch_size": 512,
                           "method.bn_group_size": 64},
    # The official ViT-S has 12 heads (timm's 6); 40 warm-up epochs stated in the file.
    "moco-v3-vit-s-imagenet.toml": {"backbone.name": "vit-s",
                                    "backbone.kwargs": {"num_heads": 12}, "optim.name": "adamw",
                                    "trainer.epochs": 300, "method.temperature": 0.2,
                                    "schedule.warmup_epochs": 40},
    "moco-v3-resnet50-imagenet.toml": {"optim.name": "lars", "optim.lr": 0.6,
                                       "optim.weight_decay": 1e-6, "schedule.warmup_epochs": 10,
                                       "method.temperature": 1.0, "method.crop_min_scale": 0.2,
                                       "trainer.epochs": 100},
    "moco-v3-cifar.toml": {"data.image_size": 32, "method.blur_p": (0.0, 0.0)},
    "simclr-v2-cifar.toml": {"method.temperature": 0.5, "method.color_strength": 0.5,
                             "method.blur_p": 0.0, "optim.lr_scaling": "linear",
                             "optim.weight_decay": 1e-4},
    "simclr-v2-imagenet.toml": {"trainer.batch_size": 4096, "optim.lr": 0.075},
    "simsiam-imagenet.toml": {"trainer.batch_size": 512, "trainer.epochs": 100},
    "simsiam-cifar.toml": {"data.image_size": 32, "method.num_proj_layers": 2,
                           "method.blur_p": 0.0},
}  # fmt: skip
# Official codes that synchronise BatchNorm statistics over all processes: MoCo v3 and
# SimSiam (convert_sync_batchnorm in main_moco.py / main_simsiam.py), BYOL and SimCLR
# (cross-replica / global BN on TPU), SwAV (SyncBN; apex groups of 8 GPUs for the large
# batches), DINO on a ResNet (SyncBN whenever the network has BatchNorm). MoCo v1/v2 use
# shuffle-BN instead (per-GPU statistics on a shuffled key batch), on purpose.
SYNC_BN = {
    "byol-imagenet.toml",
    "dino-resnet50-imagenet.toml",
    "moco-v3-resnet50-imagenet.toml",
    "moco-v3-vit-s-imagenet.toml",
    "simclr-imagenet.toml",
    "simclr-v2-imagenet.toml",
    "simsiam-imagenet.toml",
    "swav-imagenet-bs256.toml",
    "swav-imagenet.toml",
}
PER_PROCESS_BN = {"moco-v1-imagenet.toml", "moco-v2-imagenet.toml"}
# What bare ``ssl train METHOD`` (the method's own recipe) resolves to: (id, method,
# overrides, states).
BUILT_IN: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("byol", "byol", {}, {"optim.name": "lars", "optim.lr": 0.2, "optim.weight_decay": 1.5e-6,
                          "optim.exclude_norm_bias": True, "schedule.kind": "cosine",
                          "method.base_momentum": 0.996}),
    ("cpc", "cpc", {}, {"optim.name": "adamw", "optim.lr": 2e-4, "optim.weight_decay": 0.0,
                        "schedule.kind": "constant", "trainer.batch_size": 8,
                        "method.directions": ["top-down", "bottom-up", "left-right",
                                              "right-left"]}),
    # the recipe's CPU batch yields to the user's
    ("cpc-batch-64", "cpc", {"trainer": {"batch_size": 64}}, {"trainer.batch_size": 64}),
    # The class recipe's warm-up for ViTs is the built-in default, not a stated value.
    ("moco-v3-vit-s", "moco-v3", {"backbone": {"name": "vit-s"}},
     {"optim.name": "adamw", "optim.lr": 1.5e-4, "optim.weight_decay": 0.1,
      "optim.lr_scaling": "linear", "optim.exclude_norm_bias": False,
      "schedule.warmup_epochs": None, "schedule.kind": "cosine", "method.temperature": None,
      "method.momentum": 0.99, "method.momentum_cosine": True}),
    # ResNets (the default resnet18 too) get the official ResNet-50 optimiser.
    ("moco-v3", "moco-v3", {}, {"optim.name": "lars", "optim.lr": 0.6,
                                "optim.weight_decay": 1e-6, "optim.exclude_norm_bias": True}),
    ("simsiam", "simsiam", {}, {"optim.name": "sgd", "optim.lr": 0.05,
                                "optim.weight_decay": 1e-4, "optim.momentum": 0.9,
                                "optim.exclude_norm_bias": False, "schedule.kind": "cosine",
                                "schedule.warmup_epochs": None, "method.fix_pred_lr": True,
                                "method.proj_dim": 2048, "method.pred_hidden_dim": 512}),
]  # fmt: skip


def resolved(run: Any, mcfg: Any, key: str) -> Any:
    """The value at a dotted path of the resolved run (``method.*``: the method's options)."""
    section, _, rest = key.partition(".")
    if section == "method":
        return run.method if rest == "name" else getattr(mcfg, rest)
    value = run
    for part in key.split("."):
        value = getattr(value, part)
    return value


def assert_states(run: Any, mcfg: Any, states: dict[str, Any]) -> None:
    for key, want in states.items():
        got = resolved(run, mcfg, key)
        if isinstance(want, bool) or want is None:
            assert got is want, f"{key}: {got!r}, not {want!r}"
        else:
            assert got == want, f"{key}: {got!r}, not {want!r}"


def test_every_stated_recipe_is_a_file() -> None:
    names = {p.name for p in FILES}
    assert set(STATES) | SYNC_BN | PER_PROCESS_BN <= names


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_recipe_resolves_to_what_it_states(path: Path) -> None:
    """Each file parses (``api.read_recipe``) and resolves against its method as
    ``ssl train --config FILE`` resolves it; the values stated above are what the run gets."""
    layer = api.read_recipe(path)
    method_cls, run, mcfg = api.resolve_config(config=path)
    assert run.method == layer["method"]["name"] == method_cls.name
    states = dict(STATES.get(path.name, {}))
    if path.name in SYNC_BN | PER_PROCESS_BN:
        states["trainer.sync_bn"] = path.name in SYNC_BN
    assert_states(run, mcfg, states)


@pytest.mark.parametrize(
    ("method", "overrides", "states"),
    [pytest.param(*row[1:], id=row[0]) for row in BUILT_IN],
)
def test_built_in_recipe_resolves_to_what_it_states(
    method: str, overrides: dict[str, Any], states: dict[str, Any]
) -> None:
    _, run, mcfg = api.resolve_config(method, overrides=overrides)
    assert run.method == method
    assert_states(run, mcfg, states)


# -- the rehearsal ---------------------------------------------------------------------------
def _recipe(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(
        path.read_text()
    )


def write_jpeg_folder(root: Path, n: int = 24) -> Path:
    """A flat folder of JPEGs of varied, non-square sizes (landscape and portrait)."""
    rng = np.random.default_rng(12)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        w, h = int(rng.integers(70, 140)), int(rng.integers(50, 110))
        if k % 3 == 0:
            w, h = h, w
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"img{k:03d}.jpg", quality=90)
    return root


def shrunk_overrides(recipe: dict[str, Any], data: str, out: Path) -> dict[str, Any]:
    """Batch, image size (and crop sizes with it) and depth scaled down; see the module."""
    size = int(recipe.get("data", {}).get("image_size", 16))
    bb = dict(recipe.get("backbone", {}))
    name = bb.get("name", "resnet18")
    kwargs = dict(bb.get("kwargs", {}))
    with torch.device("meta"):
        probe = timm.create_model(resolve_name(name), num_classes=0, **kwargs)
    vit = hasattr(probe, "blocks")
    patch = int(probe.patch_embed.patch_size[0]) if vit else 1
    new_size = size if size <= 64 else SMALL
    factor = new_size / size
    if vit:
        kwargs["depth"] = 2
        # The recipe's head count, also where it is the timm model's own default.
        kwargs.setdefault("num_heads", int(probe.blocks[0].attn.num_heads))
    elif all(hasattr(probe, f"layer{i}") for i in range(1, 5)):
        kwargs["layers"] = [1, 1, 1, 1]
    method: dict[str, Any] = {}
    for k, v in recipe.get("method", {}).items():
        if re.search(r"crops?_size$", k) and isinstance(v, int) and factor != 1:
            s = max(1, round(v * factor))
            method[k] = max(patch, round(s / patch) * patch) if vit else s
    return {
        "data": {"dataset": data, "image_size": new_size, "num_workers": 0},
        "backbone": {"kwargs": kwargs, "small_stem": bool(bb.get("small_stem", False))},
        "method": method,
        "trainer": {"batch_size": BATCH, "max_steps": 2, "eval_knn": False, "log_every": 1,
                    "out": str(out), "device": "cpu"},
    }  # fmt: skip


def rehearse(path: Path, tmp_path: Path) -> None:
    recipe = _recipe(path)
    data = write_jpeg_folder(tmp_path / "jpegs")
    run_dir = tmp_path / "run"
    over = shrunk_overrides(recipe, f"folder:{data}", run_dir)
    r = api.train(config=path, overrides=over)
    assert r.steps == 2 and r.final_loss is not None and np.isfinite(r.final_loss)
    saved = json.loads((run_dir / "config.json").read_text())
    # The recipe's own method, options, optimiser and schedule are what ran.
    assert saved["method"]["name"] == recipe["method"]["name"]
    for section in ("optim", "schedule"):
        for k, v in recipe.get(section, {}).items():
            got = saved[section][k]
            assert got == (list(v) if isinstance(v, tuple) else v), f"{section}.{k}"
    for k, v in recipe["method"].items():
        if k != "name" and k not in over["method"]:
            assert saved["method"][k] == v, f"method.{k}"
    # One more step, resumed.
    r2 = api.train(resume=run_dir, overrides={"trainer": {"max_steps": 3}})
    assert r2.steps == 3
    # The export reloads in timm and gives the run's features.
    out = tmp_path / "export"
    sslcli.export(run_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    small_stem = bool(cfg.get("sslcli", {}).get("small_stem"))
    # Plain timm where the architecture is timm's own; the small-image stem needs the
    # documented four lines, which sslcli.load_timm runs (it needs only timm).
    model = (
        sslcli.load_timm(out)
        if small_stem
        else timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0)
    )
    model.eval()
    t = load_target(run_dir)
    enc = t.candidates[t.default_which].eval()
    chans = int(timm.data.resolve_data_config({}, model=model)["input_size"][0])
    x = torch.randn(2, chans, over["data"]["image_size"], over["data"]["image_size"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), enc(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=() if p.name in CI_SUBSET else pytest.mark.slow) for p in FILES],
    ids=[p.name for p in FILES],
)
def test_recipe_rehearsal(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rehearse(path, tmp_path)
