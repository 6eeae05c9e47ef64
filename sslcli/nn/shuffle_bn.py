"""MoCo's shuffling BN, on one process (split BatchNorm) and across processes.

"Using BN prevents the model from learning good representations ... The model appears to
'cheat' the pretext task and easily finds a low-loss solution. This is possibly because
the intra-batch communication among samples (caused by BN) leaks information. We resolve
this problem by shuffling BN. ... For the key encoder f_k, we shuffle the sample order in
the current mini-batch before distributing it among GPUs (and shuffle back after
encoding); the sample order of the mini-batch for the query encoder f_q is not altered."
(He et al. 2019, Sec. 3.3)

MoCo's BN statistics therefore come from groups of images (one GPU's 32 in the official
8-GPU run), and a query never shares its group's statistics with its own key. Here:

- :func:`split_batchnorm` makes every BatchNorm layer of a module normalise each of G
  groups of rows (rows g, g+G, g+2G, ...) with that group's own statistics. This is how
  the official CIFAR-10 demo emulates 8 GPUs on one (its ``SplitBatchNorm``, used by
  both encoders).
- :func:`shuffle_bn_forward` runs the key encoder on a shuffled batch: on one process it
  permutes the rows, splits BN into groups and restores the order; under ``torchrun`` it
  gathers every process's inputs, permutes them with a permutation broadcast from rank 0,
  encodes this process's slice and undoes the permutation (the official
  ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``).

SyncBatchNorm is not a substitute: with one statistic for the whole batch the leak it is
meant to stop comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from sslcli.errors import ConfigError
from sslcli.nn import dist

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_groups(batch: int, group_size: int, option: str = "method.bn_group_size") -> int:
    """How many BN groups a batch of ``batch`` rows splits into (at most ``group_size`` each).

    A batch no larger than ``group_size`` is one group. A larger one must be a multiple of
    ``group_size``, so every group has the same number of images, as on equal GPUs.
    """
    if group_size < 1:
        raise ConfigError([f"{option}: must be >= 1 (got {group_size})"])
    if batch <= group_size:
        return 1
    if batch % group_size:
        raise ConfigError(
            [
                f"{option}: the per-process batch of {batch} images does not split into "
                f"groups of {group_size}; use a divisor of {batch} or a batch that is a "
                f"multiple of {group_size}"
            ]
        )
    return batch // group_size


def grouped_batch_norm(bn: _BatchNorm, x: Tensor, groups: int) -> Tensor:
    """Training-mode BatchNorm of ``x`` with statistics computed per group of rows.

    Group g is rows ``g, g+G, g+2G, ...`` (G = ``groups``): the official demo's layout,
    which folds the groups into the channel axis with a free reshape, ``[N, C, ...] ->
    [N/G, G*C, ...]``, so one ``batch_norm`` call computes all G x C statistics. The batch
    order is random, so any fixed partition into equal groups is as good as GPU slices.
    The affine parameters are shared by the groups. The running statistics are updated
    with the mean over groups of the per-group statistics, as the official split BN does.
    """
    n, c = x.shape[0], x.shape[1]
    if n % groups:
        raise ValueError(f"batch of {n} rows does not split into {groups} equal groups")
    rest = x.shape[2:]
    channels_last = (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )
    folded = x.reshape(n // groups, groups * c, *rest)
    track = bn.track_running_stats and bn.running_mean is not None
    factor = 0.0
    if track:
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)
    run_mean = bn.running_mean.repeat(groups) if track else None
    run_var = bn.running_var.repeat(groups) if track else None
    weight = bn.weight.repeat(groups) if bn.weight is not None else None
    bias = bn.bias.repeat(groups) if bn.bias is not None else None
    y = F.batch_norm(folded, run_mean, run_var, weight, bias, True, factor, bn.eps)
    if track:
        assert run_mean is not None and run_var is not None
        with torch.no_grad():
            bn.running_mean.copy_(run_mean.view(groups, c).mean(0))
            bn.running_var.copy_(run_var.view(groups, c).mean(0))
    y = y.reshape(x.shape)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def _split_forward(bn: _BatchNorm, groups: int) -> Callable[[Tensor], Tensor]:
    default = type(bn).forward

    def forward(x: Tensor) -> Tensor:
        if not bn.training:
            return default(bn, x)  # eval: running statistics, nothing to split
        y = grouped_batch_norm(bn, x, groups)
        if isinstance(bn, BatchNormAct2d):  # timm's fused BN + activation (SK-ResNets)
            y = bn.act(bn.drop(y))
        return y

    return forward


@contextmanager
def split_batchnorm(*modules: nn.Module, groups: int) -> Iterator[None]:
    """Inside the block, every BatchNorm layer of ``modules`` uses per-group statistics.

    ``groups=1`` changes nothing. The layers' own ``forward`` is restored on exit, so the
    modules stay plain (timm-loadable, exportable) outside the block.
    """
    if groups <= 1:
        yield
        return
    layers = [m for mod in modules for m in mod.modules() if isinstance(m, _BatchNorm)]
    for m in layers:
        if not (type(m) in _PLAIN_BN or isinstance(m, BatchNormAct2d)):
            raise ConfigError(
                [
                    f"backbone: shuffle-BN splits nn.BatchNorm1d/2d/3d and timm BatchNormAct2d "
                    f"layers, not {type(m).__name__}; synchronised BN (trainer.sync_bn) would "
                    f"undo shuffle-BN"
                ]
            )
    saved = [(m, m.__dict__.get("forward")) for m in layers]
    try:
        for m in layers:
            m.forward = _split_forward(m, groups)  # type: ignore[method-assign]
        yield
    finally:
        for m, old in saved:
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old  # type: ignore[method-assign]


@torch.no_grad()
def shuffle_bn_forward(
    encoder: nn.Module, x: Tensor, group_size: int, option: str = "method.bn_group_size"
) -> Tensor:
    """``encoder(x)`` computed on a shuffled batch with per-group BN; rows in ``x``'s order.

    One process: a random permutation of the rows, BN statistics per group of
    ``group_size`` rows of the permuted batch (``split_batchnorm``), then the inverse
    permutation. Several processes: all inputs are gathered, permuted by one permutation
    drawn on rank 0 and broadcast, each process encodes its slice (split into groups of
    ``group_size`` if the slice is larger), the outputs are gathered and every process
    keeps the rows of its own inputs. Either way no image's output depends on statistics
    shared with the same images in the query encoder's groups.

    For key encoders only: no gradient flows (the official keys are computed under
    ``no_grad`` too). Uses the default RNG of ``x``'s device, which checkpoints capture.
    """
    world = dist.world_size()
    n = x.shape[0]
    groups = bn_groups(n, group_size, option)
    if world == 1:
        perm = torch.randperm(n, device=x.device)
        with split_batchnorm(encoder, groups=groups):
            y = encoder(x[perm])
        out = torch.empty_like(y)
        out[perm] = y
        return out
    x_all = dist.gather(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast_(perm, src=0)
    mine = perm.view(world, n)[dist.rank()]
    with split_batchnorm(encoder, groups=groups):
        y = encoder(x_all[mine])
    y_all = dist.gather(y)  # y_all[j] is the output of x_all[perm[j]]
    where = torch.argsort(perm).view(world, n)[dist.rank()]
    return y_all[where]
