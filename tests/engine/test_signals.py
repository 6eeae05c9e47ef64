"""Interruptions and numerical faults.

SIGTERM to a real ``python -m sslcli train`` process: it finishes the step, writes a
checkpoint, exits 143 with a line saying how to resume, and the resumed run is
bit-identical to an uninterrupted one. SIGINT: exit 130. A non-finite loss stops the run
with the step, the last good checkpoint and a hint; ``--skip-nonfinite N`` skips N such
steps without touching weights, optimiser state or buffers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field
from sslcli_plugins.simclr import SimCLR, SimCLRConfig

from sslcli import api
from sslcli.cli.app import main
from sslcli.engine.trainer import Trainer
from sslcli.errors import NonFiniteLoss
from sslcli.method import Batch, StepInfo, StepOutput
from sslcli.runs import checkpoint as ckpt
from tests.helpers import write_idx, write_plugin_dist

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=40)  # 5 steps of 8 per epoch


def _overrides(data: Path, out: Path, **trainer: Any) -> dict[str, Any]:
    return {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": str(data), "image_size": 16, "num_workers": 0},
        "trainer": {"epochs": 40, "batch_size": 8, "log_every": 1, "eval_knn": False,
                    "out": str(out), **trainer},
    }  # fmt: skip


def _cli_args(data: Path, out: Path) -> list[str]:
    return ["train", "simclr", "--data", str(data), "--backbone", "test_resnet",
            "--image-size", "16", "--batch-size", "8", "--epochs", "40", "--out", str(out),
            "--set", "trainer.log_every=1", "--set", "trainer.eval_knn=false",
            "--set", "data.num_workers=0"]  # fmt: skip


def _step_logs(run_dir: Path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "event" not in r]


def _same_checkpoints(a_dir: Path, b_dir: Path) -> None:
    a, _ = ckpt.load(a_dir)
    b, _ = ckpt.load(b_dir)
    for group in ("model", "optim"):
        diff = [k for k in a[group] if not torch.equal(a[group][k], b[group][k])]
        assert not diff, f"{group} differs in {diff[:5]}"


def _sigterm_after_first_step(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``ssl ARGS`` in a fresh process, SIGTERM it once its first step is logged;
    return its exit code and all of its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sslcli", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("step 1/"):  # the first logged step: training is under way
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + rest


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_exits_143_and_resumes_exactly(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    code, err = _sigterm_after_first_step(_cli_args(data, out), env)
    assert code == 143, err
    last = err.strip().splitlines()[-1]
    meta = ckpt.read_meta(out)
    k = meta["step"]
    assert 1 <= k < 200
    assert f"interrupted by SIGTERM at step {k}" in last
    assert f"resume with: ssl train simclr --resume {out}" in last

    # Resume in a fresh process for 3 more steps; compare with one uninterrupted run.
    resumed = subprocess.run(
        [sys.executable, "-m", "sslcli", "train", "--resume", str(out),
         "--set", f"trainer.max_steps={k + 3}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {out / 'checkpoints' / 'last.safetensors'} at step {k}" in resumed.stderr
    whole = api.train("simclr", overrides=_overrides(data, tmp_path / "whole", max_steps=k + 3))
    assert whole.steps == k + 3 == ckpt.read_meta(out)["step"]
    _same_checkpoints(whole.run_dir, out)
    assert _step_logs(whole.run_dir) == _step_logs(out)


def test_sigterm_stops_a_whole_comparison(data: Path, tmp_path: Path) -> None:
    """`ssl compare --methods a,b` interrupted during a: exit 143, b is never trained."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["compare", "--methods", "simclr,byol", "--data", str(data), "--backbone",
            "test_resnet", "--image-size", "16", "--batch-size", "8", "--epochs", "40",
            "--out", str(tmp_path), "--no-linear", "--set", "trainer.log_every=1",
            "--set", "data.num_workers=0"]  # fmt: skip
    code, err = _sigterm_after_first_step(args, env)
    assert code == 143, err
    assert "compare: stopped during simclr" in err and "training byol" not in err
    assert not (tmp_path / "byol").exists()
    assert ckpt.read_meta(tmp_path / "simclr")["step"] >= 1  # the interrupted run is kept


def test_sigint_finishes_the_step_and_exits_130(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    real_step = Trainer.train_step

    def step_then_ctrl_c(self: Trainer, *args: Any) -> Any:
        result = real_step(self, *args)
        if self.step == 1:  # Ctrl-C arrives while step 1 (the second) is computed
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    out = tmp_path / "run"
    code = main(_cli_args(data, out))
    assert code == 130
    # An orderly stop is reported as "ssl: interrupted ...", not as an error.
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl:")]
    assert len(errors) == 1 and "interrupted by SIGINT at step 2" in errors[0]
    assert "error" not in errors[0]
    assert ckpt.read_meta(out)["step"] == 2  # step 1 was finished, not cut
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


# --------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------


class NaNConfig(SimCLRConfig):
    nan_steps: list[int] = Field(
        default_factory=list, description="Steps whose input views are replaced by NaN."
    )


class NaNSimCLR(SimCLR):
    """SimCLR whose views are NaN at chosen steps (so BN statistics are poisoned too)."""

    name = "nan-simclr"
    Config = NaNConfig

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        if step.step in self.config.nan_steps:  # type: ignore[attr-defined]
            batch = Batch([v * float("nan") for v in batch.views], batch.index, batch.labels)
        return super().training_step(batch, step)


def _nan_trainer(data: Path, out: Path, nan_steps: list[int], skip: int, **trainer: Any) -> Trainer:
    o = _overrides(data, out, **{"epochs": 2, "skip_nonfinite": skip, **trainer})
    _, run, mcfg = api.resolve_config("simclr", overrides=o)
    return Trainer(run, NaNSimCLR, NaNConfig(**mcfg.model_dump(), nan_steps=nan_steps))


def test_nonfinite_loss_stops_with_step_checkpoint_and_hint(data: Path, tmp_path: Path) -> None:
    tr = _nan_trainer(data, tmp_path / "run", nan_steps=[6], skip=0)
    with pytest.raises(NonFiniteLoss) as e:
        tr.fit()
    msg = str(e.value)
    assert "loss became non-finite at step 6 (epoch 1)" in msg
    assert f"last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'last.safetensors'}" in msg
    assert "(step 5)" in msg and "--precision fp32" in msg and "--skip-nonfinite" in msg
    assert "\n" not in msg
    assert ckpt.read_meta(tmp_path / "run")["step"] == 5
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    events = [r for r in map(json.loads, lines) if r.get("event") == "nonfinite"]
    assert events == [{"event": "nonfinite", "step": 6, "epoch": 1, "count": 1, "allowed": 0}]


def test_skipped_step_changes_nothing(data: Path, tmp_path: Path) -> None:
    tr = _nan_trainer(data, tmp_path / "run", nan_steps=[2], skip=1)
    batches = tr.batches.epoch(0, 0)
    for step in range(4):
        images, labels, index = next(batches)
        tr.step = step
        tr.schedule.apply(tr.optimizer, step)
        before = {k: v.clone() for k, v in tr.method.state_dict().items()}
        opt_before = {
            i: {k: v.clone() for k, v in st.items()} for i, st in tr.optimizer.state.items()
        }
        out, ok = tr.train_step(images, labels, index)
        after = tr.method.state_dict()
        if step == 2:
            assert not ok and not torch.isfinite(out.loss)
            changed = [k for k in before if not torch.equal(before[k], after[k])]
            assert not changed, f"a skipped step changed {changed[:5]}"
            for i, st in tr.optimizer.state.items():
                assert all(torch.equal(v, opt_before[i][k]) for k, v in st.items())
        else:
            assert ok
            assert any(not torch.equal(before[k], after[k]) for k in before)
        assert all(bool(torch.isfinite(v.float()).all()) for v in after.values())


def test_skip_nonfinite_tolerates_n_steps(data: Path, tmp_path: Path) -> None:
    result = _nan_trainer(data, tmp_path / "ok", nan_steps=[2], skip=1, max_steps=4).fit()
    assert result.steps == 4 and ckpt.read_meta(tmp_path / "ok")["nonfinite"] == 1
    logged = _step_logs(tmp_path / "ok")
    assert [s for s, _ in logged] == [1, 2, 4]  # the skipped step logs no loss line
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in logged)
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        _nan_trainer(data, tmp_path / "stop", nan_steps=[2, 4], skip=1).fit()


NAN_PLUGIN = '''
from pydantic import Field
from sslcli.method import Batch
from sslcli_plugins.simclr import SimCLR, SimCLRConfig


class NaNConfig(SimCLRConfig):
    nan_steps: list[int] = Field(default_factory=list, description="NaN views at these steps.")


class FakeNaN(SimCLR):
    """SimCLR with NaN views at chosen steps (a test plugin)."""

    name = "fake-nan"
    Config = NaNConfig

    def training_step(self, batch, step):
        if step.step in self.config.nan_steps:
            batch = Batch([v * float("nan") for v in batch.views], batch.index, batch.labels)
        return super().training_step(batch, step)
'''


def test_cli_skip_nonfinite_flag(
    data: Path, tmp_path: Path, plugin_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_plugin_dist(plugin_path, "fake-nan", {"fake-nan": "fake_nan:FakeNaN"},
                      {"fake_nan": NAN_PLUGIN})  # fmt: skip
    args = ["train", "fake-nan", "--data", str(data), "--backbone", "test_resnet",
            "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--set",
            "trainer.eval_knn=false", "--set", "trainer.max_steps=3", "--set",
            "method.nan_steps=[1]", "--set", "data.num_workers=0"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert "non-finite at step 1 (epoch 0); no checkpoint was written yet" in errors[0]
    assert main([*args, "--out", str(tmp_path / "b"), "--skip-nonfinite", "1"]) == 0
    assert ckpt.read_meta(tmp_path / "b")["nonfinite"] == 1
