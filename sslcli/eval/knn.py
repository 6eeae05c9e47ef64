"""Weighted k-nearest-neighbour classification on frozen features.

"we use the weighted kNN ... the weight of each neighbour is exp(s_i / τ)" (Wu et al. 2018,
Sec. 3.4): cosine similarities of L2-normalised features, each of the k nearest training
samples votes for its class with weight exp(sim / τ), the class with the largest total wins.
Similarities are computed for a chunk of queries at a time, so N_test × N_train never
materialises.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SIM_BLOCK = 1 << 27
"""Elements of one query-by-reference similarity block in :func:`knn_accuracies`."""


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores [N_test, C] by weighted kNN voting."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    k = min(k, train.shape[0])
    out = []
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    k: int = 200,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1]."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, test_feats, num_classes, k, temperature)
    return float((scores.argmax(1) == test_labels).float().mean())


@torch.no_grad()
def knn_accuracies(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: tuple[int, ...] = (200, 20),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int | None = None,
    device: torch.device | None = None,
) -> dict[int, float]:
    """Top-1 accuracy for several k at the cost of one: the largest k's neighbours are
    found once per chunk of queries and the smaller k vote with their first rows (``topk``
    returns them sorted by similarity).

    ``chunk`` (queries per similarity block) defaults to what keeps one block near
    ``SIM_BLOCK`` elements, so a 1.28M-image reference set costs ~0.5 GB per block, not 5.
    ``device`` is where the similarities are computed (default: the features' device).
    """
    correct = knn_correct(
        train_feats, train_labels, test_feats, test_labels, ks, temperature, num_classes,
        chunk, device,
    )  # fmt: skip
    n = max(1, test_feats.shape[0])
    return {k: correct[k] / n for k in ks}


@torch.no_grad()
def knn_correct(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: tuple[int, ...] = (200, 20),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int | None = None,
    device: torch.device | None = None,
) -> dict[int, int]:
    """Number of correctly classified queries for each k (see :func:`knn_accuracies`);
    counts, so that shares of the queries searched on several processes add up. The
    counts stay on the device until the end (one transfer, not one per chunk)."""
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train = F.normalize(train_feats.to(device).float(), dim=1)
    test = F.normalize(test_feats.to(device).float(), dim=1)
    train_labels = train_labels.to(train.device)
    if chunk is None:
        chunk = max(1, min(1024, SIM_BLOCK // max(1, train.shape[0])))
    kmax = min(max(ks), train.shape[0])
    correct = torch.zeros(len(ks), dtype=torch.int64, device=train.device)
    for start in range(0, test.shape[0], chunk):
        sim = test[start : start + chunk] @ train.T
        top_sim, top_idx = sim.topk(kmax, dim=1)
        weights = (top_sim / temperature).exp()
        neighbour_labels = train_labels[top_idx]
        truth = test_labels[start : start + chunk].to(sim.device)
        for i, k in enumerate(ks):
            kk = min(k, kmax)
            votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            correct[i] += (votes.argmax(1) == truth).sum()
    return dict(zip(ks, (int(c) for c in correct.tolist()), strict=True))
