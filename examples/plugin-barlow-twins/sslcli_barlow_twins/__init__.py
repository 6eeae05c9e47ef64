"""Barlow Twins (Zbontar et al. 2021) as an sslcli method plugin.

"The objective function ... tries to equate the cross-correlation matrix computed from
twin embeddings as close to the identity matrix as possible" (Sec. 2):
L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij², with C the cross-correlation of the two views'
embeddings, each standardised along the batch. Follows the official code: a 3-layer
projector of width 8192 (Linear→BN→ReLU twice, then Linear), λ = 0.0051, C summed over
processes, LARS with biases and BN excluded, BYOL's asymmetric augmentations.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sslcli import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput, ViewSpec
from sslcli.backbones import Backbone, feature_dim
from sslcli.nn import dist
from sslcli.nn.heads import MLP


class BarlowTwinsConfig(MethodConfig):
    proj_dim: int = Field(8192, ge=1, description="Projector width (all three layers).")
    lambd: float = Field(0.0051, gt=0, description="Weight of the off-diagonal (redundancy) term.")


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float) -> Tensor:
    """Cross-correlation loss; ``z1``, ``z2`` are [N, D] projector outputs of the two views.

    Each view is standardised per dimension over the global batch (BN without affine, as
    in the official code), then C = z1ᵀ z2 / N_global is summed across processes.
    """
    n = z1.shape[0] * dist.world_size()
    bn = nn.functional.batch_norm
    a = bn(z1.float(), None, None, training=True, eps=1e-5)
    b = bn(z2.float(), None, None, training=True, eps=1e-5)
    c = dist.all_reduce_sum(a.T @ b) / n
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


class BarlowTwins(Method):
    """Barlow Twins: make the views' cross-correlation matrix the identity."""

    name = "barlow-twins"
    Config = BarlowTwinsConfig
    recipe = Recipe(
        optim={"name": "lars", "lr": 0.2, "lr_scaling": "linear", "weight_decay": 1.5e-6},
        schedule={"kind": "cosine", "warmup_epochs": 10},
    )

    def __init__(
        self, config: BarlowTwinsConfig, backbone: Backbone, dataset_size: int = 0
    ) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: BarlowTwinsConfig = config
        d = config.proj_dim
        self.projector = MLP([feature_dim(backbone), d, d, d], bias=False)

    def views(self) -> list[ViewSpec]:
        size = self.backbone.sslcli_spec.image_size
        common = dict(size=size, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        return [
            ViewSpec(blur_p=1.0, solarize_p=0.0, **common),
            ViewSpec(blur_p=0.1, solarize_p=0.2, **common),
        ]

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        loss = barlow_twins_loss(z1, z2, self.config.lambd)
        return StepOutput(loss=loss, embedding=z1.detach())
