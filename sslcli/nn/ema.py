"""Momentum (EMA) encoders: MoCo's key encoder, BYOL's target, DINO's teacher."""

from __future__ import annotations

import copy

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` (no gradients), to be updated by :func:`ema_update_`.

    "the key encoder ... is updated by θ_k ← m·θ_k + (1−m)·θ_q" (He et al. 2019, Eq. 2):
    it starts equal to the online network and never receives gradients.
    """
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``θ_target ← m·θ_target + (1−m)·θ_online`` for every parameter (foreach kernels).

    Buffers (BN running statistics) are not averaged: the target keeps its own, as in the
    official MoCo/BYOL/DINO code where BN buffers follow the target's own forward passes.
    """
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks have different parameter lists")
    if not t_params:
        return
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - momentum)
