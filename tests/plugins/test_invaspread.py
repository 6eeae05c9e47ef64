"""InvaSpread: the coded loss, its one-sided stop-gradient, any batch size."""

from __future__ import annotations

import pytest
import torch
from sslcli_plugins.invaspread import InvaSpread, InvaSpreadConfig, invaspread_loss

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.method import Batch, StepInfo

STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


def _unit(*shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def _direct(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """BatchCriterion written out: anchors x_i, scored side sg(x_j), j over the 2B views."""
    x = torch.cat([z1, z2])
    n = x.shape[0]
    b = n // 2
    total = torch.zeros((), dtype=x.dtype)
    for i in range(n):
        p = i + b if i < b else i - b
        s = {j: torch.exp((x[i] * x[j].detach()).sum() / tau) for j in range(n) if j != i}
        d = sum(s.values())
        total = total + torch.log(s[p] / d)
        for j in s:
            if j != p:
                total = total + torch.log(1 - s[j] / d)
    return -total / n


@pytest.mark.parametrize("b", [1, 3, 8])
def test_loss_matches_the_official_formula(b: int) -> None:
    torch.manual_seed(b)
    z1, z2 = _unit(b, 6), _unit(b, 6)
    loss, _ = invaspread_loss(z1, z2, 0.1)
    assert loss.item() == pytest.approx(_direct(z1, z2, 0.1).item(), rel=1e-5)


def test_gradients_flow_only_through_the_anchor_side() -> None:
    torch.manual_seed(0)
    z1, z2 = _unit(4, 5), _unit(4, 5)
    a1, a2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    invaspread_loss(a1, a2, 0.1)[0].backward()
    d1, d2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    _direct(d1, d2, 0.1).backward()
    assert a1.grad is not None and a2.grad is not None
    torch.testing.assert_close(a1.grad, d1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a2.grad, d2.grad, rtol=1e-4, atol=1e-6)

    # The same loss with gradients through both sides has different gradients, so the
    # comparison above does tell the one-sided version apart.
    def two_sided(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        x = torch.cat([z1, z2])
        n, b = x.shape[0], x.shape[0] // 2
        sims = x @ x.T / 0.1
        eye = torch.eye(n, dtype=torch.bool)
        s = torch.exp(sims).masked_fill(eye, 0)
        d = s.sum(1, keepdim=True)
        partner = torch.cat([torch.arange(b) + b, torch.arange(b)])
        p = s / d
        pos = p[torch.arange(n), partner]
        neg_mask = ~eye
        neg_mask[torch.arange(n), partner] = False
        return -(pos.log().sum() + torch.log(1 - p[neg_mask]).sum()) / n

    t1, t2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    two = two_sided(t1, t2)
    assert two.item() == pytest.approx(_direct(z1, z2, 0.1).item(), rel=1e-6)
    two.backward()
    assert t1.grad is not None
    assert not torch.allclose(t1.grad, d1.grad, rtol=1e-3, atol=1e-5)


def test_extreme_similarities_stay_finite() -> None:
    # A negative identical to the anchor and a partner pointing away: P_ij close to 1.
    z1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    z2 = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]])
    loss, _ = invaspread_loss(z1, z2, 0.1)
    assert torch.isfinite(loss)
    # 1 − P ≈ 2e-9 is exact in fp64, so the direct version is the reference.
    assert loss.item() == pytest.approx(_direct(z1.double(), z2.double(), 0.1).item(), rel=1e-5)


def _method() -> InvaSpread:
    torch.manual_seed(0)
    return InvaSpread(InvaSpreadConfig(), make_spec("test_resnet", 16).build())


@pytest.mark.parametrize("b", [8, 5])
def test_step_works_for_any_batch_size(b: int) -> None:
    m = _method()
    batch = Batch(views=[torch.randn(b, 3, 16, 16), torch.randn(b, 3, 16, 16)],
                  index=torch.arange(b))  # fmt: skip
    out = m.training_step(batch, STEP)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_views_follow_the_official_augmentation() -> None:
    (v,) = _method().views()
    assert v.count == 2 and v.scale == (0.2, 1.0) and v.flip_p == 0.5
    assert v.jitter_p == 1.0 and (v.brightness, v.contrast, v.saturation, v.hue) == (0.4,) * 4
    assert v.grayscale_p == 0.2 and not v.grayscale_first


def test_default_schedule_is_the_fixed_official_one_at_any_length() -> None:
    """demo_seen.py after the authors' "fix lr bug" (invaspread-cifar.toml states it in
    epochs, test_recipes.py): as fractions of the run, so 301 epochs give 120, 160, 200."""
    _, run, _ = api.resolve_config("invaspread", overrides={"trainer": {"epochs": 301}})
    s = run.schedule
    assert [m * 301 for m in s.milestones] == pytest.approx([120, 160, 200])
    assert s.milestone_factors == [0.1, 0.05, 0.01]
