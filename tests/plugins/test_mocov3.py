"""MoCo v3: ctr loss (2τ scaling, rank offsets), momentum schedule and order, heads by
backbone, and the ViT helpers (sin-cos position embedding, frozen patch projection)."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from sslcli_plugins.mocov3 import MoCoV3, ctr_loss, moco_v3_mlp, momentum_at
from torch import nn

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.engine.trainer import Trainer
from sslcli.method import StepInfo
from sslcli.nn import dist
from sslcli.nn.vit import (
    freeze_patch_projection_,
    moco_v3_init_,
    sincos_2d_table,
    use_sincos_pos_embed_,
)
from tests.helpers import TINY, build_method, two_view_batch

SMALL = ["method.mlp_dim=32", "method.proj_dim=16"]
STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


def _method(backbone: str = "test_resnet", size: int = 16, *sets: str) -> MoCoV3:
    m = build_method("moco-v3", *SMALL, *sets, backbone=backbone, size=size)
    assert isinstance(m, MoCoV3)
    return m


# -- the contrastive loss -------------------------------------------------------------------------


def _ctr_reference(q: torch.Tensor, k_all: torch.Tensor, offset: int, tau: float) -> float:
    """mean_i −log softmax_j(n(q_i)·n(k_j)/τ)[i + offset] · 2τ, with explicit loops."""

    def unit(v: torch.Tensor) -> list[float]:
        n = math.sqrt(sum(float(x) ** 2 for x in v))
        return [float(x) / n for x in v]

    qs = [unit(r) for r in q]
    ks = [unit(r) for r in k_all]
    total = 0.0
    for i, qi in enumerate(qs):
        logits = [sum(a * b for a, b in zip(qi, kj, strict=True)) / tau for kj in ks]
        log_z = math.log(sum(math.exp(v) for v in logits))
        total += log_z - logits[i + offset]
    return total / len(qs) * 2 * tau


def test_ctr_loss_matches_the_formula_with_the_2tau_factor() -> None:
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    for tau in (0.2, 1.0):
        loss, logits, labels = ctr_loss(q, k, tau)
        assert math.isclose(float(loss), _ctr_reference(q, k, 0, tau), rel_tol=1e-5)
        assert torch.equal(labels, torch.arange(6))
        # Without the 2τ factor it is plain cross entropy over the scaled cosine logits.
        plain = F.cross_entropy(F.normalize(q) @ F.normalize(k).T / tau, torch.arange(6))
        assert math.isclose(float(loss) / (2 * tau), float(plain), rel_tol=1e-5)
        assert logits.shape == (6, 6)


def test_ctr_loss_gives_the_keys_no_gradient_and_the_queries_one() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 3, generator=g).requires_grad_()
    k = torch.randn(4, 3, generator=g).requires_grad_()
    ctr_loss(q, k, 0.2)[0].backward()
    assert q.grad is not None and float(q.grad.abs().sum()) > 0
    assert k.grad is None  # the gathered keys are computed without gradient


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_ctr_loss_labels_are_offset_by_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    """Simulate process ``rank`` of 3: the gathered keys are every process's keys in rank
    order, and the positive of local row i is global row i + B·rank."""
    g = torch.Generator().manual_seed(2)
    b, world = 4, 3
    keys = [torch.randn(b, 5, generator=g) for _ in range(world)]
    q = torch.randn(b, 5, generator=g)
    calls: list[torch.Tensor] = []

    def fake_gather(x: torch.Tensor) -> torch.Tensor:
        calls.append(x)
        parts = [F.normalize(k, dim=1) for k in keys]
        parts[rank] = x  # our own keys, as the method passes them
        return torch.cat(parts)

    monkeypatch.setattr(dist, "rank", lambda: rank)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    monkeypatch.setattr(dist, "gather", fake_gather)
    loss, logits, labels = ctr_loss(q, keys[rank], 0.2)
    assert len(calls) == 1 and calls[0].shape == (b, 5)
    assert torch.equal(labels, torch.arange(b) + b * rank)
    assert logits.shape == (b, b * world)
    expected = _ctr_reference(q, torch.cat(keys), b * rank, 0.2)
    assert math.isclose(float(loss), expected, rel_tol=1e-5)
    # With the offset ignored (labels = arange) the value would differ.
    if rank:
        assert not math.isclose(
            float(loss), _ctr_reference(q, torch.cat(keys), 0, 0.2), rel_tol=1e-3
        )


# -- the momentum schedule and its place in the step ----------------------------------------------


def test_momentum_is_a_half_cosine_from_m0_to_one() -> None:
    K = 400
    for k in (0, 1, 100, 200, 399, 400):
        expected = 1 - 0.5 * (1 + math.cos(math.pi * k / K)) * (1 - 0.99)
        assert momentum_at(k, K, 0.99) == pytest.approx(expected, abs=1e-12)
    assert momentum_at(0, K, 0.99) == pytest.approx(0.99)
    assert momentum_at(K, K, 0.99) == pytest.approx(1.0)
    assert momentum_at(123, K, 0.99, cosine=False) == 0.99


def test_momentum_update_happens_before_the_keys() -> None:
    m = _method("test_resnet", 16, "method.momentum=0.5", "method.momentum_cosine=false")
    with torch.no_grad():  # make the two encoders differ so the order is visible
        for p in m.momentum_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    old_mom = copy.deepcopy(m.momentum_encoder)
    base = nn.Sequential(copy.deepcopy(m.backbone), copy.deepcopy(m.projector))
    pred = copy.deepcopy(m.predictor)
    batch = two_view_batch(8)
    out = m.training_step(batch, STEP)
    # θ_k ← 0.5·θ_k + 0.5·θ_q, once, over backbone + projector only.
    for pk, po, pq in zip(
        m.momentum_encoder.parameters(), old_mom.parameters(), base.parameters(), strict=True
    ):
        assert torch.allclose(pk, 0.5 * po + 0.5 * pq, atol=1e-6)
    x1, x2 = batch.views
    new_mom = copy.deepcopy(m.momentum_encoder)
    with torch.no_grad():
        q1, q2 = pred(base(x1)), pred(base(x2))
        k1_new, k2_new = new_mom(x1), new_mom(x2)
        k1_old, k2_old = old_mom(x1), old_mom(x2)
    tau = 1.0  # ResNet default
    expected = _ctr_reference(q1, k2_new, 0, tau) + _ctr_reference(q2, k1_new, 0, tau)
    stale = _ctr_reference(q1, k2_old, 0, tau) + _ctr_reference(q2, k1_old, 0, tau)
    assert math.isclose(float(out.loss.detach()), expected, rel_tol=1e-4)
    assert not math.isclose(float(out.loss.detach()), stale, rel_tol=1e-4)


def test_momentum_encoder_is_frozen_and_has_no_predictor() -> None:
    m = _method()
    assert set(dict(m.momentum_encoder.named_children())) == {"backbone", "projector"}
    assert all(not p.requires_grad for p in m.momentum_encoder.parameters())
    m.training_step(two_view_batch(8), STEP).loss.backward()
    assert all(p.grad is None for p in m.momentum_encoder.parameters())
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert list(m.export_candidates()) == ["backbone", "momentum_backbone"]


# -- heads and per-backbone defaults --------------------------------------------------------------


def _layout(mlp: nn.Module) -> list[str]:
    out = []
    for x in mlp:
        if isinstance(x, nn.Linear):
            assert x.bias is None
            out.append(f"L{x.out_features}")
        elif isinstance(x, nn.BatchNorm1d):
            out.append("BN" if x.affine else "BN0")
        else:
            out.append(type(x).__name__)
    return out


def test_resnet_and_vit_heads_and_defaults() -> None:
    r = MoCoV3(MoCoV3.Config(), make_spec("test_resnet", 16).build())
    assert _layout(r.projector) == ["L4096", "BN", "ReLU", "L256", "BN0"]
    assert _layout(r.predictor) == ["L4096", "BN", "ReLU", "L256"]
    assert r.temperature == 1.0 and r.crop_min_scale == 0.2 and not r.is_vit
    v = MoCoV3(MoCoV3.Config(), make_spec("test_vit", 16).build())
    assert _layout(v.projector) == ["L4096", "BN", "ReLU", "L4096", "BN", "ReLU", "L256", "BN0"]
    assert _layout(v.predictor) == ["L4096", "BN", "ReLU", "L256", "BN0"]
    assert v.temperature == 0.2 and v.crop_min_scale == 0.08 and v.is_vit
    # Explicit values win over the per-backbone defaults.
    cfg = MoCoV3.Config(temperature=0.5, crop_min_scale=0.3, proj_layers=2)
    e = MoCoV3(cfg, make_spec("test_vit", 16).build())
    assert e.temperature == 0.5 and e.crop_min_scale == 0.3
    assert _layout(e.projector)[-2:] == ["L256", "BN0"] and len(e.projector) == 5
    assert moco_v3_mlp(8, 16, 4, 1, last_bn=False)[0].in_features == 8


def test_views_are_byols_asymmetric_pair_with_the_backbone_crop() -> None:
    v1, v2 = _method().views()
    assert (v1.blur_p, v2.blur_p, v1.solarize_p, v2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
    assert v1.scale == (0.2, 1.0) and v1.interpolation == "bilinear"
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == (0.4, 0.4, 0.2, 0.1)
    w1, _ = _method("test_vit", 16).views()
    assert w1.scale == (0.08, 1.0)


# -- ViT helpers ----------------------------------------------------------------------------------


def test_sincos_table_matches_the_formula() -> None:
    h, w, dim, temp = 3, 4, 8, 10000.0
    table = sincos_2d_table(h, w, dim, temp)
    assert table.shape == (h * w, dim)
    quarter = dim // 4
    for r in range(h):
        for c in range(w):
            row = table[r * w + c]
            for d in range(quarter):
                omega = 1.0 / temp ** (d / quarter)
                assert float(row[d]) == pytest.approx(math.sin(r * omega), abs=1e-6)
                assert float(row[quarter + d]) == pytest.approx(math.cos(r * omega), abs=1e-6)
                assert float(row[2 * quarter + d]) == pytest.approx(math.sin(c * omega), abs=1e-6)
                assert float(row[3 * quarter + d]) == pytest.approx(math.cos(c * omega), abs=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_table(2, 2, 6)


def _vit(size: int = 32) -> nn.Module:
    return make_spec("test_vit", size).build()


def test_sincos_pos_embed_is_installed_fixed_with_a_zero_class_row() -> None:
    vit = _vit(32)
    use_sincos_pos_embed_(vit)
    pos = vit.pos_embed
    assert isinstance(pos, nn.Parameter) and not pos.requires_grad
    gh, gw = vit.patch_embed.grid_size
    assert pos.shape == (1, 1 + gh * gw, vit.embed_dim)
    assert torch.equal(pos[0, 0], torch.zeros(vit.embed_dim))
    assert torch.allclose(pos[0, 1:], sincos_2d_table(gh, gw, vit.embed_dim))
    assert "pos_embed" in vit.state_dict()


def test_patch_projection_is_frozen_and_the_moco_init_bounds_hold() -> None:
    vit = _vit(32)
    moco_v3_init_(vit)
    freeze_patch_projection_(vit)
    proj = vit.patch_embed.proj
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    d = vit.embed_dim
    c, p = proj.weight.shape[1], proj.weight.shape[2]
    bound = math.sqrt(6 / (c * p * p + d))
    assert float(proj.weight.abs().max()) <= bound and float(proj.weight.abs().max()) > 0.8 * bound
    assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    qkv = vit.blocks[0].attn.qkv
    qkv_bound = math.sqrt(6 / (d + d))  # Q, K, V as three separate D x D matrices
    assert 0.8 * qkv_bound < float(qkv.weight.detach().abs().max()) <= qkv_bound
    assert torch.equal(qkv.bias, torch.zeros_like(qkv.bias))
    fc1 = vit.blocks[0].mlp.fc1
    fc1_bound = math.sqrt(6 / (fc1.in_features + fc1.out_features))
    assert 0.8 * fc1_bound < float(fc1.weight.detach().abs().max()) <= fc1_bound
    assert float(vit.cls_token.detach().abs().max()) < 1e-4


def test_vit_training_step_leaves_pos_embed_and_patch_projection_untouched(tmp_path: Path) -> None:
    o: dict[str, Any] = copy.deepcopy(TINY)
    o["backbone"] = {"name": "test_vit"}
    o["data"] = {"image_size": 32}
    o["trainer"].update(out=str(tmp_path))
    o["optim"] = {"lr": 1e-2}  # large enough that any leak would show
    o["schedule"] = {"warmup_epochs": 0}
    cls, run, mcfg = api.resolve_config("moco-v3", overrides=o, sets=SMALL)
    tr = Trainer(run, cls, mcfg)
    m = tr.method
    assert isinstance(m, MoCoV3) and m.is_vit
    frozen = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    before = {n: p.clone() for n, p in m.backbone.named_parameters()}
    assert {n for n, p in m.backbone.named_parameters() if not p.requires_grad} == frozen
    assert tr.train_step(*next(iter(tr.batches.epoch(0, 0))))[1]
    for n, p in m.backbone.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, before[n]), n
        else:
            assert p.grad is not None, n
    assert not torch.equal(m.backbone.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    # Not in the optimiser at all (so no weight decay either).
    in_optim = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert all(id(dict(m.backbone.named_parameters())[n]) not in in_optim for n in frozen)


def test_options_turn_the_vit_tricks_off() -> None:
    m = _method("test_vit", 32, "method.fixed_pos_embed=false", "method.freeze_patch_embed=false")
    assert m.backbone.pos_embed.requires_grad and m.backbone.patch_embed.proj.weight.requires_grad
    m = _method("test_vit", 32)
    assert not m.backbone.pos_embed.requires_grad
    assert not m.momentum_encoder.backbone.pos_embed.requires_grad
    assert torch.equal(m.momentum_encoder.backbone.pos_embed, m.backbone.pos_embed)


def test_fixed_pos_embed_works_for_smaller_crops_and_matches_plain_timm() -> None:
    """dynamic_img_size: a 16 px crop of a 32 px ViT (4x4 of the 8x8 grid) runs, takes no
    gradient into the table, and gives what plain timm computes from the saved weights."""
    m = _method("test_vit", 32)
    vit = m.backbone
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    y = vit(x)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert vit.pos_embed.grad is None and x.grad is not None
    spec = vit.sslcli_spec
    plain = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.kwargs)
    plain.load_state_dict(vit.state_dict(), strict=True)
    vit.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(vit(x), plain(x), atol=1e-6)


# -- recipes --------------------------------------------------------------------------------------


def test_class_recipe_per_backbone_family() -> None:
    """The class recipe per backbone family, as the official code: ViTs warm up for 40
    epochs, ResNets (the default resnet18 too) for 10, then cosine. What bare ``ssl train
    moco-v3`` resolves to is in test_recipes.py."""
    assert MoCoV3.recipe_for("vit-s").schedule["warmup_epochs"] == 40
    assert MoCoV3.recipe_for("resnet18").schedule == {"kind": "cosine", "warmup_epochs": 10}
