"""Barlow Twins: the loss against the paper's formula, autocast safety, and sslcli's method
contract (``sslcli.testing``: the same checks every built-in method passes)."""

from __future__ import annotations

import torch
from sslcli_barlow_twins import barlow_twins_loss

from sslcli.testing import MethodContract


class TestBarlowTwinsContract(MethodContract):
    method = "barlow-twins"
    sets = ["method.proj_dim=64"]  # the official 8192 is for GPUs; the code path is the same


def _formula(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    b = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    c = a.T @ b / n
    expected = torch.zeros(())
    for i in range(d):
        for j in range(d):
            expected += (1 - c[i, i]) ** 2 if i == j else lambd * c[i, j] ** 2
    return expected


def test_loss_matches_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 6), torch.randn(32, 6)
    torch.testing.assert_close(barlow_twins_loss(z1, z2, 0.0051), _formula(z1, z2, 0.0051))


def test_identical_decorrelated_views_have_zero_loss() -> None:
    z = torch.linalg.qr(torch.randn(64, 8))[0] * 8**0.5  # orthogonal, unit-variance columns
    z = z - z.mean(0)
    assert barlow_twins_loss(z, z, 0.0051) < 0.05


def test_loss_is_float32_under_bf16_autocast() -> None:
    """The engine runs training_step under bf16 autocast on GPUs; the loss must not."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(256, 512), torch.randn(256, 512)
    exact = barlow_twins_loss(z1, z2, 0.0051)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = barlow_twins_loss(z1, z2, 0.0051)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact)
