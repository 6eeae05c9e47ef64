"""The online linear probe wired into ``ssl train`` (``trainer.online_probe``).

It must be an observer only: the encoder, optimiser and every random stream end bit-for-bit
where they end without it; it logs an accuracy per epoch, scores the test split at the end,
and survives save -> resume exactly like the rest of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sslcli import api
from sslcli.cli.app import main
from sslcli.runs import checkpoint as ckpt
from tests.helpers import write_flat_folder, write_idx, write_stl10


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=40, n_test=10)


def _overrides(data: Path, out: Path, probe: bool, max_steps: int | None = None) -> dict[str, Any]:
    # 40 images / batch 8 = 5 steps per epoch, 2 epochs.
    return {
        "backbone": {"name": "test_resnet", "drop_path_rate": 0.1},
        "data": {"dataset": str(data), "image_size": 16, "num_workers": 0},
        "trainer": {"epochs": 2, "batch_size": 8, "log_every": 2, "out": str(out),
                    "online_probe": probe, "online_probe_lr": 0.5, "max_steps": max_steps,
                    "knn_k": 5},
    }  # fmt: skip


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == kind]


def test_probe_logs_per_epoch_and_leaves_the_run_untouched(idx_data: Path, tmp_path: Path) -> None:
    plain = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "plain", False))
    probed = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "probe", True))

    a, _ = ckpt.load(plain.run_dir)
    b, _ = ckpt.load(probed.run_dir)
    for group in ("model", "optim", "state"):
        assert a[group].keys() == b[group].keys(), group
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group
    assert plain.final_loss == probed.final_loss and plain.knn_trained == probed.knn_trained
    assert "probe" not in a and set(b["probe"]) >= {"heads.weight", "correct", "seen"}

    epochs = _events(probed.run_dir, "epoch")
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:
        assert 0.0 <= e["probe_top1"] <= 1.0 and e["probe_loss"] > 0
    # Counters are reset at each epoch's end (the checkpoint is written after the reset).
    assert int(b["probe"]["seen"]) == 0
    test_top1 = probed.extra["probe_test_top1"]
    assert 0.0 <= test_top1 <= 1.0 and test_top1 in {k / 10 for k in range(11)}  # 10 images
    assert _events(probed.run_dir, "end")[0]["probe_test_top1"] == test_top1
    assert "probe_top1" not in _events(plain.run_dir, "epoch")[0]


def test_probe_learns_on_fixed_features(idx_data: Path, tmp_path: Path) -> None:
    # With a vanishing lr the encoder stays at its random init, so the probe sees the same
    # representation every epoch; a working probe then improves on chance (1/10) and on its
    # own first epoch.
    o = _overrides(idx_data, tmp_path / "fixed", True)
    o["optim"] = {"lr": 1e-12}
    o["trainer"]["epochs"] = 6
    run = api.train("simclr", overrides=o)
    acc = [e["probe_top1"] for e in _events(run.run_dir, "epoch")]
    assert max(acc[-2:]) > 0.3 and max(acc[-2:]) > acc[0], acc


def test_probe_resumes_bit_exactly(idx_data: Path, tmp_path: Path) -> None:
    full = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "full", True))
    # Stop mid-epoch (step 3 of 5): the probe's running counts must travel in the checkpoint.
    half = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "half", True, 3))
    _, meta = ckpt.load(half.run_dir)
    assert meta["step"] == 3
    resumed = api.train(overrides={"trainer": {"max_steps": None}}, resume=half.run_dir)
    a, _ = ckpt.load(full.run_dir)
    b, _ = ckpt.load(resumed.run_dir)
    for group in ("model", "probe"):
        assert all(torch.equal(a[group][k], b[group][k]) for k in a[group]), group
    strip = [{k: v for k, v in e.items() if k != "time"} for e in _events(full.run_dir, "epoch")]
    again = [{k: v for k, v in e.items() if k != "time"} for e in _events(resumed.run_dir, "epoch")]
    assert strip == again
    assert full.extra == resumed.extra


def test_unlabelled_images_are_left_out_of_the_probe(tmp_path: Path) -> None:
    # STL-10 style: 6 labelled + 10 unlabelled training images, one epoch of batch 16.
    data = write_stl10(tmp_path / "stl", n_train=6, n_unlabelled=10)
    o = _overrides(data, tmp_path / "run", True)
    o["trainer"].update(epochs=1, batch_size=16, eval_knn=False)
    run = api.train("simclr", overrides=o)
    b, _ = ckpt.load(run.run_dir)
    (epoch,) = _events(run.run_dir, "epoch")
    # 6 labelled images seen: the accuracy is a multiple of 1/6.
    assert round(epoch["probe_top1"] * 6, 6) == round(epoch["probe_top1"] * 6)


def test_probe_without_labels_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_flat_folder(tmp_path / "flat", n=8)
    code = main(["train", "simclr", "--data", str(data), "--backbone", "test_resnet",
                 "--image-size", "16", "--epochs", "1", "--batch-size", "4",
                 "--out", str(tmp_path / "run"), "--set", "trainer.online_probe=true",
                 "--set", "data.num_workers=0"])  # fmt: skip
    assert code == 0
    assert "trainer.online_probe:" in capsys.readouterr().err
    (epoch,) = _events(tmp_path / "run", "epoch")
    assert "probe_top1" not in epoch
