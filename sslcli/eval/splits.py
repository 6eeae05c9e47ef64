"""Fixed, class-balanced subsets of a training split: label fractions and held-out parts.

Both are pure functions of the labels and a fixed seed (never of the run's seed), so every
method in a comparison is evaluated on the very same images, and a re-run picks the same
ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sslcli.data.images import ImageDataset

LABEL_SUBSET_SEED = 0
HOLDOUT_SEED = 1


def _by_class(labels: Tensor) -> dict[int, Tensor]:
    labels = labels.cpu()
    return {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels) if c >= 0}


def label_subset(labels: Tensor, fraction: float, seed: int = LABEL_SUBSET_SEED) -> Tensor:
    """Sorted indices of a class-balanced ``fraction`` of the labelled rows.

    Every class keeps ``round(fraction * n_c)`` of its ``n_c`` images, at least one, chosen by
    a fixed permutation — the semi-supervised protocol of SimCLR (Chen et al. 2020, Sec. 6:
    "we sample 1% or 10% of the labeled ILSVRC-12 training datasets in a class-balanced
    way"). ``fraction >= 1`` keeps every labelled row.
    """
    if not 0 < fraction:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return torch.nonzero(labels.cpu() >= 0).flatten()
    g = torch.Generator().manual_seed(seed)
    keep = []
    for _, rows in sorted(_by_class(labels).items()):
        k = max(1, int(round(fraction * rows.numel())))
        keep.append(rows[torch.randperm(rows.numel(), generator=g)[:k]])
    return torch.sort(torch.cat(keep)).values if keep else torch.empty(0, dtype=torch.long)


def holdout_split(
    labels: Tensor, fraction: float = 0.1, seed: int = HOLDOUT_SEED
) -> tuple[Tensor, Tensor]:
    """``(fit, held_out)`` sorted index sets of a class-balanced split of ``labels``.

    Hyper-parameters are chosen on the held-out part of the *training* split, never on the
    test split. Each class with at least two images gives ``round(fraction * n_c)`` of them,
    at least one and never all; a class with a single image stays in the fit part.
    """
    g = torch.Generator().manual_seed(seed)
    fit, held = [], []
    for _, rows in sorted(_by_class(labels).items()):
        n = rows.numel()
        h = 0 if n < 2 else min(n - 1, max(1, int(round(fraction * n))))
        perm = rows[torch.randperm(n, generator=g)]
        held.append(perm[:h])
        fit.append(perm[h:])
    cat = torch.cat
    empty = torch.empty(0, dtype=torch.long)
    return (
        torch.sort(cat(fit)).values if fit else empty,
        torch.sort(cat(held)).values if held else empty,
    )


class RowSubset(ImageDataset):
    """``base[rows]`` re-indexed 0..n-1 (a label subset or a held-out part of a split)."""

    def __init__(self, base: ImageDataset, rows: Tensor) -> None:
        self.base, self.rows = base, rows
        self.name, self.split, self.classes = base.name, base.split, base.classes
        self.load_size, self.in_memory = base.load_size, base.in_memory
        self.labels = base.labels[rows]

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        i = self.check_index(i)
        x, y, _ = self.base[int(self.rows[i])]
        return x, y, i

    @property
    def get_batch(self) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
        base_get = getattr(self.base, "get_batch", None)
        if base_get is None:
            raise AttributeError("get_batch: the base dataset is not held in memory")

        def get(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
            x, y, _ = base_get(self.rows[idx])
            return x, y, idx

        return get
