"""SimCLR v1 (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations").

Two views of each image, an MLP projection head, and NT-Xent with the partner view as the
positive and the 2N-2 other views as negatives (gathered across processes). Follows the
official TensorFlow code: head Linear(D)->BN->ReLU->Linear(128)->BN, LARS with BN and
biases excluded, lr 0.3 x B/256, 10 warm-up epochs then cosine, weight decay 1e-6,
Inception-style crops with bicubic resize, colour distortion of strength 1.0 with random
order, blur on ImageNet, and no mean/std normalisation of the pixels.
"""

from __future__ import annotations

import torch
from pydantic import Field

from sslcli.backbones import Backbone, feature_dim
from sslcli.data.views import ViewSpec
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn.heads import MLP
from sslcli.nn.losses import nt_xent


class SimCLRConfig(MethodConfig):
    temperature: float = Field(
        0.1, gt=0, description="NT-Xent temperature: 0.1 for ImageNet, 0.5 for CIFAR-size data."
    )
    proj_hidden_dim: int | None = Field(
        None, ge=1, description="Projection hidden width; default: the encoder's feature width."
    )
    proj_dim: int = Field(128, ge=1, description="Output width of the projection head.")
    color_strength: float = Field(
        1.0, ge=0, description="Colour-distortion strength s: 1.0 ImageNet, 0.5 CIFAR."
    )
    blur_p: float = Field(
        0.5, ge=0, le=1, description="Gaussian-blur probability: 0.5 ImageNet, 0 for CIFAR."
    )
    crop_min_scale: float = Field(0.08, gt=0, le=1, description="Smallest crop area fraction.")


class SimCLR(Method):
    """SimCLR v1: two views, MLP projection, NT-Xent over 2N-2 in-batch negatives."""

    name = "simclr"
    Config = SimCLRConfig
    recipe = Recipe(
        optim={
            "name": "lars",
            "lr": 0.3,
            "lr_scaling": "linear",
            "weight_decay": 1e-6,
            "exclude_norm_bias": True,
        },
        schedule={"kind": "cosine", "warmup_epochs": 10},
    )

    def __init__(self, config: SimCLRConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: SimCLRConfig = config
        width = feature_dim(backbone)
        hidden = config.proj_hidden_dim or width
        # v1 head as in the official code: both linear layers followed by BN.
        self.projector = MLP([width, hidden, config.proj_dim], last_bn=True)

    def views(self) -> list[ViewSpec]:
        c = self.config
        s = c.color_strength
        return [
            ViewSpec(
                count=2,
                size=self.backbone.sslcli_spec.image_size,
                scale=(c.crop_min_scale, 1.0),
                interpolation="bicubic",
                jitter_p=0.8,
                brightness=0.8 * s,
                contrast=0.8 * s,
                saturation=0.8 * s,
                hue=min(0.5, 0.2 * s),
                grayscale_p=0.2,
                blur_p=c.blur_p,
                normalize=False,
            )
        ]

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        # One forward over both views, as the official code does: BN statistics then come
        # from all 2N images rather than from each view separately.
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
        loss = nt_xent(z1, z2, self.config.temperature)
        return StepOutput(loss=loss, embedding=z1.detach())
