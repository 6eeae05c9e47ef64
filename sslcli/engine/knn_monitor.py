"""The kNN monitor of a training run, spread over every process.

Before the first step and after the last, the trainer measures weighted-kNN top-1 of the
representation (:mod:`sslcli.eval.knn`). Under ``torchrun`` one process doing this alone
would leave the others blocked in their next collective, and on ImageNet-sized data the
encoding outlasts NCCL's collective timeout. So every process encodes its contiguous
share of the reference and query images, the reference features are all-gathered onto
every device, each process searches its share of the queries there, and the correct
counts are summed: no process works alone, and the cost per process falls with their
number. The reference set is bounded (``trainer.knn_max_train``: a fixed random subset of
a larger labelled training split).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from sslcli.eval.features import extract
from sslcli.eval.knn import knn_correct
from sslcli.nn import dist


class Rows(Dataset):  # type: ignore[type-arg]
    """Rows ``rows`` of ``base``, re-indexed ``0..n-1`` (keeps an in-memory fast path)."""

    def __init__(self, base: Any, rows: Tensor) -> None:
        self.base = base
        self.rows = rows.to(torch.int64)
        self.labels = base.labels[self.rows]
        self.in_memory = bool(getattr(base, "in_memory", False))
        if callable(getattr(base, "get_batch", None)):
            self.get_batch = self._get_batch

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x, y, _ = self.base[int(self.rows[i])]
        return x, y, i

    def _get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
        x, y, _ = self.base.get_batch(self.rows[idx])
        return x, y, idx


def reference_rows(n: int, max_rows: int | None, seed: int) -> Tensor:
    """Rows of a labelled training split used as the kNN reference set: all of them, or
    a sorted random subset of ``max_rows`` drawn from ``seed`` (the same on every process
    and at every evaluation of the run, so before/after numbers compare like with like)."""
    if max_rows is None or n <= max_rows:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed + 104_729)
    return torch.randperm(n, generator=g)[:max_rows].sort().values


def my_share(rows: Tensor) -> Tensor:
    """This process's contiguous share of ``rows`` (sizes differ by at most one)."""
    return rows.tensor_split(dist.world_size())[dist.rank()]


@dataclass
class KnnResult:
    top1: float
    """kNN top-1 over all query images (every process gets the same value)."""
    queries: Tensor
    """This process's share of the query features, on the device."""
    query_labels: Tensor


def _bn_buffers(model: nn.Module) -> list[Tensor]:
    return [
        b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in m.buffers()
    ]  # fmt: skip


@torch.no_grad()
def knn_monitor(
    embed: Callable[[Tensor], Tensor],
    model: nn.Module,
    train: Any,
    test: Any,
    *,
    k: int,
    temperature: float,
    num_classes: int,
    max_train: int | None,
    seed: int,
    device: torch.device,
    extract_kw: dict[str, Any],
) -> KnnResult:
    """Weighted-kNN top-1 of ``embed`` (``test`` queries against ``train``), every process
    taking part; call it on all processes at the same point of the run.

    BatchNorm running statistics are per process without synchronised BN: rank 0's are
    used for the evaluation (and each process's own put back afterwards), so the features
    are those of one model whoever computes them.
    """
    ref_rows = reference_rows(len(train), max_train, seed)

    def features(base: Any, rows: Tensor) -> tuple[Tensor, Tensor]:
        mine = my_share(rows)
        if mine.numel() == 0:  # fewer images than processes: encode one for the width
            f, y = extract(embed, Rows(base, rows[:1]), device=device, **extract_kw)
            return f[:0], y[:0]
        return extract(embed, Rows(base, mine), device=device, **extract_kw)

    with _rank0_bn_statistics(model):
        tr_f, tr_y = features(train, ref_rows)
        te_f, te_y = features(test, torch.arange(len(test)))
    # Reference features onto every device (ImageNet at the default bound: 100,000 x D
    # floats), queries stay where they were computed.
    tr_f = dist.gather_rows(tr_f.to(device))
    tr_y = dist.gather_rows(tr_y.to(device))
    te_f, te_y = te_f.to(device), te_y.to(device)
    correct = knn_correct(
        tr_f, tr_y, te_f, te_y, (k,), temperature, num_classes, device=device
    )[k]
    total = dist.all_reduce_sum(
        torch.tensor([correct, te_y.numel()], dtype=torch.float64, device=device)
    ).tolist()
    return KnnResult(total[0] / max(1.0, total[1]), te_f, te_y)


class _rank0_bn_statistics:  # noqa: N801 - used as a context manager
    def __init__(self, model: nn.Module) -> None:
        self.bufs = _bn_buffers(model) if dist.world_size() > 1 else []
        self.saved: list[Tensor] = []

    def __enter__(self) -> None:
        self.saved = [b.detach().clone() for b in self.bufs]
        for b in self.bufs:
            dist.broadcast_(b)

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for b, s in zip(self.bufs, self.saved, strict=True):
                b.copy_(s)
