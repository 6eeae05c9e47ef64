"""SimCLR's NT-Xent against a direct implementation of the paper's formula."""

from __future__ import annotations

import math

import torch

from sslcli.nn.losses import nt_xent


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Chen et al. 2020, Alg. 1: l(i,j) = -log exp(s_ij/t) / sum_{k != i} exp(s_ik/t),
    L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)], written with plain loops."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        j = i + n if i < n else i - n
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


def test_nt_xent_matches_reference() -> None:
    torch.manual_seed(0)
    for t in (0.1, 0.5, 1.0):
        z1, z2 = torch.randn(7, 5), torch.randn(7, 5)
        assert math.isclose(float(nt_xent(z1, z2, t)), nt_xent_reference(z1, z2, t), rel_tol=1e-5)


def test_nt_xent_perfect_alignment_is_low() -> None:
    z = torch.eye(8)
    aligned = float(nt_xent(z, z, 0.1))
    shuffled = float(nt_xent(z, z.roll(1, 0), 0.1))
    assert aligned < 0.01 < shuffled


def test_nt_xent_gradients_reach_both_views() -> None:
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = torch.randn(4, 3, requires_grad=True)
    nt_xent(z1, z2, 0.5).backward()
    assert z1.grad is not None and z2.grad is not None
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_simclr_head_and_views() -> None:
    from sslcli import api
    from sslcli.backbones import make_spec

    cls, run, cfg = api.resolve_config("simclr")
    m = cls(cfg, make_spec("test_resnet", 16).build())
    # The official head: Linear (no bias) -> BN -> ReLU -> Linear (no bias) -> BN without
    # shift, the hidden layer as wide as the features, weights from N(0, 0.01^2).
    layers = [[type(x).__name__ for x in layer] for layer in m.projector]
    assert layers == [["Linear", "BatchNorm1d", "ReLU"], ["Linear", "BatchNorm1dNoShift"]]
    (l1, bn1, _), (l2, bn2) = m.projector
    width = m.backbone.num_features
    assert (l1.in_features, l1.out_features, l2.out_features) == (width, width, 128)
    assert l1.bias is None and l2.bias is None and bn1.bias is not None and bn2.bias is None
    assert abs(float(l1.weight.detach().std()) - 0.01) < 0.002
    (spec,) = m.views()
    assert spec.count == 2 and spec.interpolation == "bicubic" and not spec.normalize
    assert spec.brightness == 0.8 and spec.hue == 0.2 and spec.scale == (0.08, 1.0)
