"""Barlow Twins (Zbontar et al. 2021) as an sslcli method plugin.

"The objective function ... tries to equate the cross-correlation matrix computed from
twin embeddings as close to the identity matrix as possible" (Sec. 2):
L = Σ_i (1 − C_ii)² + λ Σ_i Σ_{j≠i} C_ij², with C the cross-correlation of the two views'
embeddings, each standardised along the batch. Follows the official code: a 3-layer
projector of width 8192 (Linear→BN→ReLU twice, then Linear), λ = 0.0051, the batch
statistics and C taken over the global batch (all processes), LARS with biases and BN
excluded, BYOL's asymmetric augmentations with bicubic crops.

It imports only sslcli's public plugin API (``sslcli.plugin``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sslcli.plugin import (
    MLP,
    Backbone,
    Batch,
    Method,
    MethodConfig,
    Recipe,
    RunContext,
    StepInfo,
    StepOutput,
    ViewSpec,
    byol_views,
    depends_on,
    dist,
    feature_dim,
    full_precision,
    view_size,
)


class BarlowTwinsConfig(MethodConfig):
    proj_dim: int | None = Field(
        None,
        ge=1,
        description="Projector width (all three layers). Default: the official 8192 on a "
        "GPU run over ImageNet-sized data (>= 100,000 images), else 4x the backbone's "
        "feature width (2048 for a ResNet-18), at most 8192.",
        json_schema_extra=depends_on("backbone, data set size and device"),
    )
    lambd: float = Field(0.0051, gt=0, description="Weight of the off-diagonal (redundancy) term.")
    crop_min_scale: float = Field(
        0.08, gt=0, le=1, description="Smallest crop area (fraction of the image), 0.08–1."
    )


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float) -> Tensor:
    """Cross-correlation loss; ``z1``, ``z2`` are [N, D] projector outputs of the two views.

    The rows of every process are gathered (with their gradients), each view is
    standardised per dimension over that global batch (BatchNorm without affine, which the
    official code synchronises across GPUs), and C = z1ᵀ z2 / N_global.

    It runs in float32 even inside the engine's bf16 autocast: C sums N products per
    entry and its diagonal is compared with 1, so bf16's 8-bit mantissa would move the
    loss itself (516.0 against 514.889 in float32 on a 256 x 512 batch of N(0, 1) rows).
    """
    with full_precision(z1.device):
        a = dist.gather_with_grad(z1).float()
        b = dist.gather_with_grad(z2).float()
        n = a.shape[0]
        bn = nn.functional.batch_norm
        a = bn(a, None, None, training=True, eps=1e-5)
        b = bn(b, None, None, training=True, eps=1e-5)
        c = a.T @ b / n
        diag = torch.diagonal(c)
        on_diag = (diag - 1).pow(2).sum()
        off_diag = c.pow(2).sum() - diag.pow(2).sum()
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
        d = config.proj_dim or 8192  # None only when built outside a run
        self.projector = MLP([feature_dim(backbone), d, d, d], bias=False)

    @classmethod
    def option_defaults(cls, ctx: RunContext) -> dict[str, int]:
        """The paper's 8192-wide projector where it was trained (ResNet-50, ImageNet, GPUs;
        Fig. 4: wider keeps helping there); on a small or CPU run a projector of 3 x 8192²
        weights would dwarf the backbone, so 4x the feature width."""
        if ctx.device == "cuda" and ctx.dataset_size >= 100_000:
            return {"proj_dim": 8192}
        return {"proj_dim": min(8192, 4 * ctx.feature_dim)}

    def views(self) -> list[ViewSpec]:
        # The official augmentations are BYOL's pair, crops resampled bicubically.
        return byol_views(view_size(self.backbone), self.config.crop_min_scale)

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        loss = barlow_twins_loss(z1, z2, self.config.lambd)
        return StepOutput(loss=loss, embedding=z1.detach())
