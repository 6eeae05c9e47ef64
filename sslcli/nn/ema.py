"""Momentum (EMA) encoders: MoCo's key encoder, BYOL's target, DINO's teacher."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from sslcli.nn.schedules import cosine_increase


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


@torch.no_grad()
def ema_update_pairs_(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """:func:`ema_update_` of every ``(target, online)`` pair with one momentum: for a
    momentum network whose parts (encoder, projector, head) mirror separate online modules."""
    for target, online in pairs:
        ema_update_(target, online, momentum)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """The EMA momentum of step ``k`` of ``K``: ``1 − (1 − base)·(cos(πk/K) + 1)/2``, from
    ``base`` at the start to 1 at the end along half a cosine.

    BYOL: "we start from τ_base = 0.996 and increase τ to one during training.
    Specifically, we set τ ≜ 1 − (1 − τ_base)·(cos(πk/K) + 1)/2 with k the current training
    step and K the maximum number of training steps" (Grill et al. 2020, Sec. 3.3). MoCo v3
    (official ``--moco-m-cos``, ``adjust_moco_momentum`` evaluated per iteration) and DINO
    ("The teacher weights are updated with a cosine schedule from 0.996 to 1 during
    training", Caron et al. 2021, Sec. 3.1) use the same rule.
    """
    return cosine_increase(step, total_steps, base, 1.0)
