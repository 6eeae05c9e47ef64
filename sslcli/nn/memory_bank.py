"""A memory bank: one feature vector per training image (InstDisc, CMC)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.errors import ConfigError
from sslcli.nn import dist


class MemoryBank(nn.Module):
    """``N × D`` features, row ``i`` the running average of image ``i``'s embedding.

    The paper keeps a memory bank V of every image's feature and writes each new feature
    ``f_i`` into its row after the step (Wu et al. 2018, Sec. 3.1); the official code
    (``NCEAverage``) blends it in with a momentum and returns the row to the unit sphere:
    ``v_i ← n(m·v_i + (1 − m)·f_i)``, m = 0.5. The official code initialises the bank
    uniformly in ``[-s, s]`` with ``s = 1/sqrt(D/3)``: each entry then has variance
    ``s²/3 = 1/D``, so rows start with an expected squared norm of 1 without being normalised.

    The bank is a buffer (``state_dict()`` holds it, resume is exact) and never receives
    gradients. Read the rows a loss needs first, then call :meth:`update` with the new
    features of the same images, the order of the official code.
    """

    bank: Tensor

    def __init__(self, size: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError(
                [f"memory bank: needs a data set size and a width >= 1 (got {size} x {dim})"]
            )
        if not 0 <= momentum < 1:
            raise ConfigError([f"memory bank: momentum must be in [0, 1) (got {momentum})"])
        self.momentum = momentum
        s = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("bank", torch.rand(size, dim).mul_(2 * s).sub_(s))

    @property
    def size(self) -> int:
        return int(self.bank.shape[0])

    @property
    def dim(self) -> int:
        return int(self.bank.shape[1])

    def rows(self, index: Tensor) -> Tensor:
        """A copy of the rows ``index`` (any shape), as ``[*index.shape, D]``.

        A copy, so that updating the bank afterwards cannot change what a loss has read.
        """
        out = self.bank.index_select(0, index.reshape(-1))
        return out.view(*index.shape, self.dim)

    @torch.no_grad()
    def update(self, index: Tensor, features: Tensor, distinct: bool = False) -> None:
        """``v_i ← n(m·v_i + (1 − m)·f_i)`` for every image ``i`` of the global batch.

        ``index`` [B] and ``features`` [B, D] are this process's; they are all-gathered
        first, so every process applies the same updates and keeps an identical bank.
        An index that occurs several times (a sampler drawing with replacement) is updated
        once per occurrence, in batch order, as if those samples had come one after the
        other — a plain ``index_copy_`` would keep one arbitrary occurrence. Duplicates
        cost one host synchronisation per step (the number of rounds); without them the
        update is a single scatter. ``distinct=True`` (the caller knows that no index
        repeats: ``Batch.index_distinct``) skips the count, and with it the sync.
        """
        index = dist.gather(index.reshape(-1))
        feats = dist.gather(features.detach()).to(self.bank.dtype)
        if distinct:
            rounds = 1
        else:
            occurrence = _occurrence_rank(index)
            rounds = int(occurrence.max().item()) + 1 if index.numel() else 0
        m = self.momentum
        for r in range(rounds):
            sel = occurrence == r if rounds > 1 else slice(None)
            idx, f = index[sel], feats[sel]
            mixed = self.bank.index_select(0, idx).mul_(m).add_(f, alpha=1 - m)
            self.bank.index_copy_(0, idx, F.normalize(mixed, dim=1))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, momentum={self.momentum}"


class DeferredBankWrites:
    """A step's features, held until after the optimiser step and then written into their
    banks (InstDisc, CMC).

    The official order: the loss reads the bank rows first, the rows take the new features
    afterwards ("v_i ← m·v_i + (1 − m)·f_i", then normalised). A loss that reads the whole
    bank (InstDisc's softmax variant) still needs the bank as it was during its backward
    pass, so the write waits for :meth:`flush` in ``after_optimizer_step``. Not state: it
    lives from ``training_step`` to ``after_optimizer_step`` of the same step.
    """

    def __init__(self) -> None:
        self._pending: tuple[Tensor, bool, list[tuple[MemoryBank, Tensor]]] | None = None

    def stage(self, index: Tensor, distinct: bool, *writes: tuple[MemoryBank, Tensor]) -> None:
        """Hold ``(bank, features)`` pairs for the images ``index`` of this step; ``distinct``
        as in :meth:`MemoryBank.update`. Banks are written in the order given."""
        self._pending = (index.detach(), distinct, [(b, f.detach()) for b, f in writes])

    def flush(self) -> None:
        """Write what :meth:`stage` held (nothing when nothing is staged)."""
        if self._pending is None:
            return
        index, distinct, writes = self._pending
        self._pending = None
        for bank, features in writes:
            bank.update(index, features, distinct)


def _occurrence_rank(index: Tensor) -> Tensor:
    """For each position, how many earlier positions hold the same value (0 = first)."""
    n = index.numel()
    if n == 0:
        return index.new_zeros(0)
    sorted_idx, order = torch.sort(index, stable=True)
    pos = torch.arange(n, device=index.device)
    starts = torch.ones(n, dtype=torch.bool, device=index.device)
    starts[1:] = sorted_idx[1:] != sorted_idx[:-1]
    run_start = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), 0).values
    rank = torch.empty_like(pos)
    rank[order] = pos - run_start
    return rank
