"""Sinkhorn-Knopp: SwAV's equipartitioned soft assignment of samples to prototypes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sslcli.nn import dist


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Codes Q for ``scores`` [B, K] (samples x prototypes): rows of the result sum to 1.

    "we restrict the transportation polytope to the minibatch ... Q = Diag(u) exp(CᵀZ/ε)
    Diag(v), where u and v are renormalization vectors in R^K and R^B respectively. The
    renormalization vectors are computed using a small number of matrix multiplications
    using the iterative Sinkhorn-Knopp algorithm" (Caron et al. 2020, Sec. 3.1, Eq. 3):
    the solution of max_Q Tr(QᵀCᵀZ) + εH(Q) over Q with prototype marginals 1/K and sample
    marginals 1/B, in the soft (not rounded) form that the paper finds works best.

    As in the official code, with Q laid out K x B: Q = exp(scores/ε) / sum, then each of
    ``iterations`` rounds scales every prototype row to total 1/K and every sample column
    to 1/B; finally Q is multiplied by B so that each sample's code is a distribution over
    the K prototypes. B is the batch of *all* processes: the row sums (and the total) are
    all-reduced, a column belongs to one process and needs no communication. Every process
    must pass the same number of rows.

    Computed in fp32 with autocast off, whatever the input dtype (exp(x/ε) with ε = 0.05
    magnifies rounding errors 20-fold), and in the log domain: every normalisation is a
    subtraction of a log-sum-exp, which gives the same Q as the official multiplicative
    updates but neither overflows nor underflows to 0/0 when ε is small. No gradient flows
    through the codes.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, K], got shape {tuple(scores.shape)}")
    with torch.autocast(device_type=scores.device.type, enabled=False):
        b_total = scores.shape[0] * dist.world_size()
        k = scores.shape[1]
        log_q = scores.detach().float().T / epsilon  # [K, B]
        log_q = log_q - _global_logsumexp(log_q.reshape(1, -1)).reshape(())  # total mass 1
        for _ in range(iterations):
            # Each prototype receives 1/K of the total mass (sums over every process).
            log_q = log_q - _global_logsumexp(log_q) - math.log(k)
            # Each sample spreads 1/B of the mass over the prototypes.
            log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(b_total)
        return (log_q + math.log(b_total)).exp().T


def _global_logsumexp(x: Tensor) -> Tensor:
    """``log Σ exp(x)`` along dim 1 over the columns of every process: [R, C] -> [R, 1]."""
    peak = dist.all_reduce_max(x.max(dim=1, keepdim=True).values)
    total = dist.all_reduce_sum((x - peak).exp().sum(dim=1, keepdim=True))
    return peak + total.log()
