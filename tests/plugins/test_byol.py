"""BYOL: the loss against the paper's formula, the τ schedule, the EMA after the step."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from sslcli_plugins.byol import BYOL, byol_head
from torch import nn

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.data.views import asymmetric_views
from sslcli.engine.trainer import Trainer
from sslcli.method import StepInfo
from sslcli.nn import cosine_momentum
from sslcli.nn.regression import byol_loss, normalized_mse
from tests.helpers import TINY, build_method, two_view_batch

SMALL = ["method.proj_hidden_dim=64", "method.proj_dim=16", "method.pred_hidden_dim=64"]


def _method(*sets: str) -> BYOL:
    m = build_method("byol", *SMALL, *sets)
    assert isinstance(m, BYOL)
    return m


# -- the loss -------------------------------------------------------------------------------------


def _nmse_reference(p: torch.Tensor, z: torch.Tensor) -> list[float]:
    """‖p/‖p‖ − z/‖z‖‖² per row, with explicit loops."""
    out = []
    for b in range(p.shape[0]):
        np_ = math.sqrt(sum(float(v) ** 2 for v in p[b]))
        nz = math.sqrt(sum(float(v) ** 2 for v in z[b]))
        out.append(
            sum((float(p[b, d]) / np_ - float(z[b, d]) / nz) ** 2 for d in range(p.shape[1]))
        )
    return out


def test_normalized_mse_matches_the_formula_and_two_minus_two_cos() -> None:
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g) * 3
    got = normalized_mse(p, z)
    assert got.shape == (5,)
    assert torch.allclose(got, torch.tensor(_nmse_reference(p, z)), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(p, z, dim=1)
    assert torch.allclose(got, 2 - 2 * cos, atol=1e-5)
    # Scale-invariant in both arguments; 0 for parallel vectors, 4 for opposite ones.
    assert torch.allclose(normalized_mse(5 * p, 0.1 * z), got, atol=1e-5)
    assert torch.allclose(normalized_mse(p, 2 * p), torch.zeros(5), atol=1e-6)
    assert torch.allclose(normalized_mse(p, -p), torch.full((5,), 4.0), atol=1e-5)


def test_byol_loss_pairs_each_prediction_with_the_other_views_target() -> None:
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(6, 4, generator=g) for _ in range(4))
    ref = [a + b for a, b in zip(_nmse_reference(p1, z2), _nmse_reference(p2, z1), strict=True)]
    expected = sum(ref) / len(ref)
    assert math.isclose(float(byol_loss(p1, p2, z1, z2)), expected, rel_tol=1e-5)
    # Swapping the targets (a same-view pairing) gives a different value.
    assert not math.isclose(float(byol_loss(p1, p2, z2, z1)), expected, rel_tol=1e-3)


def test_byol_loss_stops_the_gradient_of_the_targets() -> None:
    g = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = (torch.randn(4, 3, generator=g).requires_grad_() for _ in range(4))
    byol_loss(p1, p2, z1, z2).backward()
    assert p1.grad is not None and p2.grad is not None
    assert float(p1.grad.abs().sum()) > 0
    assert z1.grad is None and z2.grad is None


# -- the τ schedule -------------------------------------------------------------------------------


def test_target_momentum_is_the_papers_cosine() -> None:
    K = 1000
    for k in (0, 1, 10, 250, 500, 999, 1000):
        expected = 1 - (1 - 0.996) * (math.cos(math.pi * k / K) + 1) / 2
        assert math.isclose(cosine_momentum(k, K, 0.996), expected, rel_tol=0, abs_tol=1e-12)
    assert cosine_momentum(0, K, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(K // 2, K, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(K, K, 0.99) == pytest.approx(1.0)
    values = [cosine_momentum(k, K, 0.99) for k in range(0, K + 1, 50)]
    assert values == sorted(values)


# -- the networks ---------------------------------------------------------------------------------


def test_heads_are_linear_bn_relu_linear_with_the_official_biases() -> None:
    head = byol_head(32, 4096, 256)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (linears[0].in_features, linears[0].out_features) == (32, 4096)
    assert (linears[1].in_features, linears[1].out_features) == (4096, 256)
    assert linears[0].bias is not None and linears[1].bias is None
    m = BYOL(BYOL.Config(), make_spec("test_resnet", 16).build())
    assert m.projector[0].out_features == 4096 and m.projector[-1].out_features == 256
    assert m.predictor[0].in_features == 256 and m.predictor[-1].out_features == 256
    # The target is encoder + projector only, frozen, and starts equal to the online network.
    assert set(dict(m.target.named_children())) == {"backbone", "projector"}
    assert all(not p.requires_grad for p in m.target.parameters())
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    assert all(torch.equal(a, b) for a, b in zip(m.target.parameters(), online, strict=True))


def test_views_are_byols_asymmetric_pair() -> None:
    m = _method()
    v1, v2 = m.views()
    assert (v1.count, v2.count) == (1, 1)
    assert (v1.blur_p, v2.blur_p) == (1.0, 0.1)
    assert (v1.solarize_p, v2.solarize_p) == (0.0, 0.2)
    for v in (v1, v2):
        assert (v.brightness, v.contrast, v.saturation, v.hue) == (0.4, 0.4, 0.2, 0.1)
        assert (v.jitter_p, v.grayscale_p, v.flip_p) == (0.8, 0.2, 0.5)
        assert v.scale == (0.08, 1.0) and v.size == 16 and v.normalize
        assert v.interpolation == "bicubic"
    cifar = _method("method.blur_p=[0,0]").views()
    assert [v.blur_p for v in cifar] == [0.0, 0.0]
    assert asymmetric_views(32, 0.2)[0].scale == (0.2, 1.0)


def test_target_runs_in_training_mode_and_keeps_its_own_bn_statistics() -> None:
    m = _method()
    m.train()
    bn_t = next(x for x in m.target.modules() if isinstance(x, nn.BatchNorm1d))
    bn_o = next(x for x in m.projector.modules() if isinstance(x, nn.BatchNorm1d))
    batch = two_view_batch(8)
    m.training_step(batch, StepInfo(0, 0, 10, 10))
    # One forward per view on each side: two batches of statistics each.
    assert int(bn_t.num_batches_tracked) == 2 and int(bn_o.num_batches_tracked) == 2
    assert not torch.equal(bn_t.running_mean, torch.zeros_like(bn_t.running_mean))
    # Batch statistics: the target's output for a sample depends on the rest of the batch.
    x = batch.views[0]
    with torch.no_grad():
        whole = m.target(x)[:4]
        half = m.target(x[:4])
    assert not torch.allclose(whole, half, atol=1e-4)


def test_training_step_loss_equals_the_formula_on_the_networks_outputs() -> None:
    m = _method()
    batch = two_view_batch(8)
    ref_online = copy.deepcopy(nn.ModuleDict({"b": m.backbone, "g": m.projector, "q": m.predictor}))
    ref_target = copy.deepcopy(m.target)
    out = m.training_step(batch, StepInfo(0, 0, 10, 10))
    x1, x2 = batch.views
    with torch.no_grad():
        p1 = ref_online["q"](ref_online["g"](ref_online["b"](x1)))
        p2 = ref_online["q"](ref_online["g"](ref_online["b"](x2)))
        t1, t2 = ref_target(x1), ref_target(x2)
    ref = [a + b for a, b in zip(_nmse_reference(p1, t2), _nmse_reference(p2, t1), strict=True)]
    assert math.isclose(float(out.loss.detach()), sum(ref) / len(ref), rel_tol=1e-4)
    assert out.embedding is not None and out.embedding.shape == (8, 16)


# -- the EMA, applied after the optimiser step (through the engine) -------------------------------


def _trainer(tmp: Path, **method: Any) -> Trainer:
    o: dict[str, Any] = copy.deepcopy(TINY)
    o["trainer"].update(out=str(tmp), log_every=1)
    o["schedule"] = {"warmup_epochs": 0}
    o["optim"] = {"name": "sgd", "lr": 2.0, "weight_decay": 0.0}
    o["method"] = {"proj_hidden_dim": 64, "proj_dim": 16, "pred_hidden_dim": 64, **method}
    cls, run, mcfg = api.resolve_config("byol", overrides=o)
    return Trainer(run, cls, mcfg)


def test_engine_updates_the_target_after_the_optimizer_with_the_steps_tau(tmp_path: Path) -> None:
    tr = _trainer(tmp_path, base_momentum=0.5)
    m = tr.method
    assert isinstance(m, BYOL)

    def online() -> list[torch.Tensor]:
        return list(m.backbone.parameters()) + list(m.projector.parameters())

    batches = iter(tr.batches.epoch(0, 0))
    for k in (0, 1):
        tr.step = k  # what fit() does between steps
        target_before = [p.clone() for p in m.target.parameters()]
        online_before = [p.clone() for p in online()]
        _, ok = tr.train_step(*next(batches))
        assert ok
        tau = cosine_momentum(k, tr.total_steps, 0.5)
        assert tau == pytest.approx(0.5) if k == 0 else 0.5 < tau < 1
        moved = 0
        params = zip(m.target.parameters(), target_before, online_before, online(), strict=True)
        for t, t0, o0, o1 in params:
            # ξ ← τξ + (1 − τ)θ with θ the weights the optimiser has just written ...
            assert torch.allclose(t, tau * t0 + (1 - tau) * o1, atol=1e-6)
            if not torch.allclose(o0, o1, atol=1e-4):
                moved += 1
                # ... not the weights of before the step.
                assert not torch.allclose(t, tau * t0 + (1 - tau) * o0, atol=1e-6)
        assert moved > 0
    # The target never receives gradients; every online parameter does.
    assert all(p.grad is None for p in m.target.parameters())
    assert all(p.grad is not None for p in online() + list(m.predictor.parameters()))
