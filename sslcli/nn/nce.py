"""Noise-contrastive estimation against a memory bank (InstDisc, CMC).

Notation of Wu et al. 2018 (Sec. 3.1–3.2): ``f`` an image's unit embedding, ``v_j`` bank
rows, ``N`` the data set size, ``K`` noise samples per image drawn uniformly (``P_n =
1/N``), ``s_j = exp(v_j·f/τ)`` and ``P(j|f) = s_j / Z``. The positive sits in column 0 of
every ``[B, K+1]`` score matrix, as in the official ``NCEAverage``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.nn import dist

EPS = 1e-7
"""Added to the NCE denominators, as in the official ``NCECriterion``."""


def sample_noise_indices(index: Tensor, k: int, dataset_size: int) -> Tensor:
    """``[B, K+1]`` bank rows: column 0 the image's own index, then K uniform draws.

    The noise distribution is uniform, ``P_n = 1/N`` (Wu et al. 2018, Sec. 3.2). The draws
    are with replacement and may hit the positive, exactly as the official alias sampler
    over uniform weights. Uses the global torch RNG (saved in checkpoints).
    """
    noise = torch.randint(0, dataset_size, (index.shape[0], k), device=index.device)
    return torch.cat([index.reshape(-1, 1).to(noise.dtype), noise], dim=1)


OFFICIAL_NCE_K = 4096
SMALL_DATA_SET = 8 * OFFICIAL_NCE_K
"""Below this many images the official K = 4096 is more than N/8."""


def default_noise_count(n: int) -> int:
    """K when the user gives none: the official 4096, or N/8 for data sets under 32,768
    images. 4096 was chosen for ImageNet (K/N = 0.3 %; CIFAR-10: 8 %); on a small set it
    would draw each image's own row among its noise several times over."""
    return min(OFFICIAL_NCE_K, max(1, n // 8))


def noise_count_warning(method: str, k: int, n: int) -> str:
    """Why K noise samples at least as many as the images is a poor NCE problem."""
    return (
        f"{method}: method.nce_k={k} >= {n} images: each image's own bank row is drawn about "
        f"{k / n:.1f} times among its noise samples, which cancels most of the pull towards "
        "it (the embedding tends to collapse); use a K well below the data set size, e.g. "
        f"method.nce_k={max(1, n // 8)}"
    )


def bank_scores(anchors: Tensor, rows: Tensor) -> Tensor:
    """``v_j·f`` for every anchor ``f`` [B, D] and its rows ``v`` [B, K+1, D] → [B, K+1]."""
    return torch.bmm(rows, anchors.unsqueeze(2)).squeeze(2)


def nce_criterion(probs: Tensor, dataset_size: int) -> Tensor:
    """The NCE loss of InstDisc, given ``P(j|f)`` for the positive and K noise rows.

    Wu et al. 2018, Sec. 3.2: the posterior that sample i comes from the data is
    ``h(i, v) = P(i|v) / (P(i|v) + m·P_n(i))`` and the objective is
    ``J_NCE = −E_{P_d}[log h(i, v)] − m·E_{P_n}[log(1 − h(i, v'))]``; with ``m = K`` and
    the noise expectation estimated by the K samples:

        L = −(1/B) Σ_b [ log(P_0 / (P_0 + K·P_n + ε)) + Σ_{k≥1} log(K·P_n / (P_k + K·P_n + ε)) ]

    (``1 − h = K·P_n / (P + K·P_n)``; ε = 1e-7 in the denominators as in the official code).
    ``probs``: [B, K+1], column 0 the positive.
    """
    k = probs.shape[1] - 1
    kpn = k / float(dataset_size)
    pos, neg = probs[:, 0], probs[:, 1:]
    log_pos = torch.log(pos / (pos + kpn + EPS))
    log_neg = torch.log(kpn / (neg + kpn + EPS))
    return -(log_pos.sum() + log_neg.sum()) / probs.shape[0]


class NCENormalizer(nn.Module):
    """The partition function ``Z`` of ``P(i|v) = exp(v_i·f/τ) / Z``, estimated once.

    Wu et al. 2018, Sec. 3.2: Z is treated as a constant estimated by Monte Carlo,
    ``Z ≃ n·E_j[exp(v_j^T f_i/τ)] ≈ (n/m) Σ_k exp(v_{j_k}^T f_i/τ)`` over random rows
    ``j_k``. The official code computes it on the first batch, from the mean of all
    ``B × (K+1)`` scores times N, and freezes it (``momentum=None``). With a momentum
    ``μ`` (0.99 is the known improvement), every later batch's estimate is blended in:
    ``Z ← μ·Z + (1 − μ)·Ẑ``, and the updated value is used for that batch, as the first
    batch uses its own estimate.

    ``Z`` is a buffer (``-1`` = not estimated yet), so a resumed run continues with the very
    same constant. It carries no gradient (a constant in the official backward). Under
    several processes the estimate is averaged over them, so all use one ``Z``.
    """

    z: Tensor

    def __init__(self, dataset_size: int, momentum: float | None = None) -> None:
        super().__init__()
        self.dataset_size = dataset_size
        self.momentum = momentum
        self.register_buffer("z", torch.full((), -1.0))

    @torch.no_grad()
    def forward(self, scores: Tensor) -> Tensor:
        """Update (if due) and return ``Z`` for ``scores`` = exp(v·f/τ), any shape."""
        estimate = dist.all_reduce_mean(scores.detach().float().mean()) * self.dataset_size
        unset = self.z < 0
        if self.momentum is None:
            new = torch.where(unset, estimate, self.z)
        else:
            mu = self.momentum
            new = torch.where(unset, estimate, mu * self.z + (1 - mu) * estimate)
        # No host sync: the "first batch?" test is a device-side select.
        self.z.copy_(new)
        return self.z.clone()

    def extra_repr(self) -> str:
        rule = "frozen after the first batch" if self.momentum is None else f"EMA {self.momentum}"
        return f"N={self.dataset_size}, {rule}"


class NCELoss(nn.Module):
    """InstDisc's NCE for one anchor set against K+1 bank rows each; owns its ``Z``.

    ``forward(anchors [B, D], rows [B, K+1, D])`` → (loss, ``P`` [B, K+1]): the scores
    ``s = exp(v·f/τ)``, ``P = s/Z`` and :func:`nce_criterion`. Computed in fp32 with
    autocast off: ``exp(1/0.07) ≈ 1.6e6`` leaves no room for bf16.
    """

    def __init__(self, dataset_size: int, temperature: float, z_momentum: float | None) -> None:
        super().__init__()
        self.dataset_size = dataset_size
        self.temperature = temperature
        self.normalizer = NCENormalizer(dataset_size, z_momentum)

    def forward(self, anchors: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:  # noqa: D102
        with torch.autocast(device_type=anchors.device.type, enabled=False):
            scores = torch.exp(bank_scores(anchors.float(), rows.float()) / self.temperature)
            probs = scores / self.normalizer(scores)
            return nce_criterion(probs, self.dataset_size), probs


def bank_softmax_loss(
    anchors: Tensor, bank: Tensor, index: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """InstDisc's non-parametric softmax over the whole bank (``nce_k = 0``).

    ``P(i|v) = exp(v_i^T v/τ) / Σ_{j=1}^{n} exp(v_j^T v/τ)`` (Wu et al. 2018, Sec. 3.1,
    the non-parametric softmax), the loss the negative log-likelihood of the image's own
    index: cross-entropy of ``f·Vᵀ/τ`` against ``index`` (official ``LinearAverage`` +
    ``CrossEntropyLoss``).
    Returns (loss, logits [B, N]). The bank must not be modified before backward.
    Precision: fp32 with autocast off (logits at 1/τ ≈ 14).
    """
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        logits = anchors.float() @ bank.float().T / temperature
        return F.cross_entropy(logits, index), logits


def sampled_softmax_loss(
    anchors: Tensor, rows: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """CMC's softmax variant: cross-entropy over the positive and its K noise rows.

    The official ``NCESoftmaxLoss``: the K+1 scores ``v·f/τ`` (positive in column 0) are
    logits and the label is 0 — a softmax over the sampled rows, not over the whole bank.
    Returns (loss, logits [B, K+1]). Precision: fp32 with autocast off.
    """
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        logits = bank_scores(anchors.float(), rows.float()) / temperature
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target), logits
