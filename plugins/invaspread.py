"""InvaSpread (Ye et al. 2019, "Unsupervised Embedding Learning via Invariant and
Spreading Instance Feature").

Each image of the batch is augmented twice and both views are encoded by the same network
(a linear 128-d layer on the encoder, then L2 normalisation). Every view is an anchor that
must find its partner view among the other 2B − 1 views (invariance) while the other views
are pushed away (spreading). No memory bank and no momentum encoder: everything is in the
batch.

Follows the official code (mangye16/Unsupervised_Embedding_Learning, ``BatchAverage.py``
and ``demo_seen.py``) where it differs from the paper: all 2B views are anchors (the paper
writes the loss for the B originals), the scored side of every inner product is a
stop-gradient copy (one-sided: gradients reach a feature only through its role as anchor),
and the loss divides by 2B. Unlike the official code it accepts any batch size, so a
smaller last batch works.

The official code trains on one GPU. Under several processes every process's views are
anchors scored against the views of the whole global batch (all-gathered; they are the
stop-gradient side, so no gradient crosses processes), and the mean of the processes'
losses is the one-process loss of the global batch: the same run on 1 or N processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim
from sslcli.data.views import ViewSpec, invaspread_views
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import UnitEmbedding, dist


def invaspread_loss(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """The coded InvaSpread loss over the 2B views ``x = [z1; z2]`` (unit rows).

    Ye et al. 2019, Sec. 3: the probability that the augmented x̂_i is recognised as
    instance i, ``P(i|x̂_i) = exp(f_i^T f̂_i/τ) / Σ_k exp(f_k^T f̂_i/τ)``, and that another
    instance x_j is recognised as i, ``P(i|x_j)``; the loss is
    ``−Σ_i log P(i|x̂_i) − Σ_i Σ_{j≠i} log(1 − P(i|x_j))`` (invariance + spreading). As the
    official ``BatchCriterion`` computes it: for anchor i with
    partner p(i), ``s_ij = exp(x_i·sg(x_j)/τ)`` for j ≠ i, ``D_i = Σ_{j≠i} s_ij``,

        L = −(1/2B) Σ_i [ log(s_{i,p(i)}/D_i) + Σ_{j∉{i,p(i)}} log(1 − s_ij/D_i) ].

    Computed in fp32 with the scores shifted by their row maximum, and ``1 − P_ij`` as
    ``(D_i − s_ij)/D_i``; for the row's largest score, ``D_i − s_ij`` is summed directly
    over the other columns, so a negative with ``P_ij → 1`` still gives a finite
    ``log(1 − P_ij)`` (the official code returns inf there). Under several processes the
    scored columns are all-gathered (they are stop-gradient, so no gradient has to travel
    back) and each process's anchors are its own views. Returns (loss, log P⁺ [2B]).
    """
    with torch.autocast(device_type=z1.device.type, enabled=False):
        b = z1.shape[0]
        anchors = torch.cat([z1, z2]).float()  # [2b, D]
        g1, g2 = dist.gather(z1.detach().float()), dist.gather(z2.detach().float())
        total = g1.shape[0]
        cols = torch.cat([g1, g2])  # [2bW, D], the stop-gradient side
        sims = anchors @ cols.T / temperature
        local = torch.arange(b, device=z1.device) + dist.rank() * b
        self_col = torch.cat([local, local + total])
        partner = torch.cat([local + total, local])
        rows = torch.arange(2 * b, device=z1.device)
        is_self = torch.zeros_like(sims, dtype=torch.bool)
        is_self[rows, self_col] = True
        shift = sims.masked_fill(is_self, float("-inf")).amax(dim=1, keepdim=True).detach()
        e = torch.exp(sims - shift).masked_fill(is_self, 0.0)  # s_ij / max_j s_ij
        d = e.sum(dim=1, keepdim=True)  # D_i / max_j s_ij, >= 1
        log_d = torch.log(d)
        log_pos = sims[rows, partner] - shift.squeeze(1) - log_d.squeeze(1)
        top = F.one_hot(e.argmax(dim=1), e.shape[1]).bool()
        without_top = e.masked_fill(top, 0.0).sum(dim=1, keepdim=True)
        rest = torch.where(top, without_top, d - e)  # (D_i − s_ij) / max_j s_ij
        spread = torch.log(rest.clamp_min(torch.finfo(rest.dtype).tiny)) - log_d
        # Only the negatives j ∉ {i, p(i)} spread (the diagonal is log 1 = 0 already).
        keep = ~is_self
        keep[rows, partner] = False
        loss = -(log_pos.sum() + (spread * keep).sum()) / (2 * b)
        return loss, log_pos


class InvaSpreadConfig(MethodConfig):
    temperature: float = Field(0.1, gt=0, description="τ of the softmax over the batch (0.1).")
    proj_dim: int = Field(128, ge=1, description="Width of the unit embedding (128).")
    crop_min_scale: float = Field(0.2, gt=0, le=1, description="Smallest crop area fraction.")


class InvaSpread(Method):
    """InvaSpread: two views per image, invariance to the partner and spreading in-batch."""

    name = "invaspread"
    # Official code (mangye16/Unsupervised_Embedding_Learning): models/resnet.py fills every
    # BN weight with 1; models/resnet_cifar.py keeps PyTorch's default (1).
    zero_init_last = False
    Config = InvaSpreadConfig
    # demo_seen.py: torch SGD over all parameters, lr 0.03 at batch 128 (a fixed value, no
    # batch-size rule), weight decay 5e-4, 301 epochs. Its schedule since the authors'
    # "fix lr bug" commit (before it, the later branches of an if/elif chain were never
    # reached and only ×0.1 applied): lr × 0.1 from epoch 120, × 0.05 from 160, × 0.01
    # from 200, each relative to the base lr — stated here as fractions of the 301-epoch
    # run, so a run of any length decays at the same relative points.
    recipe = Recipe(
        optim={
            "name": "sgd",
            "lr": 0.03,
            "lr_scaling": "none",
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "exclude_norm_bias": False,
        },
        schedule={
            "kind": "step",
            "milestones": [120 / 301, 160 / 301, 200 / 301],
            "milestone_factors": [0.1, 0.05, 0.01],
            "warmup_epochs": 0,
        },
    )

    def __init__(self, config: InvaSpreadConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: InvaSpreadConfig = config
        self.head = nn.Linear(feature_dim(backbone), config.proj_dim)

    def views(self) -> list[ViewSpec]:
        # demo_seen.py: RandomResizedCrop(0.2–1) → ColorJitter(0.4, 0.4, 0.4, 0.4) always →
        # RandomGrayscale(0.2) → flip.
        return invaspread_views(self.backbone.sslcli_spec.image_size, self.config.crop_min_scale)

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        # One forward over both views, as the official code (torch.cat then net): BN
        # statistics come from all 2B images.
        z = F.normalize(self.head(self.backbone(torch.cat([x1, x2]))).float(), dim=1)
        z1, z2 = z.chunk(2)
        loss, log_pos = invaspread_loss(z1, z2, self.config.temperature)
        logs: dict[str, Tensor | float] = {"pos_prob": log_pos.detach().exp().mean()}
        return StepOutput(loss=loss, logs=logs, embedding=z1.detach())

    def export_candidates(self) -> dict[str, nn.Module]:
        # The backbone's pooled feature is the default; the official kNN (demo_seen.py,
        # k 200, the published CIFAR-10 numbers) reads the 128-d unit embedding:
        # ``--which embedding``.
        return {"backbone": self.backbone, "embedding": UnitEmbedding(self.backbone, self.head)}
