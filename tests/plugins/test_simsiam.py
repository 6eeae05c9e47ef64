"""SimSiam: the loss against the paper's formula, the stop-gradient, the heads, and the
predictor's fixed learning rate through the engine."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from sslcli_plugins.simsiam import SimSiam, simsiam_predictor, simsiam_projector
from torch import nn

from sslcli import api
from sslcli.backbones import feature_dim, make_spec
from sslcli.engine.trainer import Trainer
from sslcli.method import StepInfo
from sslcli.nn import schedules
from sslcli.nn.regression import negative_cosine, simsiam_loss
from tests.helpers import TINY, build_method, two_view_batch

SMALL = ["method.proj_dim=32", "method.pred_hidden_dim=8"]
STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


def _method(*sets: str) -> SimSiam:
    m = build_method("simsiam", *SMALL, *sets)
    assert isinstance(m, SimSiam)
    return m


# -- the loss -------------------------------------------------------------------------------------


def _cos_reference(p: torch.Tensor, z: torch.Tensor) -> list[float]:
    out = []
    for b in range(p.shape[0]):
        dot = sum(float(p[b, d]) * float(z[b, d]) for d in range(p.shape[1]))
        np_ = math.sqrt(sum(float(v) ** 2 for v in p[b]))
        nz = math.sqrt(sum(float(v) ** 2 for v in z[b]))
        out.append(dot / (np_ * nz))
    return out


def test_negative_cosine_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    expected = torch.tensor([-c for c in _cos_reference(p, z)])
    assert torch.allclose(negative_cosine(p, z), expected, atol=1e-6)
    assert torch.allclose(negative_cosine(p, 3 * p), -torch.ones(5), atol=1e-6)


def test_simsiam_loss_is_half_the_sum_of_the_two_crossed_terms() -> None:
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(7, 5, generator=g) for _ in range(4))
    c12 = _cos_reference(p1, z2)
    c21 = _cos_reference(p2, z1)
    expected = -0.5 * (sum(c12) / len(c12)) - 0.5 * (sum(c21) / len(c21))
    assert math.isclose(float(simsiam_loss(p1, p2, z1, z2)), expected, rel_tol=1e-5)
    assert not math.isclose(float(simsiam_loss(p1, p2, z2, z1)), expected, rel_tol=1e-3)
    # The minimum is −1, reached when every prediction points along the other view's z.
    assert float(simsiam_loss(z2, z1, z1, z2)) == pytest.approx(-1.0, abs=1e-6)


def test_simsiam_loss_stops_the_gradient_of_z() -> None:
    g = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = (torch.randn(4, 3, generator=g).requires_grad_() for _ in range(4))
    simsiam_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and float(p1.grad.abs().sum()) > 0
    assert z1.grad is None and z2.grad is None


def test_method_gradient_flows_through_the_predictions_only() -> None:
    """The backbone's gradient equals that of −½[cos(p₁, z₂.detach()) + cos(p₂, z₁.detach())]
    computed by hand, and differs from the gradient without the stop-gradient."""
    m = _method()
    batch = two_view_batch(8)
    ref = copy.deepcopy(m)
    m.training_step(batch, STEP).loss.backward()
    got = [p.grad.clone() for p in m.backbone.parameters()]

    def manual(detach: bool) -> list[torch.Tensor]:
        r = copy.deepcopy(ref)
        x1, x2 = batch.views
        z1 = r.projector(r.backbone(x1))
        z2 = r.projector(r.backbone(x2))
        p1, p2 = r.predictor(z1), r.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        loss = -0.5 * (
            F.cosine_similarity(p1, t2, dim=1).mean() + F.cosine_similarity(p2, t1, dim=1).mean()
        )
        loss.backward()
        return [p.grad for p in r.backbone.parameters()]

    with_sg, without_sg = manual(True), manual(False)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, with_sg, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, without_sg, strict=True))


# -- the networks ---------------------------------------------------------------------------------


def test_projector_and_predictor_have_the_official_layers() -> None:
    proj = simsiam_projector(512, 512, 2048, 3)
    kinds = [type(x) for x in proj]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [x for x in proj if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [
        (512, 512),
        (512, 512),
        (512, 2048),
    ]
    assert all(x.bias is None for x in linears)
    assert not proj[-1].affine and proj[1].affine and proj[4].affine
    assert len(simsiam_projector(512, 512, 2048, 2)) == 5  # CIFAR: one hidden layer
    pred = simsiam_predictor(2048, 512)
    assert [type(x) for x in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (pred[0].in_features, pred[0].out_features, pred[0].bias) == (2048, 512, None)
    assert (pred[3].in_features, pred[3].out_features) == (512, 2048)
    assert pred[3].bias is not None
    # Defaults: hidden width = the encoder's feature width, d = 2048, bottleneck 512.
    m = SimSiam(SimSiam.Config(), make_spec("test_resnet", 16).build())
    width = feature_dim(m.backbone)
    assert m.projector[0].in_features == width and m.projector[0].out_features == width
    assert m.projector[6].out_features == 2048 and m.predictor[0].out_features == 512


def test_views_are_moco_v2s_augmentation() -> None:
    (v,) = _method().views()
    assert v.count == 2 and v.scale == (0.2, 1.0) and v.size == 16
    assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.4, 0.1)
    assert (v.jitter_p, v.grayscale_p, v.blur_p, v.solarize_p) == (0.8, 0.2, 0.5, 0.0)
    assert v.blur_sigma == (0.1, 2.0) and v.normalize
    assert _method("method.blur_p=0").views()[0].blur_p == 0.0


def test_embedding_is_the_normalised_projection_so_collapse_shows_as_zero_std() -> None:
    m = _method()
    batch = two_view_batch(8)
    ref = copy.deepcopy(m)
    out = m.training_step(batch, STEP)
    with torch.no_grad():
        z1 = F.normalize(ref.projector(ref.backbone(batch.views[0])), dim=1)
    assert out.embedding is not None
    assert torch.allclose(out.embedding, z1, atol=1e-5)
    # A healthy projection has per-dimension std near 1/sqrt(d); a collapsed one has 0.
    assert float(out.embedding.std(dim=0).mean()) > 0.3 / math.sqrt(32)
    with torch.no_grad():
        for x in m.backbone.parameters():
            x.zero_()
    collapsed = m.training_step(batch, STEP).embedding
    assert collapsed is not None and float(collapsed.std(dim=0).max()) < 1e-5


# -- the predictor's fixed learning rate, through the engine --------------------------------------


def _trainer(tmp: Path, *sets: str) -> Trainer:
    o: dict[str, Any] = copy.deepcopy(TINY)
    o["trainer"].update(out=str(tmp), max_steps=None, epochs=2)
    cls, run, mcfg = api.resolve_config("simsiam", overrides=o, sets=[*SMALL, *sets])
    return Trainer(run, cls, mcfg)


def test_engine_keeps_the_predictor_lr_while_the_encoder_lr_decays(tmp_path: Path) -> None:
    tr = _trainer(tmp_path)
    m = tr.method
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert set(groups) == {"encoder", "predictor"}
    assert groups["predictor"]["fixed_lr"] and not groups["encoder"]["fixed_lr"]
    # Every trainable parameter in exactly one group; the predictor's group is the predictor.
    ids = [id(p) for g in tr.optimizer.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters() if p.requires_grad)
    assert {id(p) for p in groups["predictor"]["params"]} == {
        id(p) for p in m.predictor.parameters()
    }
    # Both groups decay weights (official SGD over all parameters).
    assert groups["encoder"]["weight_decay"] == groups["predictor"]["weight_decay"] == 1e-4
    base = tr.base_lr
    assert base == pytest.approx(0.05 * 8 / 256)
    total = tr.total_steps
    assert tr.warmup_steps == 0
    for step in (0, total // 3, total // 2, total - 1):
        tr.schedule.apply(tr.optimizer, step)
        expected = base * schedules.warmup_cosine(step, total, 0)
        assert groups["encoder"]["lr"] == pytest.approx(expected)
        assert groups["predictor"]["lr"] == pytest.approx(base)
    assert groups["encoder"]["lr"] < 0.01 * base  # the encoder has decayed, the predictor not


def test_without_fix_pred_lr_everything_follows_the_schedule(tmp_path: Path) -> None:
    m = _method("method.fix_pred_lr=false")
    assert m.param_groups() is None  # the engine's default grouping
    tr = _trainer(tmp_path, "method.fix_pred_lr=false")
    tr.schedule.apply(tr.optimizer, tr.total_steps - 1)
    assert all(g["lr"] < 0.01 * tr.base_lr for g in tr.optimizer.param_groups)


def test_class_recipe_has_no_warm_up() -> None:
    """main_simsiam.py: cosine from the first epoch (what bare ``ssl train simsiam``
    resolves to is in test_recipes.py)."""
    assert SimSiam.recipe.schedule["warmup_epochs"] == 0
