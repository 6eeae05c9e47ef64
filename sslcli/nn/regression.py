"""Regression losses of the methods without negatives (BYOL, SimSiam).

Both compare a prediction ``p`` of one view with the (stop-gradient) projection ``z`` of
the other view after l2-normalising both, so they only differ by an affine map:
``‖n(p) − n(z)‖² = 2 − 2·cos(p, z)``. They are computed in float32 even under autocast:
normalising a 256–2048-wide bf16 vector and taking ``1 − cos`` of nearly aligned vectors
loses most of the signal to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12  # F.normalize's default: guards an all-zero row only


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1, eps=_EPS)


def normalized_mse(p: Tensor, z: Tensor) -> Tensor:
    """Per-sample ``‖n(p) − n(sg(z))‖²`` (shape [B]); ``z`` never receives a gradient.

    "we define the following mean squared error between the normalized predictions and
    target projections, L ≜ ‖q̄_θ(z_θ) − z̄′_ξ‖²₂ = 2 − 2·⟨q_θ(z_θ), z′_ξ⟩ / (‖q_θ(z_θ)‖₂·
    ‖z′_ξ‖₂)" (Grill et al. 2020, "Bootstrap your own latent", Eq. 2).
    """
    return (_unit(p) - _unit(z.detach())).pow(2).sum(dim=-1)


def byol_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """BYOL's symmetrised loss: ``mean_b[‖n(p₁) − n(sg z₂)‖² + ‖n(p₂) − n(sg z₁)‖²]``.

    "We symmetrize the loss L by separately feeding v′ to the online network and v to the
    target network to compute L̃; ... L^BYOL = L + L̃" (Grill et al. 2020, Sec. 3.1).
    ``p_i`` is the online prediction of view i and ``z_i`` the target projection of view
    i, so each prediction is regressed onto the *other* view's target. The batch mean of
    the per-sample sum is what the official code returns (range [0, 8]). Precision: fp32
    (element-wise on fp32 copies, which autocast never lowers).
    """
    return (normalized_mse(p1, z2) + normalized_mse(p2, z1)).mean()


def negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """Per-sample ``−cos(p, sg(z))`` (shape [B]); ``z`` never receives a gradient.

    "D(p₁, z₂) = −(p₁/‖p₁‖₂)·(z₂/‖z₂‖₂)" with "D(p₁, stopgrad(z₂))" (Chen & He 2020,
    "Exploring Simple Siamese Representation Learning", Eqs. 1 and 3).
    """
    return -(_unit(p) * _unit(z.detach())).sum(dim=-1)


def simsiam_loss(p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
    """SimSiam's symmetrised loss ``½·mean_b[D(p₁, sg z₂)] + ½·mean_b[D(p₂, sg z₁)]``.

    "L = ½D(p₁, stopgrad(z₂)) + ½D(p₂, stopgrad(z₁))" (Chen & He 2020, Eq. 4); its minimum
    is −1. A loss stuck at −1 with near-zero per-dimension std of n(z) is collapse.
    Precision: fp32 (element-wise on fp32 copies, which autocast never lowers).
    """
    return 0.5 * (negative_cosine(p1, z2).mean() + negative_cosine(p2, z1).mean())


@torch.no_grad()
def mean_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Batch mean of ``cos(a, b)`` (a logging helper: how aligned the two sides are)."""
    return (_unit(a) * _unit(b)).sum(dim=-1).mean()
