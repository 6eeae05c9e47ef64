"""Reliability, promise 1: nothing a run wrote is lost or silently wrong.

Run directories belong to one run; checkpoints are verified and a damaged one falls back
to an intact older one; a run never ends with non-finite weights saved as ``last``; a full
disk anywhere (metrics, config, eval, export) keeps what was written and says so in one
line. Full disks are simulated by making the write raise ENOSPC.
"""

from __future__ import annotations

import builtins
import copy
import errno
import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sslcli import api
from sslcli.cli.app import main
from sslcli.config import deep_merge
from sslcli.errors import CheckpointError, ConfigError, SSLError
from sslcli.runs import checkpoint as ckpt
from tests.helpers import TINY


def _train(out: Path, method: str = "simclr", **kw: Any) -> Any:
    trainer = kw.pop("trainer", {})
    over = deep_merge(copy.deepcopy(TINY), {"trainer": {"out": str(out), **trainer}})
    return api.train(method, overrides=over, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished simclr run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("nl") / "run"
    _train(out, trainer={"checkpoint_every": 1})
    return out


@pytest.fixture
def run_copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    for p in dst.glob(".sslcli-lock"):
        p.unlink()
    return dst


def _full_disk(monkeypatch: pytest.MonkeyPatch, hit: Callable[[str], bool]) -> None:
    """Every file opened for writing whose path matches ``hit`` fails with ENOSPC on its
    first write (after ``open`` has created/truncated it, as a real full disk does)."""
    real_open = builtins.open

    class Full(io.TextIOWrapper):
        pass

    def fake_open(file: Any, mode: str = "r", *a: Any, **k: Any) -> Any:
        f = real_open(file, mode, *a, **k)
        if any(c in mode for c in "wax") and hit(str(file)):

            def fail(*_: Any, **__: Any) -> Any:
                raise OSError(errno.ENOSPC, "No space left on device", str(file))

            f.write = fail  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)


# -- 1. run directories belong to one run ------------------------------------------------------
def test_export_into_its_own_run_directory_is_refused(run_copy: Path, capsys: Any) -> None:
    before = (run_copy / "config.json").read_text()
    assert main(["export", str(run_copy), "--out", str(run_copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a run directory" in err[0]
    assert (run_copy / "config.json").read_text() == before
    # the run still resumes
    _train(run_copy, resume=run_copy, trainer={"max_steps": 3})


def test_training_another_method_into_a_run_is_refused(run_copy: Path) -> None:
    with pytest.raises(SSLError, match="already holds a run"):
        _train(run_copy, "byol")
    # --force starts a new run there, without the old run's checkpoints
    _train(run_copy, "byol", force=True, trainer={"max_steps": 1})
    steps = sorted(p.name for p in (run_copy / "checkpoints").glob("step-*"))
    assert steps == ["step-00000001.safetensors"]
    recs = [json.loads(x) for x in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"] for r in recs if r.get("event") == "start"] == ["byol"]


def test_a_run_directory_in_use_is_locked(run_copy: Path) -> None:
    from sslcli.runs import layout as rundir

    lock = rundir.claim(run_copy, "simclr", resume=True, force=False)
    try:
        with pytest.raises(SSLError, match="in use by another ssl train"):
            _train(run_copy, resume=run_copy, trainer={"max_steps": 3})
    finally:
        lock.release()


def test_a_directory_without_config_does_not_take_its_parents(run_copy: Path) -> None:
    # a checkpoint copied into a sub-directory of another run: its own config counts
    child = run_copy / "child"
    shutil.copytree(run_copy / "checkpoints", child / "checkpoints")
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["trainer"]["batch_size"] = 16
    (run_copy / "config.json").write_text(json.dumps(cfg))
    _, resolved, _ = api.resolve_config(resume=child)
    assert resolved.trainer.batch_size == TINY["trainer"]["batch_size"]


# -- 2./3. verified checkpoints, fallback to an intact one -----------------------------------
def _flip_tensor_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    pos = 8 + header + (len(data) - 8 - header) // 2  # inside the tensor payload
    data[pos : pos + 16] = bytes(255 - b for b in data[pos : pos + 16])
    with open(path, "r+b") as f:  # in place: last.safetensors shares its inode
        f.write(data)


def test_corrupt_payload_is_detected(run_copy: Path) -> None:
    _flip_tensor_bytes(run_copy / "checkpoints" / "step-00000001.safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        ckpt.load(run_copy / "checkpoints" / "step-00000001.safetensors")


def test_resume_falls_back_to_the_newest_intact_checkpoint(run_copy: Path, capsys: Any) -> None:
    # (copytree made last.safetensors a file of its own: damage step 2 in both)
    _flip_tensor_bytes(run_copy / "checkpoints" / "last.safetensors")
    _flip_tensor_bytes(run_copy / "checkpoints" / "step-00000002.safetensors")
    path, _, meta = ckpt.find_resumable(run_copy, print)
    assert path.name == "step-00000001.safetensors" and meta["step"] == 1
    assert "corrupt" in capsys.readouterr().out
    res = _train(run_copy, resume=run_copy, trainer={"max_steps": 3})
    assert res.steps == 3


def test_resume_without_last_uses_the_newest_step_file(run_copy: Path) -> None:
    (run_copy / "checkpoints" / "last.safetensors").unlink()
    path, _, meta = ckpt.find_resumable(run_copy)
    assert path.name == "step-00000002.safetensors" and meta["step"] == 2
    assert _train(run_copy, resume=run_copy, trainer={"max_steps": 3}).steps == 3


# -- 4. no run "succeeds" with NaN weights ----------------------------------------------------
def test_non_finite_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="optim.lr"):
        api.resolve_config("simclr", sets=["optim.lr=.inf"])
    with pytest.raises(ConfigError, match="method.temperature"):
        api.resolve_config("simclr", sets=["method.temperature=.nan"])


def test_non_finite_weights_are_never_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An update that leaves NaN in the weights while the loss still looks finite (as
    # lr=inf did): the end-of-run checkpoint must refuse rather than save it as "last".
    import torch

    from sslcli.engine.trainer import Trainer

    real_step = Trainer.train_step

    def poisoned(self: Trainer, *a: Any) -> Any:
        out = real_step(self, *a)
        with torch.no_grad():
            next(self.method.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="not finite"):
        _train(out, trainer={"skip_nonfinite": 1})
    assert not (out / "checkpoints" / "last.safetensors").exists()


# -- 5. a full disk keeps what was written ----------------------------------------------------
def test_full_disk_on_metrics_checkpoints_and_stops_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sslcli.runs.metrics import MetricsWriter

    real_write = MetricsWriter.write
    calls = {"n": 0}

    def write(self: Any, rec: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:  # the disk fills at the first step line, after "start"
            _enospc()
        real_write(self, rec)

    monkeypatch.setattr(MetricsWriter, "write", write)
    out = tmp_path / "run"
    with pytest.raises(SSLError, match="No space left on device") as e:
        _train(out, trainer={"log_every": 1})
    assert "last checkpoint" in str(e.value)
    _, meta = ckpt.load(out)
    assert meta["step"] == 1


def _enospc(*_: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_at_start_keeps_config_json(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = (run_copy / "config.json").read_text()
    with monkeypatch.context() as m:
        _full_disk(m, lambda p: "config.json" in p)
        with pytest.raises(SSLError, match="No space left"):
            _train(run_copy, resume=run_copy, trainer={"max_steps": 3})
    assert (run_copy / "config.json").read_text() == before
    assert _train(run_copy, resume=run_copy, trainer={"max_steps": 3}).steps == 3


def test_full_disk_in_eval_and_export_is_one_line(
    run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    _full_disk(monkeypatch, lambda p: p.endswith("metrics.jsonl") or "config.json" in p)
    rc = main(["eval", "knn", str(run_copy), "--no-cache", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "No space left" in err[-1] and len(err[-1].splitlines()) == 1
    rc = main(["export", str(run_copy), "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "No space left" in err[-1]
    assert not (tmp_path / "exp" / "config.json").exists()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (a really full disk) where the test may mount one; skipped otherwise."""
    import subprocess

    d = tmp_path / "tiny"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (ENOSPC is injected in the other tests)")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_really_full_disk_export_is_one_line(
    run: Path, tmpfs: Path, capsys: Any
) -> None:
    try:  # fill it up
        with open(tmpfs / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass
    (tmpfs / "filler").write_bytes(b"\0" * ((tmpfs / "filler").stat().st_size - 8192))
    rc = main(["export", str(run), "--out", str(tmpfs / "exp")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "No space left" in err[-1]


def test_full_disk_for_the_feature_cache_still_evaluates(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*_: Any, **__: Any) -> None:  # how safetensors reports ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["eval", "knn", str(run_copy), "--no-record", "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["knn"]
