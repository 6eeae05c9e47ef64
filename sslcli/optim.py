"""Optimisers (SGD, LARS, AdamW) and parameter grouping."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from sslcli.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    For each parameter tensor the update uses ``lr * trust`` with
    ``trust = eta * ||w|| / ||g + wd * w||`` (1 when either norm is 0), as in the SimCLR,
    BYOL and MoCo v3 code. Groups with ``lars_exclude=True`` (norms and biases in those
    recipes) skip both weight decay and the trust ratio. The update is computed with
    foreach kernels, so one step is a handful of launches rather than one per tensor.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=False
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, eta, mom = group["weight_decay"], group["eta"], group["momentum"]
            if not group["lars_exclude"]:
                if wd:
                    grads = torch._foreach_add(grads, params, alpha=wd)
                # The trust ratios of all tensors at once, on stacked norms (the same
                # element-wise arithmetic per tensor, a fixed number of kernels).
                w = torch.stack(torch._foreach_norm(params))
                g = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((w > 0) & (g > 0), eta * w / g, torch.ones_like(w))
                grads = torch._foreach_mul(grads, list(trust.unbind(0)))
            bufs = []
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.detach().clone()
                    bufs.append(None)
                else:
                    bufs.append(state["momentum_buffer"])
            existing = [(b, g) for b, g in zip(bufs, grads, strict=True) if b is not None]
            if existing:
                bs, gs = zip(*existing, strict=True)
                torch._foreach_mul_(list(bs), mom)
                torch._foreach_add_(list(bs), list(gs))
            torch._foreach_add_(
                params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"]
            )
        return loss


@torch.no_grad()
def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor shaped like its parameter the parameter's
    memory layout (channels_last convolution weights, say).

    A checkpoint stores state tensors contiguous; loaded back they would no longer match
    their parameters' strides, and the foreach update kernels then take their slow path.
    Values are copied unchanged.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for k, v in state.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def is_norm_or_bias(name: str, param: Tensor) -> bool:
    """Biases and norm scales are 1-D; so are ViT tokens' scalers but those too are exempt."""
    return param.ndim <= 1 or name.endswith(".bias")


def default_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if cfg.exclude_norm_bias and is_norm_or_bias(name, p) else decay).append(p)
    groups: list[dict[str, Any]] = [{"params": decay, "name": "decay"}]
    if no_decay:
        groups.append(
            {"params": no_decay, "name": "no_decay", "weight_decay": 0.0, "lars_exclude": True}
        )
    return [g for g in groups if g["params"]]


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch / 256
    if cfg.lr_scaling == "sqrt":
        return cfg.lr * math.sqrt(global_batch)
    return cfg.lr


def build_optimizer(
    groups: list[dict[str, Any]], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """Each group keeps its own ``weight_decay`` if it set one; ``base_lr`` is recorded so
    the schedule can scale it (``fixed_lr`` groups keep their learning rate)."""
    for g in groups:
        g.setdefault("weight_decay", cfg.weight_decay)
        g["base_lr"] = lr * g.pop("lr_scale", 1.0)
        g["base_wd"] = g["weight_decay"]
        g.setdefault("fixed_lr", False)
        g["lr"] = g["base_lr"]
    if cfg.name == "sgd":
        for g in groups:
            g.pop("lars_exclude", None)
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            foreach=True,
        )
    if cfg.name == "lars":
        return LARS(
            groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.lars_eta
        )
    for g in groups:
        g.pop("lars_exclude", None)
    return torch.optim.AdamW(
        groups, lr=lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=True
    )
