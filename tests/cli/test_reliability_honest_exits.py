"""Reliability, promise 2: exit codes tell the truth.

An interrupt is never a success: Ctrl-C anywhere exits 130 with a line saying what was
kept; SIGTERM sent to the whole process group (how batch systems stop a job) checkpoints
and exits 143 even though the DataLoader workers die of it too; Slurm's pre-emption
warning (SIGUSR1) checkpoints and exits 138; nothing in an image folder can hang a run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from sslcli.cli.app import main
from sslcli.engine.trainer import Trainer
from sslcli.runs import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[2]


def _args(out: Path, *extra: str) -> list[str]:
    return ["train", "simclr", "--backbone", "test_resnet", "--epochs", "1",
            "--batch-size", "8", "--image-size", "16", "--set", "trainer.eval_knn=false",
            "--set", "trainer.max_steps=3", "--out", str(out), *extra]  # fmt: skip


def _raise_ctrl_c(*_: Any, **__: Any) -> Any:
    raise KeyboardInterrupt


def test_ctrl_c_in_eval_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import sslcli.eval.api

    monkeypatch.setattr(sslcli.eval.api, "evaluate", _raise_ctrl_c)
    assert main(["eval", "knn", "somewhere"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_ctrl_c_in_export_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    import sslcli.runs.targets

    # Ctrl-C while the export loads its target (the slow part).
    monkeypatch.setattr(sslcli.runs.targets, "load_target", _raise_ctrl_c)
    assert main(["export", "somewhere", "--out", str(tmp_path / "e")]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_ctrl_c_during_start_up_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    monkeypatch.setattr(Trainer, "knn", _raise_ctrl_c)  # the baseline kNN before step 0
    assert main(_args(tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "no checkpoint was written" in err


def test_second_ctrl_c_while_training_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    real_step = Trainer.train_step

    def step(self: Trainer, *a: Any) -> Any:
        if self.step == 1:  # after step 0's checkpoint, as a second Ctrl-C raises
            raise KeyboardInterrupt
        return real_step(self, *a)

    monkeypatch.setattr(Trainer, "train_step", step)
    out = tmp_path / "run"
    assert main(_args(out, "--set", "trainer.checkpoint_every=1")) == 130
    err = capsys.readouterr().err
    assert "last checkpoint" in err and "step 1" in err and "--resume" in err
    assert ckpt.read_meta(out)["step"] == 1


def test_slurm_preemption_signal_checkpoints_and_exits_138(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    real_step = Trainer.train_step

    def step(self: Trainer, *a: Any) -> Any:
        out = real_step(self, *a)
        if self.step == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # sbatch --signal=USR1@90
        return out

    # Without sslcli's handler SIGUSR1 would end the test process: count it instead.
    seen: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        monkeypatch.setattr(Trainer, "train_step", step)
        out = tmp_path / "run"
        rc = main(_args(out))
    finally:
        signal.signal(signal.SIGUSR1, old)
    err = capsys.readouterr().err
    assert rc == 138, err
    assert "SIGUSR1" in err and "--resume" in err and not seen
    assert ckpt.read_meta(out)["step"] == 1


def _jpeg_tree(root: Path, n: int = 48) -> None:
    rng = np.random.default_rng(0)
    for c in "ab":
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.jpg")


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_workers_exits_143(tmp_path: Path) -> None:
    data, out = tmp_path / "jpegs", tmp_path / "run"
    _jpeg_tree(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["train", "simclr", "--backbone", "test_resnet", "--image-size", "16",
            "--batch-size", "8", "--epochs", "20", "--data", str(data), "--out", str(out),
            "--set", "data.num_workers=2", "--set", "trainer.log_every=1",
            "--set", "trainer.eval_knn=false"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "sslcli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,  # as setsid does
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
    while time.monotonic() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any("event" not in json.loads(x) for x in lines if x.strip()):
            break  # a step is logged: workers are running
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)  # kill -TERM -- -PGID: main process and workers
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert ckpt.read_meta(out)["step"] >= 1


def test_a_fifo_named_like_an_image_does_not_hang(tmp_path: Path) -> None:
    from sslcli.data.datasets import open_dataset

    data = tmp_path / "imgs"
    _jpeg_tree(data, n=4)
    fifo = data / "a" / "x.jpg"
    os.mkfifo(fifo)
    result: dict[str, Any] = {}

    def scan() -> None:
        result["ds"] = open_dataset(str(data), "train", 16)

    t = threading.Thread(target=scan, daemon=True)
    t.start()
    t.join(timeout=120)  # a guard against the hang, not a measurement
    if t.is_alive():
        # unblock the reader so the test process can end, then fail
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(timeout=30)
        pytest.fail("opening a folder with a FIFO named x.jpg blocked")
    assert len(result["ds"]) == 8
