"""MoCo v1 (He et al. 2019, "Momentum Contrast for Unsupervised Visual Representation
Learning") and MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning").

A query encoder trained by back-propagation, a key encoder that is its moving average, and
a queue of past keys as negatives: InfoNCE of each query against its own key (positive)
and the K queued keys, temperature τ. Follows the official PyTorch code
(facebookresearch/moco) where it and the papers differ in detail:

- the key encoder is updated at the start of each step, before the keys are computed;
- the keys of the step are enqueued after the logits are computed (so a query never
  meets its own key among the negatives);
- SGD with weight decay on every parameter (BN and biases included) and no warm-up;
- shuffle-BN: BN statistics come from groups of 32 images (one GPU of the 8-GPU run)
  for both encoders, and the key batch is shuffled across the groups first
  (:mod:`sslcli.nn.shuffle_bn`; the single-GPU CIFAR-10 demo's SplitBatchNorm).

The queue's length K is the official 65,536 on ImageNet-size data and is otherwise sized
from the data set (:func:`sslcli.nn.queue.default_queue_size`: the largest power of two
<= N/8, e.g. CIFAR-10's 4096 as in the official demo); a K stated larger than the data
set warns.

v2 changes only the head (MLP), the temperature, the augmentation (blur, weaker jitter
applied with p 0.8) and the learning-rate schedule (cosine); the shared implementation
lives in :class:`_MoCo`.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim
from sslcli.data.views import ViewSpec, moco_v1_views, moco_v2_views
from sslcli.method import (
    RESUME_SAFE,
    Batch,
    Method,
    MethodConfig,
    Recipe,
    RunContext,
    StepInfo,
    StepOutput,
    depends_on,
)
from sslcli.nn import (
    KeyQueue,
    bn_groups,
    default_queue_size,
    dist,
    ema_update_,
    momentum_copy,
    queue_size_warning,
    shuffle_bn_forward,
    split_batchnorm,
)

# -- the loss -------------------------------------------------------------------------------


def moco_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """``[q·k⁺, q·queue] / τ``: column 0 is the positive, the K others the negatives.

    "a contrastive loss ... whose value is low when q is similar to its positive key k⁺
    and dissimilar to all other keys: L_q = −log exp(q·k⁺/τ) / Σ_{i=0}^{K} exp(q·k_i/τ)"
    (He et al. 2019, Eq. 1); with the logits laid out as in Alg. 1, the loss is the cross
    entropy against label 0. ``q``, ``k``: [N, D], unit rows; ``queue``: [K, D].
    """
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.T
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def moco_loss(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """InfoNCE (Eq. 1) and its logits; computed in fp32 even under autocast, because
    ``1/τ`` = 14 magnifies bf16 rounding of the similarities."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = moco_logits(q.float(), k.float(), queue.float(), temperature)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels), logits


# -- configuration ----------------------------------------------------------------------------


class MoCoConfig(MethodConfig):
    """Options shared by MoCo v1 and v2 (the subclasses set the version's defaults)."""

    temperature: float = Field(
        0.07,
        gt=0,
        description="Softmax temperature τ: 0.07 (v1), 0.2 (v2), 0.1 CIFAR demo.",
        json_schema_extra=RESUME_SAFE,  # only scales the logits
    )
    head: Literal["linear", "mlp"] = Field(
        "linear",
        description="Projection: 'linear' D->128 (v1, CIFAR demo) or 'mlp' D->D->ReLU->128 (v2).",
    )
    proj_dim: int = Field(128, ge=1, description="Width of the keys/queries (128 in both papers).")
    queue_size: int | None = Field(
        None,
        ge=1,
        description=(
            "Number of queued negative keys K; must be a multiple of the global batch (x2 "
            "with symmetric), as in the official code. Default: sized from the data set, "
            "the largest power of two <= N/8, at most the official 65536 (ImageNet keeps "
            "65536; CIFAR-10 gets 4096, the official CIFAR demo's value). A K larger than "
            "the data set warns: the queue would hold stale copies of the current images."
        ),
        json_schema_extra=depends_on("data set size"),
    )
    momentum: float = Field(
        0.999,
        ge=0,
        le=1,
        description="Key-encoder momentum m: 0.999 on ImageNet, 0.99 for short/small runs.",
    )
    symmetric: bool = Field(
        False,
        description=(
            "Also contrast view 2's query with view 1's key and sum the two losses (CIFAR "
            "demo option; behaves like twice the epochs, enqueues 2x the batch per step)."
        ),
    )
    bn_group_size: int = Field(
        32,
        ge=1,
        description=(
            "Images per BatchNorm group (shuffle-BN): MoCo's statistics came from 32 images "
            "per GPU (256 / 8 GPUs); the demo's 512 / 8 = 64. Per-process batches up to this "
            "size are one group; larger ones must be a multiple of it."
        ),
    )
    crop_min_scale: float = Field(
        0.2, gt=0, le=1, description="Smallest crop area fraction (0.2; the CIFAR demo 0.08)."
    )
    blur_p: float = Field(
        0.0, ge=0, le=1, description="Gaussian-blur probability (v2: 0.5; v1 and CIFAR: 0)."
    )


class MoCoV1Config(MoCoConfig):
    temperature: float = Field(
        0.07,
        gt=0,
        description="Softmax temperature τ (v1 paper: 0.07).",
        json_schema_extra=RESUME_SAFE,  # only scales the logits
    )
    head: Literal["linear", "mlp"] = Field(
        "linear", description="Projection: 'linear' D->128 (v1) or 'mlp' D->D->ReLU->128 (v2)."
    )
    blur_p: float = Field(0.0, ge=0, le=1, description="Gaussian-blur probability (v1: none).")


class MoCoV2Config(MoCoConfig):
    temperature: float = Field(
        0.2,
        gt=0,
        description="Softmax temperature τ (v2: 0.2; the CIFAR demo 0.1).",
        json_schema_extra=RESUME_SAFE,
    )
    head: Literal["linear", "mlp"] = Field(
        "mlp",
        description="Projection: 'mlp' D->D->ReLU->128 (v2) or 'linear' D->128 (CIFAR demo).",
    )
    blur_p: float = Field(
        0.5, ge=0, le=1, description="Gaussian-blur probability (v2: 0.5; CIFAR demo: 0)."
    )


_SGD = {
    "name": "sgd",
    "lr": 0.03,
    "lr_scaling": "linear",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    # The official optimiser is torch SGD over model.parameters(): BN and biases decay too.
    "exclude_norm_bias": False,
}


# -- the method -------------------------------------------------------------------------------


class _MoCo(Method):
    """Shared MoCo v1/v2 implementation; the subclasses set defaults and augmentation."""

    Config: ClassVar[type[MethodConfig]] = MoCoConfig
    # Official code (facebookresearch/moco, moco/builder.py): base_encoder(num_classes=dim),
    # torchvision's default zero_init_residual=False (γ = 1).
    zero_init_last: ClassVar[bool | None] = False

    def __init__(self, config: MoCoConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: MoCoConfig = config
        width = feature_dim(backbone)
        self.head = self._make_head(width, config)
        # "the key encoder ... is initialized as the query encoder" and never gets
        # gradients; it covers encoder and head, as encoder_k does in the official code.
        self.key_encoder = nn.Sequential(
            OrderedDict(backbone=momentum_copy(backbone), head=momentum_copy(self.head))
        )
        # The trainer fills queue_size from option_defaults; None remains for a method
        # built directly and for runs recorded before (their config.json holds null).
        size = config.queue_size
        if size is None:
            size = default_queue_size(dataset_size)
        origin = ""
        if dataset_size >= 1 and size == default_queue_size(dataset_size):
            origin = f" (the default for {dataset_size} images: a power of two <= N/8)"
        if 1 <= dataset_size < size:
            warnings.warn(queue_size_warning(self.name, size, dataset_size), stacklevel=2)
        self.queue = KeyQueue(config.proj_dim, size, option="method.queue_size", origin=origin)

    @classmethod
    def option_defaults(cls, ctx: RunContext) -> dict[str, Any]:
        """The queue sized from the data set (recorded in the run's config.json)."""
        return {"queue_size": default_queue_size(ctx.dataset_size)}

    @staticmethod
    def _make_head(width: int, c: MoCoConfig) -> nn.Module:
        """v1: "the output of the fc layer is 128-D" — one Linear (with bias, torchvision's
        fc). v2: "replace the fc head in MoCo with a 2-layer MLP head (hidden layer 2048-d,
        with ReLU)" — no BN, biases in both layers."""
        if c.head == "linear":
            return nn.Linear(width, c.proj_dim)
        return nn.Sequential(
            nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, c.proj_dim)
        )

    # -- the key encoder's update rule -----------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k ← m·θ_k + (1−m)·θ_q (He et al. 2019, Eq. 2), encoder and head."""
        m = self.config.momentum
        ema_update_(self.key_encoder.backbone, self.backbone, m)
        ema_update_(self.key_encoder.head, self.head, m)

    # -- one step ---------------------------------------------------------------------------------
    def _queries(self, x: Tensor) -> Tensor:
        groups = bn_groups(x.shape[0], self.config.bn_group_size)
        with split_batchnorm(self.backbone, self.head, groups=groups):
            return F.normalize(self.head(self.backbone(x)), dim=1)

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        return F.normalize(
            shuffle_bn_forward(self.key_encoder, x, self.config.bn_group_size), dim=1
        )

    def _contrast(self, xq: Tensor, xk: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q = self._queries(xq)
        k = self._keys(xk)
        # A copy: the enqueue below overwrites rows that backward still needs for dL/dq.
        loss, logits = moco_loss(q, k, self.queue.keys.clone(), self.config.temperature)
        return loss, logits, q, k

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        c = self.config
        x1, x2 = batch.views
        per_step = x1.shape[0] * dist.world_size() * (2 if c.symmetric else 1)
        self.queue.check_batch(per_step)  # fail before any work, not after the first loss
        # Update first, so the keys of this step come from the freshly averaged encoder.
        self.momentum_update()
        loss, logits, q, k2 = self._contrast(x1, x2)
        keys = k2
        if c.symmetric:
            # The demo sums the two directions (not a mean) and enqueues both views' keys.
            loss_21, _, _, k1 = self._contrast(x2, x1)
            loss = loss + loss_21
            keys = torch.cat([k1, k2])
        # After the logits: the current keys join the negatives from the next step on.
        self.queue.enqueue(keys)
        with torch.no_grad():
            logs: dict[str, Tensor | float] = {
                "acc": (logits.argmax(dim=1) == 0).float().mean(),
                "pos_sim": logits[:, 0].mean() * c.temperature,
                "neg_sim": logits[:, 1:].mean() * c.temperature,
            }
        return StepOutput(loss=loss, logs=logs, embedding=q.detach())

    def export_candidates(self) -> dict[str, nn.Module]:
        # The query encoder is what MoCo evaluates; the key encoder is its smoother average.
        return {"backbone": self.backbone, "key_backbone": self.key_encoder.backbone}


class MoCoV1(_MoCo):
    """MoCo v1: momentum key encoder, 65,536-key queue, linear 128-d head, τ 0.07.

    Augmentation as in the official v1 code: RandomResizedCrop(0.2–1) → Grayscale p0.2 →
    ColorJitter(0.4, 0.4, 0.4, 0.4) always → flip. SGD lr 0.03 × B/256, momentum 0.9,
    weight decay 1e-4 on all parameters, 200 epochs with lr ×0.1 at epochs 120 and 160.

    The recipe states the decays as fractions of the run (0.6 and 0.8: epochs 120 and 160
    of 200), so a run of any length decays at the same relative points.
    """

    name = "moco-v1"
    Config = MoCoV1Config
    recipe = Recipe(
        optim=dict(_SGD),
        schedule={"kind": "step", "milestones": [0.6, 0.8], "gamma": 0.1, "warmup_epochs": 0},
    )

    def views(self) -> list[ViewSpec]:
        c = self.config
        return moco_v1_views(self.backbone.sslcli_spec.image_size, c.crop_min_scale, c.blur_p)


class MoCoV2(_MoCo):
    """MoCo v2: MoCo v1 with an MLP head, τ 0.2, blur augmentation and a cosine schedule.

    Augmentation as in the official ``--aug-plus``: RandomResizedCrop(0.2–1) →
    ColorJitter(0.4, 0.4, 0.4, 0.1) p0.8 → Grayscale p0.2 → Gaussian blur σ∈[0.1, 2] p0.5
    → flip. SGD lr 0.03 × B/256, momentum 0.9, weight decay 1e-4, cosine, 200 epochs.
    ``examples/recipes/moco-v2-cifar.toml`` is the official CIFAR-10 demo (ResNet-18,
    B 512, K 4096, m 0.99, τ 0.1, linear head, no blur, crops 0.08–1).
    """

    name = "moco-v2"
    Config = MoCoV2Config
    recipe = Recipe(optim=dict(_SGD), schedule={"kind": "cosine", "warmup_epochs": 0})

    def views(self) -> list[ViewSpec]:
        c = self.config
        return moco_v2_views(self.backbone.sslcli_spec.image_size, c.crop_min_scale, c.blur_p)
