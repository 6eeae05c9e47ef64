"""Engine parts as pure functions: schedules, LARS against its formula, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sslcli.config import OptimConfig
from sslcli.errors import CheckpointError
from sslcli.nn import schedules
from sslcli.optim import LARS, build_optimizer, default_param_groups, scaled_lr
from sslcli.runs import checkpoint as ckpt


def test_warmup_cosine() -> None:
    f = [schedules.warmup_cosine(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[55] == pytest.approx(0.5, abs=1e-9)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert schedules.warmup_cosine(100, 100, 10, 0.01) == pytest.approx(0.01)


def test_step_schedule_and_momentum() -> None:
    assert schedules.warmup_step(0, 10, 0, [120, 160], 0.1) == 1.0
    assert schedules.warmup_step(1200, 10, 0, [120, 160], 0.1) == pytest.approx(0.1)
    assert schedules.warmup_step(1600, 10, 0, [120, 160], 0.1) == pytest.approx(0.01)
    # BYOL: tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2
    for k in (0, 30, 100):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * k / 100) + 1) / 2
        assert schedules.cosine_increase(k, 100, 0.996) == pytest.approx(expected)
    assert schedules.cosine_between(0, 10, 0.04, 0.4) == pytest.approx(0.04)
    assert schedules.cosine_between(10, 10, 0.04, 0.4) == pytest.approx(0.4)


def test_lr_scaling() -> None:
    assert scaled_lr(OptimConfig(lr=0.3, lr_scaling="linear"), 512) == pytest.approx(0.6)
    assert scaled_lr(OptimConfig(lr=0.075, lr_scaling="sqrt"), 4096) == pytest.approx(4.8)
    assert scaled_lr(OptimConfig(lr=0.1, lr_scaling="none"), 512) == 0.1


def test_lars_matches_formula() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        eta=0.001,
    )
    w0, b0 = w.detach().clone(), b.detach().clone()
    mw = torch.zeros_like(w0)
    mb = torch.zeros_like(b0)
    for it in range(3):
        gw, gb = torch.randn(5, 4), torch.randn(5)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + 1e-4 * w0
        trust = 0.001 * w0.norm() / d.norm()
        mw = d * trust if it == 0 else 0.9 * mw + d * trust
        mb = gb if it == 0 else 0.9 * mb + gb
        w0 = w0 - 0.1 * mw
        b0 = b0 - 0.1 * mb
        torch.testing.assert_close(w.detach(), w0)
        torch.testing.assert_close(b.detach(), b0)


def test_param_groups_exclude_norms_and_biases() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    groups = default_param_groups(model, OptimConfig())
    decay, no_decay = groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0
    opt = build_optimizer(groups, OptimConfig(name="sgd", weight_decay=0.5), 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_checkpoint_roundtrip_and_pruning(tmp_path: Path) -> None:
    for step in range(4):
        ckpt.save(
            tmp_path, step, {"model": {"w": torch.full((2,), float(step))}}, {"step": step}, keep=2
        )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.safetensors", "step-00000002.safetensors", "step-00000003.safetensors"]
    groups, meta = ckpt.load(tmp_path)
    assert meta["step"] == 3 and torch.equal(groups["model"]["w"], torch.full((2,), 3.0))


def test_failed_write_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt.save(tmp_path, 1, {"model": {"w": torch.ones(3)}}, {"step": 1}, keep=3)
    import errno

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(tmp_path, 2, {"model": {"w": torch.zeros(3)}}, {"step": 2}, keep=3)
    msg = str(e.value)
    assert "No space left" in msg and "intact" in msg and "\n" not in msg
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    groups, meta = ckpt.load(tmp_path)
    assert meta["step"] == 1 and torch.equal(groups["model"]["w"], torch.ones(3))


def test_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "last.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ckpt.load(bad)


def test_optimizer_state_roundtrip() -> None:
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(3)
    opt.step()
    tensors, meta = ckpt.flatten_optimizer(opt.state_dict())
    import json

    meta = json.loads(json.dumps(meta))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(ckpt.unflatten_optimizer(tensors, meta))
    s1, s2 = opt.state_dict()["state"][0], opt2.state_dict()["state"][0]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["step"], s2["step"])


# --------------------------------------------------------------------------------------------
# Checkpoint writes that fail part-way, stale temporary files, metadata without tensors
# --------------------------------------------------------------------------------------------


def test_write_failing_after_half_the_bytes_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors reports a full disk as SafetensorError (not OSError) after writing part
    of the file; fsync can fail too. Both leave the previous checkpoint as 'last'."""
    import errno

    from safetensors import SafetensorError

    ckpt.save(tmp_path, 1, {"model": {"w": torch.ones(64)}}, {"step": 1}, keep=3)
    real = ckpt.save_file

    def half_then_fail(tensors: dict[str, torch.Tensor], filename: str, metadata: object) -> None:
        real(tensors, filename, metadata)  # type: ignore[arg-type]
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(ckpt, "save_file", half_then_fail)
    with pytest.raises(CheckpointError) as e:
        ckpt.save(tmp_path, 2, {"model": {"w": torch.zeros(64)}}, {"step": 2}, keep=3)
    assert "(step 1) is intact" in str(e.value) and "No space left" in str(e.value)
    monkeypatch.setattr(ckpt, "save_file", real)

    def fsync_fails(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.os, "fsync", fsync_fails)
    with pytest.raises(CheckpointError, match="Input/output error; the previous checkpoint"):
        ckpt.save(tmp_path, 3, {"model": {"w": torch.zeros(64)}}, {"step": 3}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.safetensors",
        "step-00000001.safetensors",
    ]
    groups, meta = ckpt.load(tmp_path)
    assert meta["step"] == 1 and torch.equal(groups["model"]["w"], torch.ones(64))


def test_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    """A process killed mid-write leaves its temporary file; the next save removes it."""
    (tmp_path / ".step-00000007.safetensors.tmp-999999").write_bytes(b"partial")
    ckpt.save(tmp_path, 8, {"model": {"w": torch.ones(1)}}, {"step": 8}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.safetensors",
        "step-00000008.safetensors",
    ]


def test_read_meta_and_resolve(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ckpt.save(run / "checkpoints", 5, {"model": {"w": torch.ones(2)}}, {"step": 5}, keep=1)
    for target in (run, run / "checkpoints", run / "checkpoints" / "step-00000005.safetensors"):
        assert ckpt.read_meta(target) == {"step": 5}
    from safetensors.torch import save_file

    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an sslcli checkpoint"):
        ckpt.read_meta(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.resolve(tmp_path)


# --------------------------------------------------------------------------------------------
# Pure pieces of the trainer: config diffs, gradient clipping, log truncation, the logger
# --------------------------------------------------------------------------------------------


def test_architecture_diff_names_only_architecture_fields() -> None:
    from sslcli.engine.resume import architecture_diff

    old = {"backbone": {"name": "resnet18", "kwargs": {}}, "method": {"name": "simclr", "t": 0.1},
           "data": {"image_size": 32, "dataset": "digits", "num_workers": 0},
           "optim": {"lr": 0.3}}  # fmt: skip
    new = {"backbone": {"name": "resnet50", "kwargs": {"a": 1}},
           "method": {"name": "simclr", "t": 0.1}, "optim": {"lr": 0.6},
           "data": {"image_size": 32, "dataset": "digits", "num_workers": 4}}  # fmt: skip
    assert architecture_diff(old, new) == ["backbone.kwargs", "backbone.kwargs.a", "backbone.name"]
    assert architecture_diff(old, old) == []


def test_per_tensor_clipping_follows_dino() -> None:
    """DINO's clip_gradients: for each tensor, g *= clip / (||g|| + 1e-6) when that is < 1."""
    from sslcli.engine.grad_guard import clip_gradients

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    grads = [
        torch.randn_like(p) * s for p, s in zip(model.parameters(), (10, 0.01, 5, 0.1), strict=True)
    ]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    norm = clip_gradients(model, OptimConfig(grad_clip=3.0, grad_clip_mode="per_tensor"))
    assert norm is not None and bool(torch.isfinite(norm))
    for p, g in zip(model.parameters(), grads, strict=True):
        coef = 3.0 / (float(g.norm()) + 1e-6)
        expected = g * coef if coef < 1 else g
        torch.testing.assert_close(p.grad, expected)
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    total = float(torch.cat([g.flatten() for g in grads]).norm())
    clip_gradients(model, OptimConfig(grad_clip=1.0, grad_clip_mode="norm"))
    for p, g in zip(model.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g * (1.0 / (total + 1e-6)))


def test_truncate_metrics_drops_lines_after_the_checkpoint(tmp_path: Path) -> None:
    import json

    from sslcli.runs.metrics import truncate_after

    path = tmp_path / "metrics.jsonl"
    lines = [{"event": "start"}, {"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5},
             {"event": "epoch", "step": 4}, {"step": 6, "loss": 0.2}]  # fmt: skip
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 8, "lo')
    truncate_after(path, 4)
    assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:4]


def test_metrics_file_skips_cut_lines_and_writes_non_finite_as_null(tmp_path: Path) -> None:
    from sslcli.runs import metrics

    path = tmp_path / metrics.FILE
    writer = metrics.MetricsWriter(path)
    writer.write({"step": 1, "loss": float("inf"), "probe": {"top1": float("nan")}})
    writer.close()
    with path.open("ab") as f:
        f.write(b'{"step": 2, "lo\n\xff\xfe\n')  # a cut line, then bytes that are not UTF-8
    metrics.append_record(path, {"event": "eval", "top1": [0.5, float("nan")]})
    assert metrics.read_records(path) == [
        {"step": 1, "loss": None, "probe": {"top1": None}},
        {"event": "eval", "top1": [0.5, None]},
    ]
    assert metrics.read_records(tmp_path / "missing.jsonl") == []


def test_logger_jsonl_plain_lines_and_missing_tensorboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import json
    import sys

    from rich.console import Console

    from sslcli.engine.logger import Logger

    # tensorboard is optional: its absence is one line, and metrics.jsonl still works
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=200)
    path = tmp_path / "metrics.jsonl"
    with Logger(path, console, 10, tensorboard_dir=tmp_path / "tb") as log:
        log.write({"event": "start", "method": "x"})
        log.write({"step": 2, "epoch": 0, "lr": 0.1, "loss": 1.25, "images_per_s": 50.0})
        log.write({"step": 3, "epoch": 0, "lr": 0.1, "loss": float("nan")})
        log.advance(3)
    out = buf.getvalue().splitlines()
    assert out[0].startswith("trainer.tensorboard: the tensorboard package is not installed")
    assert out[1] == "step 2/10 epoch 0 loss 1.2500 lr 0.1 50 img/s"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    assert recs[1]["loss"] == 1.25 and recs[2]["loss"] is None  # NaN is written as null
    assert not (tmp_path / "tb").exists()
    # on a terminal the same records drive a progress bar instead of lines
    buf = io.StringIO()
    tty = Console(file=buf, force_terminal=True, width=120)
    with Logger(tmp_path / "m2.jsonl", tty, 10) as log:
        log.write({"step": 2, "epoch": 0, "lr": 0.1, "loss": 1.25})
        log.advance(2)
    assert "step 2/10 epoch" not in buf.getvalue() and "2/10" in buf.getvalue()
