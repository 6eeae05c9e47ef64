"""DINO: the loss, the centre, the schedules, the head, the teacher and last-layer freezing."""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from sslcli_plugins.dino import (
    DINO,
    dino_loss,
    teacher_temperature,
    update_center,
)
from timm.layers import DropPath

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.data.views import expand
from sslcli.method import Batch, StepInfo
from sslcli.nn import cosine_momentum
from sslcli.nn.dino_head import DINOHead, WeightNormLinear

# -- references written from the paper's formulas -------------------------------------------


def dino_loss_reference(
    s: torch.Tensor, t: torch.Tensor, c: torch.Tensor, tt: float, ts: float, n_crops: int
) -> float:
    """Caron et al. 2021, Eq. 3 and Alg. 1 with loops: for every (teacher global crop iq,
    student crop v ≠ iq), the batch mean of H(P_t, P_s) = −Σ_k P_t log P_s, with
    P_t = softmax((t − c)/τ_t) and P_s = softmax(s/τ_s); summed and divided by the pairs."""
    s, t, c = s.double(), t.double(), c.double()
    b = t.shape[0] // 2
    total, pairs = 0.0, 0
    for iq in range(2):
        for v in range(n_crops):
            if v == iq:
                continue
            per_sample = []
            for i in range(b):
                tl = [(float(t[iq * b + i, k]) - float(c[0, k])) / tt for k in range(t.shape[1])]
                sl = [float(s[v * b + i, k]) / ts for k in range(s.shape[1])]
                tz = sum(math.exp(x - max(tl)) for x in tl)
                pt = [math.exp(x - max(tl)) / tz for x in tl]
                s_lse = max(sl) + math.log(sum(math.exp(x - max(sl)) for x in sl))
                per_sample.append(-sum(p * (x - s_lse) for p, x in zip(pt, sl, strict=True)))
            total += sum(per_sample) / b
            pairs += 1
    return total / pairs


def test_dino_loss_matches_reference() -> None:
    torch.manual_seed(0)
    b, k, v = 3, 7, 5  # 2 global + 3 local crops
    for tt in (0.04, 0.07):
        s = torch.randn(v * b, k)
        t = torch.randn(2 * b, k)
        c = torch.randn(1, k) * 0.1
        got = float(dino_loss(s, t, c, tt, 0.1))
        want = dino_loss_reference(s, t, c, tt, 0.1, v)
        assert math.isclose(got, want, rel_tol=1e-5), (got, want)


def test_dino_loss_pairs_and_gradients() -> None:
    # With only the 2 global crops there are 2 pairs: (t0, s1) and (t1, s0).
    torch.manual_seed(1)
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    c = torch.zeros(1, 6)
    loss = dino_loss(s, t, c, 0.04, 0.1)
    q = torch.softmax(t / 0.04, dim=1)
    lp = torch.log_softmax(s.detach() / 0.1, dim=1)
    want = (-(q[2:] * lp[:2]).sum(1).mean() - (q[:2] * lp[2:]).sum(1).mean()) / 2
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # The centre is subtracted from the teacher's logits before the sharpening.
    c = torch.randn(1, 6)
    shifted = dino_loss(s.detach(), t - c, torch.zeros(1, 6), 0.04, 0.1)
    torch.testing.assert_close(dino_loss(s.detach(), t, c, 0.04, 0.1), shifted)


def test_center_update_is_an_ema_of_the_teacher_mean() -> None:
    c = torch.randn(1, 5)
    t = torch.randn(8, 5)
    want = 0.9 * c + 0.1 * t.mean(0, keepdim=True)
    update_center(c, t, 0.9)
    torch.testing.assert_close(c, want)


def test_teacher_temperature_schedule_is_the_official_linspace() -> None:
    sched = np.concatenate([np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07])
    got = [teacher_temperature(e, 30, 0.04, 0.07) for e in range(100)]
    np.testing.assert_allclose(got, sched, rtol=1e-12)
    assert teacher_temperature(0, 0, 0.04, 0.04) == 0.04
    assert teacher_temperature(0, 1, 0.02, 0.07) == 0.02
    assert teacher_temperature(5, 1, 0.02, 0.07) == 0.07


def test_teacher_momentum_cosine() -> None:
    total = 100
    ms = [cosine_momentum(k, total, 0.996) for k in range(total + 1)]
    want = [1 - (1 - 0.996) * (math.cos(math.pi * k / total) + 1) / 2 for k in range(total + 1)]
    np.testing.assert_allclose(ms, want, rtol=1e-12)
    assert ms[0] == pytest.approx(0.996) and ms[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(ms, ms[1:], strict=False))


# -- the head ---------------------------------------------------------------------------------


def test_head_layout_and_fixed_unit_norm() -> None:
    h = DINOHead(10, 50, hidden_dim=16, bottleneck_dim=8)
    kinds = [type(x).__name__ for x in h.mlp]
    assert kinds == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    ll = h.last_layer
    assert isinstance(ll, WeightNormLinear) and not ll.weight_g.requires_grad
    torch.testing.assert_close(ll.weight.norm(dim=1), torch.ones(50))
    # Only the direction v is learnt: after an update of v every row still has norm 1.
    opt = torch.optim.SGD([p for p in h.parameters() if p.requires_grad], lr=10.0)
    h(torch.randn(4, 10)).pow(2).sum().backward()
    assert ll.weight_g.grad is None and ll.weight_v.grad is not None
    opt.step()
    torch.testing.assert_close(ll.weight.norm(dim=1), torch.ones(50))
    # The input of the last layer is l2-normalised.
    feats: list[torch.Tensor] = []
    ll.register_forward_hook(lambda m, i, o: feats.append(i[0]))
    h(torch.randn(3, 10))
    torch.testing.assert_close(feats[0].norm(dim=1), torch.ones(3))
    # norm_last_layer=False learns the norm too; BN variant inserts BatchNorm1d.
    free = DINOHead(10, 50, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    assert free.last_layer.weight_g.requires_grad
    bn = DINOHead(10, 50, hidden_dim=16, bottleneck_dim=8, use_bn=True)
    assert [type(x).__name__ for x in bn.mlp].count("BatchNorm1d") == 2


def test_head_survives_state_dict_safetensors_and_deepcopy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    h = DINOHead(10, 50, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    with torch.no_grad():
        h.last_layer.weight_g.mul_(3.0)
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(h.state_dict())
    save_file(h.state_dict(), str(tmp_path / "h.safetensors"))
    h2 = DINOHead(10, 50, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    h2.load_state_dict(load_file(str(tmp_path / "h.safetensors")))
    x = torch.randn(4, 10)
    torch.testing.assert_close(h2(x), h(x))
    torch.testing.assert_close(copy.deepcopy(h)(x), h(x))
    torch.testing.assert_close(h2.last_layer.weight.norm(dim=1), torch.full((50,), 3.0))


# -- the method --------------------------------------------------------------------------------


def _dino(
    size: int = 16, backbone: str = "test_resnet", drop_path: float | None = None, **opts: Any
) -> DINO:
    small = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2}
    sets = [f"method.{k}={v}" for k, v in {**small, **opts}.items()]
    cls, run, cfg = api.resolve_config("dino", sets=[f"backbone.name={backbone}", *sets])
    dp = run.backbone.drop_path_rate if drop_path is None else drop_path
    spec = make_spec(backbone, size, drop_path_rate=dp)
    return cls(cfg, spec.build())


def _batch(m: DINO, b: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, s.size, s.size, generator=g) for s in expand(m.views())]
    return Batch(views=views, index=torch.arange(b))


def _info(step: int, spe: int = 4, total: int = 100) -> StepInfo:
    return StepInfo(step=step, epoch=step // spe, total_steps=total, steps_per_epoch=spe)


def test_recipe_is_the_official_one() -> None:
    _, run, cfg = api.resolve_config("dino", overrides={"backbone": {"name": "vit-s"}})
    o, s = run.optim, run.schedule
    assert (o.name, o.lr, o.lr_scaling, o.weight_decay) == ("adamw", 5e-4, "linear", 0.04)
    assert (o.grad_clip, o.grad_clip_mode) == (3.0, "per_tensor")
    assert (s.warmup_epochs, s.weight_decay_end) == (None, 0.4)  # None: the built-in default
    assert DINO.recipe_for("vit-s").schedule["warmup_epochs"] == 10
    assert s.final_lr_fraction * 5e-4 == pytest.approx(1e-6)
    assert run.backbone.drop_path_rate == 0.1
    assert (cfg.out_dim, cfg.teacher_temp, cfg.momentum_teacher, cfg.freeze_last_layer) == (
        65536,
        0.04,
        0.996,
        1,
    )
    # ConvNets (the default resnet18 too) get the README's ResNet-50 command: SGD lr 0.03,
    # constant weight decay 1e-4, no stochastic depth.
    for backbone in ("resnet18", "resnet50", "test_resnet"):
        _, run, _ = api.resolve_config("dino", overrides={"backbone": {"name": backbone}})
        o, s = run.optim, run.schedule
        assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.03, 0.9, 1e-4)
        assert (o.grad_clip, o.grad_clip_mode) == (3.0, "per_tensor")
        assert s.weight_decay_end == 1e-4 and s.final_lr_fraction * 0.03 == pytest.approx(1e-6)
        assert run.backbone.drop_path_rate == 0.0
    # A flag, a file or --set that names the backbone decides, whatever came before.
    _, run, _ = api.resolve_config("dino", sets=["backbone.name=test_vit"])
    assert run.optim.name == "adamw"


def test_views_per_family() -> None:
    vit = _dino(size=32, backbone="test_vit", local_crops_number=8)
    g1, g2, loc = vit.views()
    assert (g1.size, g1.scale, g1.blur_p, g1.solarize_p) == (32, (0.4, 1.0), 1.0, 0.0)
    assert (g2.size, g2.scale, g2.blur_p, g2.solarize_p) == (32, (0.4, 1.0), 0.1, 0.2)
    assert (loc.count, loc.size, loc.scale, loc.blur_p) == (8, 12, (0.05, 0.4), 0.5)
    assert (g1.brightness, g1.contrast, g1.saturation, g1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert g1.interpolation == "bicubic" and g1.normalize
    cnn = _dino(size=32)
    assert cnn.views()[0].scale == (0.14, 1.0) and cnn.views()[2].scale == (0.05, 0.14)
    assert cnn.views()[2].size == 14
    assert len(_dino(local_crops_number=0).views()) == 2


def test_teacher_is_a_frozen_copy_without_drop_path() -> None:
    m = _dino(drop_path=0.1)
    student_dp = [x.drop_prob for x in m.backbone.modules() if isinstance(x, DropPath)]
    teacher_dp = [x.drop_prob for x in m.teacher_backbone.modules() if isinstance(x, DropPath)]
    assert student_dp and max(student_dp) > 0 and teacher_dp == [0.0] * len(student_dp)
    assert not any(p.requires_grad for p in m.teacher_backbone.parameters())
    assert not any(p.requires_grad for p in m.teacher_head.parameters())
    for a, b in zip(
        m.backbone.state_dict().values(), m.teacher_backbone.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    assert m.encoder() is m.teacher_backbone
    assert list(m.export_candidates()) == ["teacher", "student"]


def test_step_centre_and_teacher_sees_only_globals() -> None:
    m = _dino()
    seen: list[int] = []
    m.teacher_backbone.register_forward_hook(lambda mod, i, o: seen.append(i[0].shape[0]))
    batch = _batch(m, b=4)
    with torch.no_grad():
        t_out = m.teacher_head(m.teacher_backbone(torch.cat(batch.views[:2])))
    seen.clear()
    c0 = m.center.clone()
    out = m.training_step(batch, _info(0))
    assert seen == [8]  # one call, 2 global crops x 4 images
    torch.testing.assert_close(m.center, 0.9 * c0 + 0.1 * t_out.mean(0, keepdim=True))
    assert out.logs["teacher_temp"] == pytest.approx(0.04)
    out.loss.backward()
    assert all(p.grad is None for p in m.teacher_backbone.parameters())


def test_last_layer_frozen_during_the_first_epochs() -> None:
    m = _dino(freeze_last_layer=1)
    for step, frozen in [(0, True), (3, True), (4, False)]:  # 4 steps per epoch
        m.zero_grad(set_to_none=True)
        m.training_step(_batch(m), _info(step)).loss.backward()
        assert m.head.last_layer.weight_v.grad is not None
        m.before_optimizer_step(_info(step))
        assert (m.head.last_layer.weight_v.grad is None) == frozen
        assert m.head.mlp[0].weight.grad is not None


def test_ema_update_after_the_optimizer_step() -> None:
    m = _dino()
    with torch.no_grad():
        for p in m.head.parameters():
            p.add_(torch.randn_like(p))
    t_before = [p.clone() for p in m.teacher_head.parameters()]
    s_now = [p.detach().clone() for p in m.head.parameters()]
    info = _info(10, total=40)
    mom = cosine_momentum(10, 40, 0.996)
    m.after_optimizer_step(info)
    for t, t0, s in zip(m.teacher_head.parameters(), t_before, s_now, strict=True):
        torch.testing.assert_close(t, mom * t0 + (1 - mom) * s)


def test_vit_small_images_run() -> None:
    m = _dino(size=32, backbone="test_vit")
    out = m.training_step(_batch(m, b=2), _info(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert m.backbone.patch_embed.patch_size == (4, 4)


_WORKER = """
import sys, torch, torch.distributed as tdist
from sslcli_plugins.dino import update_center
tdist.init_process_group("gloo")
rank, world = tdist.get_rank(), tdist.get_world_size()
t = torch.load(sys.argv[1])
n = t.shape[0] // world
c = torch.ones(1, t.shape[1])
update_center(c, t[rank * n : (rank + 1) * n], 0.9)
torch.save(c, sys.argv[2] + str(rank))
tdist.destroy_process_group()
"""


def test_center_is_averaged_over_processes(tmp_path: Path) -> None:
    """Every process ends with the centre of the whole global batch (2 gloo processes)."""
    t = torch.randn(8, 5)
    torch.save(t, tmp_path / "t.pt")
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1")  # fmt: skip
        args = [str(tmp_path / "t.pt"), str(tmp_path / "c")]
        procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, *args], env=env))
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    want = 0.9 * torch.ones(1, 5) + 0.1 * t.mean(0, keepdim=True)
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"c{r}"), want)
