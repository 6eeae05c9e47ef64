"""Every detected data format, written in miniature, trains for a couple of steps.

Also: the in-memory fast path (``get_batch``, no workers), kNN on the labelled training
rows only, a corrupt image met during a real run (skipped and warned) and too many of them
(one line, exit code 2).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sslcli import api
from sslcli.cli.app import main
from sslcli.data.badfiles import UnreadableImageWarning
from sslcli.data.datasets import open_dataset
from sslcli.engine import knn_monitor
from sslcli.engine.trainer import Trainer
from tests.helpers import (
    write_cifar,
    write_flat_folder,
    write_idx,
    write_image_tree,
    write_stl10,
)


def truncated_png(path: Path, seed: int = 9) -> None:
    """A PNG whose header is fine (it passes the open-time probe) but whose body is cut."""
    buf = Path(str(path) + ".full")
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    raw = buf.read_bytes()
    buf.unlink()
    path.write_bytes(raw[: len(raw) // 2])


def tiny_overrides(
    data: str, out: Path, data_extra: dict[str, Any] | None = None, **trainer: Any
) -> dict[str, Any]:
    return {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": data, "image_size": 16, **(data_extra or {})},
        "trainer": {"epochs": 1, "batch_size": 4, "max_steps": 2, "eval_knn": False,
                    "log_every": 1, "out": str(out), **trainer},
    }  # fmt: skip


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r and "event" not in r]


# --------------------------------------------------------------------------------------------
# Every format trains
# --------------------------------------------------------------------------------------------

FORMATS = {
    "cifar10": lambda p: write_cifar(p, "cifar10"),
    "cifar100": lambda p: write_cifar(p, "cifar100"),
    "stl10": write_stl10,
    "idx": write_idx,
    "idx-gz": lambda p: write_idx(p, gz=True),
    "imagefolder": write_image_tree,
    "imagefolder-nosplit": lambda p: write_image_tree(p, split=False),
    "folder": write_flat_folder,
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_trains_two_steps(fmt: str, tmp_path: Path) -> None:
    data = FORMATS[fmt](tmp_path / "data")
    # Worker processes are exercised once (imagefolder); elsewhere 0 keeps the test fast.
    workers = 2 if fmt == "imagefolder" else 0
    o = tiny_overrides(str(data), tmp_path / "run", {"num_workers": workers})
    res = api.train("simclr", overrides=o)
    assert res.steps == 2
    losses = _losses(res.run_dir)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (res.run_dir / "checkpoints" / "last.safetensors").is_file()


def test_in_memory_fast_path_and_default_workers(tmp_path: Path) -> None:
    data = str(write_cifar(tmp_path / "c", "cifar10"))
    ds = open_dataset(data, "train", 16)
    assert ds.in_memory and callable(getattr(ds, "get_batch", None))
    idx = torch.tensor([3, 0, 7, 3])
    x, y, i = ds.get_batch(idx)
    items = [ds[int(k)] for k in idx]
    assert torch.equal(x, torch.stack([it[0] for it in items]))
    assert y.tolist() == [it[1] for it in items] and i.tolist() == idx.tolist()
    # grey arrays (IDX) come out as three identical channels, like __getitem__
    grey = open_dataset(str(write_idx(tmp_path / "m")), "train", 16)
    gx, _, _ = grey.get_batch(torch.tensor([1, 2]))
    assert gx.shape == (2, 3, 16, 16) and torch.equal(gx[0], grey[1][0])
    # file datasets have no fast path: hasattr/getattr say so
    files = open_dataset(str(write_image_tree(tmp_path / "f")), "train", 16)
    assert getattr(files, "get_batch", None) is None and not files.in_memory

    method_cls, run, mcfg = api.resolve_config(
        "simclr", overrides=tiny_overrides(data, tmp_path / "r")
    )
    tr = Trainer(run, method_cls, mcfg)
    assert tr.batches.num_workers == 0  # in-memory data: no worker processes by default
    images, labels, index = next(tr.batches.epoch(0, 0))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images, ds.get_batch(index)[0])

    _, run_f, _ = api.resolve_config(
        "simclr", overrides=tiny_overrides(str(tmp_path / "f"), tmp_path / "r2")
    )
    tr_f = Trainer(run_f, method_cls, mcfg)
    assert tr_f.batches.num_workers >= 1  # decoding files pays off in workers


def test_knn_uses_only_labelled_training_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = str(write_stl10(tmp_path / "s", n_train=6, n_unlabelled=10, n_test=4))
    seen: list[int] = []
    real = knn_monitor.extract

    def spy(embed: Any, dataset: Any, **kw: Any) -> Any:
        seen.append(len(dataset))
        feats, labels = real(embed, dataset, **kw)
        assert bool((labels >= 0).all()), "an unlabelled image reached the kNN reference set"
        return feats, labels

    monkeypatch.setattr(knn_monitor, "extract", spy)
    res = api.train(
        "simclr", overrides=tiny_overrides(data, tmp_path / "run", eval_knn=True, knn_k=3)
    )
    assert res.knn_random is not None and res.knn_trained is not None
    # (train, test) before and after training: 6 labelled training rows, never 16
    assert seen == [6, 4, 6, 4]


def test_corrupt_file_during_run_is_skipped_and_warned(tmp_path: Path) -> None:
    root = write_image_tree(tmp_path / "d", per_class=4)
    truncated_png(root / "train" / "class0" / "img1.png")  # 1 of 8 training files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        o = tiny_overrides(str(root), tmp_path / "run", {"num_workers": 0, "max_bad_fraction": 0.2})
        res = api.train("simclr", overrides=o)
    assert res.steps == 2  # 2 steps x 4 = every training image, the broken one included
    bad = [w for w in caught if issubclass(w.category, UnreadableImageWarning)]
    assert len(bad) == 1 and "img1.png" in str(bad[0].message)


def test_too_many_corrupt_files_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = write_image_tree(tmp_path / "d", per_class=4)
    truncated_png(root / "train" / "class1" / "img0.png")
    args = ["train", "simclr", "--data", str(root), "--backbone", "test_resnet",
            "--image-size", "16", "--batch-size", "4", "--epochs", "1", "--out",
            str(tmp_path / "run"), "--set", "trainer.eval_knn=false",
            "--set", "data.max_bad_fraction=0.05"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        code = main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert len(errors) == 1 and errors[0].startswith("ssl: error: ")
    assert "unreadable, more than max_bad_fraction=0.05" in errors[0]
