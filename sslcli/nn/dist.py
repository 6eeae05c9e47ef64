"""Cross-process helpers that are the identity on one process.

Every cross-sample reduction in a method (SimCLR/MoCo v3 negatives, SwAV's Sinkhorn sums,
DINO's centre, queues) goes through these, so the same method code is correct alone and
under ``torchrun``.

Gradient convention (the one DDP assumes): each process ``r`` computes a local loss
``L_r``; DDP averages parameter gradients, so the run minimises ``mean_r L_r``. An op that
mixes rows of several processes must therefore give process ``r`` the gradient
``sum_r' dL_r' / dx_r`` of its own input; :func:`gather_with_grad` and
:func:`all_reduce_sum_with_grad` do exactly that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def _multi() -> bool:
    return is_dist() and world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each process the gradient of its own slice.

    Each process's loss uses every gathered row, so the gradient of a row is the sum over
    processes of the gradient it received there: all-reduce, then keep our slice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0 (rank order), keeping gradients.

    Every process must pass a tensor of the same shape.
    """
    if not _multi():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0 (no gradient)."""
    if not _multi():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over processes; returns a new tensor, ``x`` is left unchanged."""
    if _multi():
        x = x.clone()
        dist.all_reduce(x)
    return x


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over processes; returns a new tensor."""
    if _multi():
        return all_reduce_sum(x) / world_size()
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """Element-wise maximum of ``x`` over processes; returns a new tensor."""
    if _multi():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over processes; backward sums the incoming gradients the same way (each
    process's loss depends on the total, so every input receives the sum of them)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over processes, differentiably (identity on one process)."""
    if not _multi():
        return x
    return _AllReduceSumWithGrad.apply(x)


def broadcast_(x: Tensor, src: int = 0) -> Tensor:
    if _multi():
        dist.broadcast(x, src)
    return x


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """Every parameter and buffer of ``module`` overwritten with process ``src``'s (in place).

    Processes seed ``seed + rank`` before building their model, so random initial state
    (weights, MoCo's queue, memory banks, a probe) differs between them until this runs.
    DDP broadcasts parameters at construction but, with ``broadcast_buffers=False``, not
    buffers. Tensors go one by one in ``named_parameters``/``named_buffers`` order (the
    same on every process); a non-contiguous one (channels_last) through a contiguous copy.
    """
    if not _multi():
        return module
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_contiguous():
            dist.broadcast(t.data, src)
        else:
            tmp = t.data.contiguous()
            dist.broadcast(tmp, src)
            t.data.copy_(tmp)
    return module


@torch.no_grad()
def gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every process along dim 0 (rank order), for any number of
    rows per process (no gradient): one small all-gather of the row counts, then one of
    the rows padded to the longest."""
    if not _multi():
        return x
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [int(c) for c in gather(n).tolist()]
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = gather(padded).split(longest, 0)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)], 0)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from process ``src`` on every process (a small picklable Python value)."""
    if not _multi():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (small Python values)."""
    if not _multi():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if _multi():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# Synchronised batch normalisation
# ---------------------------------------------------------------------------------------------


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalisation whose statistics come from the whole global batch.

    Implements the standard BN transform (Ioffe & Szegedy 2015, Alg. 1: "mu_B = 1/m sum
    x_i; sigma_B^2 = 1/m sum (x_i - mu_B)^2; x_hat = (x - mu_B) / sqrt(sigma_B^2 + eps)")
    with ``m`` the number of samples over *all* processes, as SimCLR's "Global BN" (Chen et
    al. 2020, Sec. 3) asks. The sums go through :func:`all_reduce_sum_with_grad`, so the
    backward pass is exact too. ``torch.nn.SyncBatchNorm`` refuses CPU tensors; this
    module runs on any device and backend (gloo included), with two small all-reduces per
    layer (sum, then the sum of squared deviations, which is numerically safer than
    ``E[x^2] - E[x]^2``), accumulated in float64 on CPU and in float32 elsewhere.
    Single process or eval mode: plain ``F.batch_norm``.

    State dict keys equal ``nn.BatchNorm*d``'s, so checkpoints and exports are unchanged.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        self._check_input_dim(input)
        if not (self.training and _multi()):
            return super().forward(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        dims = [0, *range(2, input.dim())]
        # Sums in float64 on CPU (cheap there; accelerators keep float32, MPS has no
        # float64): for a channel whose mean is large next to its spread, float32 sums lose
        # the digits of x - mean that matter, and two processes drift from one process's
        # plain BN far beyond rounding (SimCLR v2, two SGD steps at lr 1e-3: stem weights
        # 2.5e-5 apart with float32 sums, 1e-7 with float64; both equal in float64 runs).
        x = input.to(torch.float64 if input.device.type == "cpu" else torch.float32)
        c = x.shape[1]
        # The sample count rides along with the sums (processes may hold different
        # numbers of rows), and stays a tensor so no host sync is needed.
        local_n = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        summed = all_reduce_sum_with_grad(torch.cat([x.sum(dims), local_n]))
        n = summed[c:].detach()
        mean = summed[:c] / n
        shape = [1, -1] + [1] * (input.dim() - 2)
        centred = x - mean.view(shape)
        var = all_reduce_sum_with_grad((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None
            with torch.no_grad():
                unbiased = var.detach() * n / (n - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        # weight or bias may be None (a BN layer with a scale but no shift, SimCLR v2).
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        return out.to(input.dtype)


def _plain_forward(module: nn.Module) -> bool:
    """A BatchNorm layer whose behaviour is entirely the standard forward (plain
    ``BatchNorm1d/2d/3d``, or a subclass that only changes its parameters)."""
    return type(module).forward is nn.modules.batchnorm._BatchNorm.forward


def _convertible(module: nn.Module, device: torch.device) -> None:
    for name, m in module.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or _plain_forward(m):
            continue
        if isinstance(m, (GlobalBatchNorm, nn.SyncBatchNorm)):
            continue
        if device.type == "cuda" and type(m).__name__ == "BatchNormAct2d":
            continue  # timm's converter keeps its activation and dropout
        raise ValueError(
            f"trainer.sync_bn: cannot synchronise {name or 'the model'} "
            f"({type(m).__name__} has its own forward, which a synchronised layer would "
            "drop)" + ("" if device.type == "cuda" else "; on CPU only layers using the "
                       "standard BatchNorm forward can be synchronised")
        )  # fmt: skip


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``module`` synchronised across processes.

    CUDA: timm's converter (``torch.nn.SyncBatchNorm`` with fused kernels; timm's
    BatchNorm+activation layers keep their activation). Other devices:
    :class:`GlobalBatchNorm`. Either way, a BatchNorm subclass with its own ``forward`` is
    refused (``ValueError``) rather than silently losing that behaviour; subclasses that
    only change parameters (no shift, say) convert. Returns ``module`` (or its replacement
    when it is itself a BatchNorm layer); parameters and buffers are moved over, not copied.
    """
    _convertible(module, device)
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module)
    return _convert_global(module)


def _convert_global(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        new = GlobalBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        new.running_mean = module.running_mean
        new.running_var = module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = _convert_global(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
