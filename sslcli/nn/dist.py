"""Cross-process helpers that are the identity on one process.

Every cross-sample reduction in a method (SimCLR/MoCo v3 negatives, SwAV's Sinkhorn sums,
DINO's centre, queues) goes through these, so the same method code is correct alone and
under ``torchrun``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each process the gradient of its own slice.

    Each process's loss uses every gathered row, so the gradient of a row is the sum over
    processes of the gradient it received there: all-reduce, then keep our slice.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping gradients."""
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0 (no gradient)."""
    if not is_dist() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over processes (in place on the returned tensor)."""
    if is_dist() and world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    if is_dist() and world_size() > 1:
        return all_reduce_sum(x) / world_size()
    return x


def broadcast_(x: Tensor, src: int = 0) -> Tensor:
    if is_dist() and world_size() > 1:
        dist.broadcast(x, src)
    return x


def barrier() -> None:
    if is_dist() and world_size() > 1:
        dist.barrier()
