"""Engine parts as pure functions: schedules, LARS against its formula, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sslcli.config import OptimConfig
from sslcli.engine import checkpoint as ckpt
from sslcli.engine import schedules
from sslcli.engine.optim import LARS, build_optimizer, default_param_groups, scaled_lr
from sslcli.errors import CheckpointError


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
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, weight_decay=1e-4, eta=0.001)
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
        ckpt.save(tmp_path, step, {"model": {"w": torch.full((2,), float(step))}},
                  {"step": step}, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["last.safetensors", "step-00000002.safetensors", "step-00000003.safetensors"]
    groups, meta = ckpt.load(tmp_path)
    assert meta["step"] == 3 and torch.equal(groups["model"]["w"], torch.full((2,), 3.0))


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
