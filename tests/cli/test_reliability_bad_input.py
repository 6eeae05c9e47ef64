"""Reliability, promise 3: bad input is one line and exit 2, never a traceback, and the
line names the real problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sslcli import api
from sslcli.cli.app import main
from sslcli.errors import ConfigError, DataError
from tests.helpers import TINY, write_fake_export


def _train_args(out: Path, *extra: str) -> list[str]:
    return ["train", "simclr", "--backbone", "test_resnet", "--epochs", "1",
            "--batch-size", "8", "--image-size", "16", "--set", "trainer.eval_knn=false",
            "--set", "trainer.max_steps=1", "--out", str(out), *extra]  # fmt: skip


def _one_line(capsys: Any) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("ssl: error:")]
    assert len(err) == 1, err
    return err[0]


def test_idx_with_0x0_images(tmp_path: Path) -> None:
    from sslcli.data.datasets import open_dataset

    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + struct.pack(">III", 5, 0, 0)
    )
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        bytes([0, 0, 8, 1]) + struct.pack(">I", 5) + bytes(5)
    )
    with pytest.raises(DataError, match="0x0"):
        open_dataset(f"idx:{tmp_path}", "train", 16)


@pytest.mark.parametrize("where", ["file", "below-a-file"])
def test_out_that_cannot_be_a_directory(tmp_path: Path, capsys: Any, where: str) -> None:
    f = tmp_path / "a-file"
    f.write_text("x")
    out = f if where == "file" else f / "run"
    assert main(_train_args(out)) == 2
    assert str(out) in _one_line(capsys)


def test_a_seed_beyond_any_generator(tmp_path: Path, capsys: Any) -> None:
    assert main(_train_args(tmp_path / "r", "--seed", "99999999999999999999999")) == 2
    assert "seed" in _one_line(capsys)


def test_bad_backbone_kwargs(tmp_path: Path, capsys: Any) -> None:
    assert main(_train_args(tmp_path / "r", "--set", "backbone.kwargs.global_pool=xx")) == 2
    assert "global_pool" in _one_line(capsys)


def _fake_run(d: Path, method: str = "simclr") -> Path:
    _, run, _ = api.resolve_config(method, overrides=TINY)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(run.to_json_dict()))
    (d / "checkpoints").mkdir()
    return d


def test_compare_skips_damaged_metrics_lines(tmp_path: Path, capsys: Any) -> None:
    run = _fake_run(tmp_path / "run")
    good = {"event": "start", "method": "simclr", "time": 0.0}
    (run / "metrics.jsonl").write_bytes(
        json.dumps(good).encode() + b"\n\xff\xfe{broken\n" + b'{"step": 1, "loss": 2.5}\n'
    )
    assert main(["compare", str(run), "--format", "json"]) == 0
    assert "simclr" in capsys.readouterr().out


def test_malformed_export_config(tmp_path: Path, capsys: Any) -> None:
    exp = write_fake_export(tmp_path / "exp", pretrained_cfg={"input_size": "abc"})
    assert main(["eval", "knn", str(exp)]) == 2
    assert "input_size" in _one_line(capsys)


def test_bad_safetensors_header_in_export(tmp_path: Path, capsys: Any) -> None:
    exp = write_fake_export(tmp_path / "exp")
    (exp / "model.safetensors").write_bytes(b"\xff" * 8 + b"not a header")
    assert main(["eval", "knn", str(exp)]) == 2
    assert str(exp) in _one_line(capsys)


def test_resuming_with_another_method_names_the_trained_one(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", "simclr")
    with pytest.raises(ConfigError) as e:
        api.resolve_config("byol", resume=run)
    assert len(e.value.lines) == 1 and "trained with simclr" in e.value.lines[0]


def test_resuming_an_export_says_it_is_one(tmp_path: Path) -> None:
    exp = write_fake_export(tmp_path / "exp")
    with pytest.raises(ConfigError, match="exported model"):
        api.resolve_config(resume=exp)


def test_compare_refuses_an_export(tmp_path: Path, capsys: Any) -> None:
    exp = write_fake_export(tmp_path / "exp")
    assert main(["compare", str(exp)]) == 2
    assert "exported model" in _one_line(capsys)


def _image_tree(root: Path, classes: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )


@pytest.mark.filterwarnings("ignore::sslcli.data.badfiles.UnreadableImageWarning")
def test_bad_file_count_does_not_claim_to_be_exact(tmp_path: Path) -> None:
    from sslcli.data.datasets import open_dataset

    _image_tree(tmp_path, {"a": 30, "b": 30})
    (tmp_path / "a" / "empty.png").write_bytes(b"")  # found by the header check
    good = (tmp_path / "b" / "0.png").read_bytes()
    (tmp_path / "b" / "cut.png").write_bytes(good[: len(good) // 2])  # found only on decode
    with pytest.raises(DataError, match="at least 1 of 62"):
        open_dataset(str(tmp_path), "train", 16)


def test_one_class_data_reports_no_knn(tmp_path: Path, capsys: Any) -> None:
    _image_tree(tmp_path / "data" / "train", {"only": 16})
    _image_tree(tmp_path / "data" / "test", {"only": 8})
    over = {**TINY, "data": {"image_size": 16, "dataset": str(tmp_path / "data")},
            "trainer": {**TINY["trainer"], "eval_knn": True, "out": str(tmp_path / "run")}}
    res = api.train("simclr", overrides=over)  # fmt: skip
    assert res.knn_trained is None and res.knn_random is None
    assert "single class" in capsys.readouterr().err
    assert main(["eval", "knn", str(tmp_path / "run"), "--no-record", "--no-cache"]) == 2
    assert "single class" in _one_line(capsys)
