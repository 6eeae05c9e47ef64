"""Linear evaluation: a linear classifier on frozen features.

The protocol of the contrastive lineage (InstDisc, MoCo, SimCLR, DINO): the encoder is
frozen, a linear classifier is trained on its features with SGD, and top-1 is reported on
the test (validation) split.

Two modes share one implementation of the classifiers:

* **cached** (default): features of the un-augmented training images are extracted once
  (and cached, see :mod:`sslcli.eval.cache`); the classifiers train on them. Fast enough to
  sweep learning rates and weight decays.
* **augmented** (``--augment``): every epoch runs the frozen encoder on a new random
  resized crop + horizontal flip of each training image, as the papers' protocol does.

Features are standardised before the linear layer (per-dimension mean and std of the
training features): "we adopt an extra BatchNorm layer without affine transformation"
(He et al. 2022, MAE, App. A.2; also MoCo v3). It makes one learning-rate grid work for
every method, whatever the scale of its features (MoCo's protocol needs lr 30 without it).
In augmented mode that layer is a ``BatchNorm1d(affine=False)``; in cached mode it is the
same normalisation with the exact statistics of the fit set.

Hyper-parameters are chosen on a held-out, class-balanced part of the *training* split
(:func:`sslcli.eval.splits.holdout_split`); the classifier is then retrained on the whole
training split with the chosen values and evaluated once on the test split. Test labels
are never read before that last step.

All candidates of a sweep are trained side by side (:class:`LinearHeads`): one pass over
the features — or one encoder forward per batch in augmented mode — serves them all.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.errors import EvalError
from sslcli.eval.splits import holdout_split

DEFAULT_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)
"""Base learning rates swept by default (per 256 images; scaled by batch / 256)."""
DEFAULT_EPOCHS = 100
DEFAULT_BATCH = 256
REFERENCE_BATCH = 256

Batches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]
"""``batches(epoch)`` yields ``(features [B, D], labels [B])`` for one epoch."""


# ---------------------------------------------------------------------------------------------
# Classifiers
# ---------------------------------------------------------------------------------------------


class LinearHeads(nn.Module):
    """K independent linear classifiers (one per hyper-parameter candidate), trained together.

    ``logits[k] = norm(x) @ W[k] + b[k]``. Each head has its own learning rate and weight
    decay; the update is SGD with Nesterov momentum 0.9 and a cosine schedule, SimCLR's
    linear-evaluation optimiser (lr 0.1 x B/256, 90 epochs, in METHODS.md's summary of the
    official code), written out per head so K learning rates need no K optimisers.
    Weights start at zero: the problem is convex, so the start does not matter and the
    result is reproducible. Weight decay applies to ``W``, not to the biases.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        lrs: Sequence[float],
        wds: Sequence[float],
        *,
        norm: Literal["fixed", "bn"] = "fixed",
        momentum: float = 0.9,
        nesterov: bool = True,
    ) -> None:
        super().__init__()
        if len(lrs) != len(wds) or not lrs:
            raise ValueError("need one weight decay per learning rate, and at least one head")
        k = len(lrs)
        self.weight = nn.Parameter(torch.zeros(k, dim, num_classes))
        self.bias = nn.Parameter(torch.zeros(k, num_classes))
        self.register_buffer("lr", torch.tensor(list(lrs), dtype=torch.float32))
        self.register_buffer("wd", torch.tensor(list(wds), dtype=torch.float32))
        self.register_buffer("v_weight", torch.zeros_like(self.weight))
        self.register_buffer("v_bias", torch.zeros_like(self.bias))
        self.momentum = momentum
        self.nesterov = nesterov
        self.norm_kind = norm
        if norm == "bn":
            self.bn: nn.Module = nn.BatchNorm1d(dim, affine=False)
        else:
            self.bn = nn.Identity()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    def set_standardization(self, features: Tensor) -> None:
        """Per-dimension mean/std of the fit set (fixed mode); constant dimensions get std 1."""
        f = features.float()
        self.shift.copy_(f.mean(0))
        std = f.std(0, unbiased=False)
        self.scale.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def normalize(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.norm_kind == "bn":
            return self.bn(x)
        return (x - self.shift) / self.scale

    def forward(self, x: Tensor) -> Tensor:
        """Logits [K, B, C]."""
        z = self.normalize(x)
        return torch.einsum("bd,kdc->kbc", z, self.weight) + self.bias[:, None, :]

    @torch.no_grad()
    def export_head(self, k: int = 0) -> dict[str, Tensor]:
        """Head ``k`` as plain tensors: ``logits = ((x - shift) / scale) @ weight + bias``."""
        if self.norm_kind == "bn":
            bn = self.bn
            assert isinstance(bn, nn.BatchNorm1d) and bn.running_var is not None
            shift, scale = bn.running_mean.clone(), (bn.running_var + bn.eps).sqrt()
        else:
            shift, scale = self.shift.clone(), self.scale.clone()
        return {
            "weight": self.weight[k].detach().cpu().clone(),
            "bias": self.bias[k].detach().cpu().clone(),
            "shift": shift.cpu(),
            "scale": scale.cpu(),
        }

    @staticmethod
    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        """Sum over heads of each head's mean cross-entropy (heads do not interact)."""
        k, b, c = logits.shape
        per = F.cross_entropy(logits.reshape(k * b, c), labels.repeat(k), reduction="none")
        return per.view(k, b).mean(1).sum()

    @torch.no_grad()
    def sgd_step(self, lr_factor: float) -> None:
        """``v = m·v + g (+ wd·w)``; ``w -= lr·(g + m·v)`` (Nesterov) or ``lr·v``, per head."""
        m = self.momentum
        for p, buf, decay in ((self.weight, self.v_weight, True), (self.bias, self.v_bias, False)):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.dim() - 1)
            g = p.grad
            if decay:
                g = g + self.wd.view(shape) * p
            buf.mul_(m).add_(g)
            update = g + m * buf if self.nesterov else buf
            p.sub_((self.lr * lr_factor).view(shape) * update)
            p.grad = None


def cosine_factor(step: int, total: int) -> float:
    """Cosine decay from 1 to 0 over ``total`` steps, without warm-up."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


SMALL_WORK = 1 << 24
"""Multiply-adds per step below which the CPU runs the classifiers on one thread."""


@contextlib.contextmanager
def cpu_threads_for(device: torch.device, work: int) -> Iterator[None]:
    """One intra-op thread for small CPU steps, restored afterwards.

    A linear classifier's step is a few small matrix products; spreading them over threads
    costs more in synchronisation than it gains, and on a busy machine spinning BLAS
    threads made such a probe 10-40x slower than one thread (measured on 2 shared cores).
    """
    if device.type != "cpu" or work >= SMALL_WORK or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_heads(heads: LinearHeads, batches: Batches, epochs: int, steps_per_epoch: int) -> None:
    """Train ``heads`` for ``epochs`` epochs of ``batches(epoch)`` with a cosine schedule."""
    heads.train()
    total = epochs * steps_per_epoch
    step = 0
    for epoch in range(epochs):
        for x, y in batches(epoch):
            logits = heads(x)
            LinearHeads.loss(logits, y).backward()
            heads.sgd_step(cosine_factor(step, total))
            step += 1
    heads.eval()


def _work(heads: LinearHeads, batch: int) -> int:
    k, d, c = heads.weight.shape
    return int(batch * k * d * c)


@dataclass
class HeadScores:
    top1: list[float]
    top5: list[float]
    loss: list[float]


@torch.no_grad()
def score_heads(heads: LinearHeads, x: Tensor, y: Tensor, chunk: int = 4096) -> HeadScores:
    """Top-1, top-5 and mean cross-entropy of every head on ``(x, y)``."""
    heads.eval()
    k = heads.num_heads
    dev = heads.weight.device
    c1 = torch.zeros(k, device=dev)
    c5 = torch.zeros(k, device=dev)
    ce = torch.zeros(k, device=dev)
    n = int(y.shape[0])
    for s in range(0, n, chunk):
        xb, yb = x[s : s + chunk].to(dev), y[s : s + chunk].to(dev)
        logits = heads(xb)
        c1 += (logits.argmax(-1) == yb).float().sum(1)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        c5 += (top == yb[None, :, None]).any(-1).float().sum(1)
        ce += (
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.repeat(k), reduction="none")
            .view(k, -1)
            .sum(1)
        )
    d = max(1, n)
    return HeadScores((c1 / d).tolist(), (c5 / d).tolist(), (ce / d).tolist())


def tensor_batches(x: Tensor, y: Tensor, batch_size: int, seed: int) -> tuple[Batches, int]:
    """Shuffled minibatches of in-memory features; the order is a function of (seed, epoch)."""
    n = int(x.shape[0])
    b = min(batch_size, n)
    steps = math.ceil(n / b)

    def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).to(x.device)
        for i in range(steps):
            idx = perm[i * b : (i + 1) * b]
            yield x[idx], y[idx]

    return batches, steps


# ---------------------------------------------------------------------------------------------
# The protocol: choose on a held-out part of train, refit on all of train, test once
# ---------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    lr: float
    wd: float
    holdout_top1: float | None = None
    holdout_loss: float | None = None


@dataclass
class LinearResult:
    top1: float
    top5: float
    lr: float
    wd: float
    candidates: list[Candidate]
    epochs: int
    batch_size: int
    train_images: int
    holdout_images: int
    test_images: int
    augment: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """The final classifier: ``logits = ((x - shift) / scale) @ weight + bias``."""

    def to_json(self) -> dict[str, Any]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "lr": self.lr,
            "wd": self.wd,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "augment": self.augment,
            "train_images": self.train_images,
            "holdout_images": self.holdout_images,
            "test_images": self.test_images,
            "selection": [
                {
                    "lr": c.lr,
                    "wd": c.wd,
                    "holdout_top1": c.holdout_top1,
                    "holdout_loss": c.holdout_loss,
                }
                for c in self.candidates
            ],  # fmt: skip
            **self.extra,
        }


def grid(lrs: Sequence[float], wds: Sequence[float]) -> list[Candidate]:
    if not lrs or not wds:
        raise EvalError("the learning-rate and weight-decay lists must not be empty")
    for v in lrs:
        if not v > 0:
            raise EvalError(f"learning rates must be positive, got {v}")
    for v in wds:
        if v < 0:
            raise EvalError(f"weight decays must be >= 0, got {v}")
    return [Candidate(lr, wd) for wd in wds for lr in lrs]


def choose(cands: list[Candidate], scores: HeadScores) -> int:
    """Index of the best candidate: highest held-out top-1, then lowest held-out loss, then
    the earliest in the grid (so a re-run picks the same one)."""
    for c, a, lo in zip(cands, scores.top1, scores.loss, strict=True):
        c.holdout_top1, c.holdout_loss = a, lo
    order = sorted(range(len(cands)), key=lambda i: (-scores.top1[i], scores.loss[i], i))
    return order[0]


def _holdout(train_y: Tensor, fraction: float, n_cands: int) -> tuple[Tensor, Tensor] | None:
    if n_cands == 1:
        return None
    fit, held = holdout_split(train_y.cpu(), fraction)
    if held.numel() == 0:
        raise EvalError(
            "too few labelled training images to hold some out for choosing the "
            "learning rate; give a single --lr (and --wd)"
        )
    return fit, held


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    wds: Sequence[float] = (0.0,),
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH,
    holdout: float = 0.1,
    seed: int = 0,
    device: torch.device | None = None,
) -> LinearResult:
    """Linear evaluation on fixed features (cached mode); see the module docstring."""
    device = device or torch.device("cpu")
    cands = grid(lrs, wds)
    scale = batch_size / REFERENCE_BATCH
    x = train_x.to(device).float()
    y = train_y.to(device).long()

    def train(rows: Tensor | None, chosen: list[Candidate]) -> LinearHeads:
        xf = x if rows is None else x[rows.to(device)]
        yf = y if rows is None else y[rows.to(device)]
        heads = LinearHeads(
            xf.shape[1], num_classes, [c.lr * scale for c in chosen], [c.wd for c in chosen]
        ).to(device)
        heads.set_standardization(xf)
        batches, steps = tensor_batches(xf, yf, batch_size, seed)
        with cpu_threads_for(device, _work(heads, batch_size)):
            fit_heads(heads, batches, epochs, steps)
        return heads

    split = _holdout(y, holdout, len(cands))
    best = 0
    if split is not None:
        fit, held = split
        heads = train(fit, cands)
        best = choose(cands, score_heads(heads, x[held.to(device)], y[held.to(device)]))
    final = train(None, [cands[best]])
    # The test split is read here, once, after every choice is made.
    test = score_heads(final, test_x.to(device).float(), test_y.to(device).long())
    return LinearResult(
        top1=test.top1[0], top5=test.top5[0], lr=cands[best].lr, wd=cands[best].wd,
        candidates=cands, epochs=epochs, batch_size=batch_size,
        train_images=int(y.shape[0]), holdout_images=0 if split is None else int(split[1].numel()),
        test_images=int(test_y.shape[0]), classifier=final.export_head(),
    )  # fmt: skip


def linear_probe_augmented(
    batches_for: Callable[[Tensor], tuple[Batches, int]],
    train_clean_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    wds: Sequence[float] = (0.0,),
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = DEFAULT_BATCH,
    holdout: float = 0.1,
    device: torch.device | None = None,
) -> LinearResult:
    """Linear evaluation with a new augmentation of every training image each epoch.

    ``batches_for(rows)`` returns ``(batches, steps_per_epoch)`` that run the frozen encoder
    on augmented crops of training rows ``rows``. Held-out and test images are scored on
    their clean features (``train_clean_x`` / ``test_x``), as the papers evaluate on a
    centre view.
    """
    device = device or torch.device("cpu")
    cands = grid(lrs, wds)
    scale = batch_size / REFERENCE_BATCH
    dim = int(train_clean_x.shape[1])

    def train(rows: Tensor, chosen: list[Candidate]) -> LinearHeads:
        heads = LinearHeads(
            dim, num_classes, [c.lr * scale for c in chosen], [c.wd for c in chosen], norm="bn"
        ).to(device)
        batches, steps = batches_for(rows)
        fit_heads(heads, batches, epochs, steps)
        return heads

    all_rows = torch.arange(int(train_y.shape[0]))
    split = _holdout(train_y, holdout, len(cands))
    best = 0
    if split is not None:
        fit, held = split
        heads = train(fit, cands)
        best = choose(cands, score_heads(heads, train_clean_x[held], train_y[held]))
    final = train(all_rows, [cands[best]])
    test = score_heads(final, test_x.float(), test_y.long())
    return LinearResult(
        top1=test.top1[0], top5=test.top5[0], lr=cands[best].lr, wd=cands[best].wd,
        candidates=cands, epochs=epochs, batch_size=batch_size,
        train_images=int(train_y.shape[0]),
        holdout_images=0 if split is None else int(split[1].numel()),
        test_images=int(test_y.shape[0]), augment=True, classifier=final.export_head(),
    )  # fmt: skip
