"""Distributed training on CPU with gloo, over the loopback interface only.

* ``sslcli.nn.dist`` helpers: identity on one process; gather-with-gradient, all-reduce and
  the synchronised BatchNorm are exact on two processes (against one process holding the
  whole batch, written out plainly).
* Two processes with batch B each == one process with batch 2B (SimCLR: negatives gathered
  across processes, BN synchronised), loss and weights after a few steps.
* ``torchrun -m sslcli train`` runs DDP and only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as tdist
from sslcli_plugins.simclr import SimCLR
from torch import nn

from sslcli import api
from sslcli.config import RunConfig
from sslcli.data.views import ViewSpec
from sslcli.engine.trainer import Trainer
from sslcli.nn import dist
from sslcli.runs import checkpoint as ckpt
from tests.helpers import spawn, torchrun_env, write_idx

REPO = Path(__file__).resolve().parents[2]


def _set_trainer_option(run: RunConfig, key: str, value: Any) -> None:
    """``run.trainer.<key> = value`` for engine options that config.py may not declare yet
    (the engine reads them with getattr); a declared field goes through validation."""
    if key in type(run.trainer).model_fields:
        setattr(run.trainer, key, value)
    else:
        object.__setattr__(run.trainer, key, value)


# --------------------------------------------------------------------------------------------
# Helpers on one process
# --------------------------------------------------------------------------------------------


def test_helpers_are_the_identity_on_one_process() -> None:
    assert not dist.is_dist() and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.gather_with_grad(x) is x and dist.all_reduce_sum_with_grad(x) is x
    assert torch.equal(dist.gather(x), x) and torch.equal(dist.all_reduce_mean(x), x)
    assert torch.equal(dist.all_reduce_sum(x), x) and torch.equal(dist.all_reduce_max(x), x)
    assert dist.broadcast_object({"a": 1}) == {"a": 1} and dist.all_gather_object(5) == [5]
    dist.barrier()
    # a converted BN is plain BN when there is nobody to synchronise with
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    synced = dist.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), torch.device("cpu"))
    assert isinstance(synced[0], dist.GlobalBatchNorm)
    x = torch.randn(6, 4, 3, 3)
    assert torch.equal(synced[0](x), bn(x))
    assert torch.equal(synced[0].running_var, bn.running_var)


def test_sync_bn_refuses_layers_with_their_own_forward() -> None:
    class ScaledBN(nn.BatchNorm1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    with pytest.raises(ValueError, match="ScaledBN has its own forward"):
        dist.convert_sync_batchnorm(nn.Sequential(ScaledBN(3)), torch.device("cpu"))


# --------------------------------------------------------------------------------------------
# Collectives and synchronised BN on two processes
# --------------------------------------------------------------------------------------------


def _check_collectives(rank: int, world: int) -> None:
    """Runs inside the process group of the DDP test below (one spawn for both)."""
    g = torch.Generator().manual_seed(0)
    full = torch.randn(world * 3, 5, generator=g)  # every process knows the global batch
    weights = torch.randn(world, world * 3, 5, generator=g)  # a different loss per rank

    # gather_with_grad: rank r's loss is sum(w_r * gathered); the gradient of rank r's
    # rows is, by the chain rule, the sum over processes of their weights on those rows.
    x = full[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
    y = dist.gather_with_grad(x)
    assert torch.equal(y, full)
    (weights[rank] * y).sum().backward()
    expected = weights.sum(0)[rank * 3 : (rank + 1) * 3]
    torch.testing.assert_close(x.grad, expected)

    # all-reduce helpers and objects
    v = torch.tensor([float(rank + 1), -float(rank)])
    assert dist.all_reduce_sum(v).tolist() == [3.0, -1.0] and v.tolist()[0] == rank + 1
    assert dist.all_reduce_mean(v).tolist() == [1.5, -0.5]
    assert dist.all_reduce_max(v).tolist() == [2.0, 0.0]
    assert dist.broadcast_object(f"from {rank}") == "from 0"
    assert dist.all_gather_object(rank * 10) == [0, 10]
    s = torch.tensor([2.0 * (rank + 1)], requires_grad=True)
    (dist.all_reduce_sum_with_grad(s) * (rank + 1)).sum().backward()
    assert s.grad is not None and s.grad.tolist() == [3.0]  # d(sum_r (r+1) * S)/ds_r

    # GlobalBatchNorm on half the batch each == nn.BatchNorm2d on the whole batch:
    # outputs, input and parameter gradients, running statistics.
    images = torch.randn(8, 3, 4, 4, generator=g) * 3 + 1
    up = torch.randn(8, 3, 4, 4, generator=g)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(3, generator=g) + 0.5)
        ref.bias.copy_(torch.randn(3, generator=g))
    synced = dist.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))[0]
    synced.load_state_dict(ref.state_dict())
    xr = images.clone().requires_grad_(True)
    out_ref = ref(xr)
    # DDP averages gradients over processes, so the one-process objective is the mean
    # of the per-process losses: sum(up * out) / world here.
    ((out_ref * up).sum() / world).backward()
    mine = slice(rank * 4, (rank + 1) * 4)
    xs = images[mine].clone().requires_grad_(True)
    out = synced(xs)
    (out * up[mine]).sum().backward()
    torch.testing.assert_close(out, out_ref[mine].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad, xr.grad[mine] * world, rtol=1e-4, atol=1e-5)
    for p_ref, p in ((ref.weight, synced.weight), (ref.bias, synced.bias)):
        assert p.grad is not None and p_ref.grad is not None
        grad = dist.all_reduce_mean(p.grad)  # what DDP does with parameter gradients
        torch.testing.assert_close(grad, p_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(synced.running_mean, ref.running_mean)
    torch.testing.assert_close(synced.running_var, ref.running_var)


def _bn_precision_worker(rank: int, world: int, port: int) -> None:
    torchrun_env(rank, world, port)
    tdist.init_process_group("gloo")
    try:
        g = torch.Generator().manual_seed(0)
        # Channels whose mean is 1000 times their spread (the first layers see such inputs,
        # SimCLR's unnormalised pixels say): float32 sums keep only a few digits of x - mean.
        images = 10 + 0.01 * torch.randn(8, 3, 4, 4, generator=g)
        up = torch.randn(8, 3, 4, 4, generator=g)
        ref = nn.BatchNorm2d(3).double()  # the exact answer for these float32 inputs
        xr = images.double().requires_grad_(True)
        out_ref = ref(xr)
        ((out_ref * up.double()).sum() / world).backward()
        synced = dist.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device("cpu"))
        mine = slice(rank * 4, (rank + 1) * 4)
        xs = images[mine].clone().requires_grad_(True)
        out = synced(xs)
        (out * up[mine]).sum().backward()
        assert out.dtype == torch.float32 and xs.grad is not None
        torch.testing.assert_close(out.double(), out_ref[mine].detach(), rtol=1e-5, atol=1e-5)
        assert xr.grad is not None
        torch.testing.assert_close(xs.grad.double(), xr.grad[mine] * world, rtol=1e-5, atol=1e-3)
    finally:
        tdist.destroy_process_group()


def test_global_batchnorm_keeps_the_digits_of_x_minus_mean_on_cpu() -> None:
    """Two processes' GlobalBatchNorm == the exact (float64) BN of the whole batch to float32
    rounding of the result, even where a channel's mean dwarfs its spread: float32 sums
    were 7e-5 off here, and the error grew over training steps."""
    spawn(_bn_precision_worker)


# --------------------------------------------------------------------------------------------
# Two processes x B == one process x 2B
# --------------------------------------------------------------------------------------------


class IdentityViewsSimCLR(SimCLR):
    """SimCLR whose two views are the images themselves (whole-image crop, no flips or
    colour changes), so the comparison does not depend on how each process draws its
    augmentation parameters; the loss, heads and gathered negatives are SimCLR's own."""

    name = "simclr"

    def views(self) -> list[ViewSpec]:
        size = self.backbone.sslcli_spec.image_size
        still = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                     grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, normalize=False)  # fmt: skip
        return [ViewSpec(count=2, size=size, **still)]  # type: ignore[arg-type]


STEPS = 4


def _equivalence_overrides(data: str, out: str, batch: int) -> dict[str, Any]:
    return {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": data, "image_size": 16, "num_workers": 0},
        # Plain SGD with a large constant lr, so a few steps move the weights visibly.
        "optim": {"name": "sgd", "lr": 0.5, "lr_scaling": "none", "weight_decay": 0.0},
        "schedule": {"kind": "constant", "warmup_epochs": 0},
        "trainer": {"epochs": 1, "batch_size": batch, "max_steps": STEPS, "log_every": 1,
                    "eval_knn": False, "out": out, "device": "cpu"},
    }  # fmt: skip


def _train(data: str, out: str, batch: int, sync_bn: bool) -> Trainer:
    method_cls, run, mcfg = api.resolve_config(
        "simclr", overrides=_equivalence_overrides(data, out, batch)
    )
    _set_trainer_option(run, "sync_bn", sync_bn)
    return Trainer(run, IdentityViewsSimCLR, mcfg)


def _ddp_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    torchrun_env(rank, world, port)
    tr = _train(data, out, batch=8, sync_bn=True)  # the global batch: 4 per process
    assert tdist.is_initialized() and tr.local_batch == 4
    assert any(isinstance(m, dist.GlobalBatchNorm) for m in tr.method.modules())
    _check_collectives(rank, world)
    tr.fit()
    assert not tdist.is_initialized()  # the trainer left the group it joined


def _step_losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "event" not in r]


def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    """(The spawned processes also check the collectives and GlobalBatchNorm first.)"""
    data = str(write_idx(tmp_path / "data", n_train=40))
    one = _train(data, str(tmp_path / "one"), batch=8, sync_bn=False)
    init = {k: v.clone() for k, v in one.method.state_dict().items()}
    one.fit()
    spawn(_ddp_worker, data, str(tmp_path / "two"))

    l1, l2 = _step_losses(tmp_path / "one"), _step_losses(tmp_path / "two")
    assert len(l1) == len(l2) == STEPS
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    a, _ = ckpt.load(tmp_path / "one")
    b, meta = ckpt.load(tmp_path / "two")
    assert meta["world_size"] == 2 and len(meta["ranks"]) == 2
    moved = max(float((a["model"][k].float() - init[k].float()).abs().max()) for k in init)
    assert moved > 1e-2, "the weights hardly moved: the comparison would prove nothing"
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------


def test_torchrun_runs_ddp_and_only_rank_0_writes(tmp_path: Path) -> None:
    data = write_idx(tmp_path / "data", n_train=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "sslcli", "train", "simclr", "--data", str(data), "--backbone", "test_resnet",
           "--image-size", "16", "--batch-size", "8", "--epochs", "1", "--out", str(out),
           "--device", "cpu", "--set", "trainer.max_steps=3", "--set", "trainer.log_every=1",
           "--set", "trainer.eval_knn=false"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports for both
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "event" not in r] == [1, 2, 3]  # one writer
    start = next(r for r in recs if r.get("event") == "start")
    assert start["world_size"] == 2
    assert sum(1 for r in recs if r.get("event") == "end") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "last.safetensors",
        "step-00000003.safetensors",
    ]
    assert json.loads((out / "config.json").read_text())["trainer"]["batch_size"] == 8
    assert ckpt.read_meta(out)["world_size"] == 2
