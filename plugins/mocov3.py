"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers").

A base encoder (backbone → projector → predictor) and a momentum encoder (backbone →
projector, the moving average of the base one). Each view's query is contrasted with the
momentum keys of the other view of every image in the (global) batch: InfoNCE with the
same image as the positive, no queue. Works with ResNets and ViTs; for ViTs the position
embedding is a fixed 2-D sin-cos table and the random patch projection is frozen, the
paper's stability trick. Follows the official PyTorch code (facebookresearch/moco-v3);
see :class:`MoCoV3`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim, is_vit_name
from sslcli.data.views import ViewSpec, asymmetric_views
from sslcli.errors import ConfigError
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import (
    MLP,
    cosine_momentum,
    dist,
    ema_update_pairs_,
    freeze_patch_projection_,
    moco_v3_init_,
    momentum_copy,
    use_sincos_pos_embed_,
)

# -- shared parts -----------------------------------------------------------------------------


def moco_v3_mlp(in_dim: int, hidden: int, out: int, num_layers: int, last_bn: bool) -> nn.Module:
    """MoCo v3's projector / predictor MLP: ``[Linear → BN → ReLU] × (L−1) → Linear``
    (+ BN without affine when ``last_bn``); no linear layer has a bias.

    "The projection head is a 3-layer MLP, and the prediction head is a 2-layer MLP. The
    hidden layers of both MLPs are 4096-d and are with ReLU; the output layers of both
    MLPs are 256-d, without ReLU. In MoCo v3, all layers in both MLPs have BN" (Chen, Xie
    & He 2021, appendix, implementation details; the ResNet projector has 2 layers). Official
    code (``_build_mlp``): the last BN has no learnable scale or shift ("follow SimCLR's
    design ... we further removed gamma in BN") and the ResNet predictor has no last BN.
    """
    dims = [in_dim] + [hidden] * (num_layers - 1) + [out]
    return MLP(dims, last_bn=last_bn, last_bn_affine=False, bias=False)


def momentum_at(step: int, total_steps: int, base: float, cosine: bool = True) -> float:
    """The momentum coefficient of step k: ``1 − (1 − m₀)·(cos(πk/K) + 1)/2`` (or m₀).

    The momentum encoder's coefficient starts at m₀ = 0.99 and rises to 1 along a
    half-cycle cosine (official ``--moco-m-cos``, used by every published recipe;
    ``adjust_moco_momentum`` evaluated per iteration: ``epoch + i / iters_per_epoch``
    over ``epochs`` = k/K); constant m₀ without ``cosine``.
    """
    return cosine_momentum(step, total_steps, base) if cosine else base


def ctr_loss(q: Tensor, k: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """MoCo v3's contrastive loss ``ctr(q, k)``; returns (loss, logits, labels).

    InfoNCE "L_q = −log exp(q·k⁺/τ) / (exp(q·k⁺/τ) + Σ_{k⁻} exp(q·k⁻/τ))" with "the keys
    that naturally co-exist in the same batch" as negatives (Chen, Xie & He 2021, Eq. 1),
    written as in Alg. 1: ``CrossEntropy(n(q)·n(k_all)ᵀ/τ, labels) · 2τ``, where
    ``k_all`` are the keys of every process (gathered without gradient: they come from
    the momentum encoder) and the positive of local row i is global row ``i + B·rank``.
    Computed in float32 (``1/τ`` = 5 magnifies bf16 rounding of the similarities).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        # Detached here too: on one process dist.gather is the identity and would keep a
        # graph that the multi-process gather never has.
        k = F.normalize(k.detach().float(), dim=1)
        k_all = dist.gather(k)
        logits = q @ k_all.T / temperature
        n = q.shape[0]
        labels = torch.arange(n, dtype=torch.long, device=q.device) + n * dist.rank()
        return F.cross_entropy(logits, labels) * (2 * temperature), logits, labels


# -- configuration ----------------------------------------------------------------------------


class MoCoV3Config(MethodConfig):
    temperature: float | None = Field(
        None,
        gt=0,
        description=(
            "Softmax temperature τ; default (null) by backbone: 0.2 for ViTs, 1.0 for "
            "ResNets and other convnets (the official recipes)."
        ),
    )
    momentum: float = Field(
        0.99,
        ge=0,
        le=1,
        description="Starting momentum m₀ (0.99; 0.996 for the 1000-epoch ResNet-50 recipe).",
    )
    momentum_cosine: bool = Field(
        True, description="Raise the momentum from m₀ to 1 along a half cosine (all recipes)."
    )
    proj_dim: int = Field(256, ge=1, description="Output width of projector and predictor.")
    mlp_dim: int = Field(4096, ge=1, description="Hidden width of projector and predictor.")
    proj_layers: int | None = Field(
        None,
        ge=1,
        description="Projector depth; default (null) by backbone: 3 for ViTs, 2 for ResNets.",
    )
    pred_layers: int = Field(2, ge=1, description="Predictor depth (2).")
    crop_min_scale: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Smallest crop area fraction; default (null) by backbone: 0.08 for ViTs, 0.2 "
            "for ResNets."
        ),
    )
    blur_p: tuple[float, float] = Field(
        (1.0, 0.1),
        description="Gaussian-blur probability of view 1 and view 2 (BYOL's); (0, 0) for CIFAR.",
    )
    solarize_p: tuple[float, float] = Field(
        (0.0, 0.2), description="Solarisation probability of view 1 and view 2 (BYOL's)."
    )
    fixed_pos_embed: bool = Field(
        True,
        description=(
            "ViTs only: fixed 2-D sin-cos position embedding (official); false = timm's "
            "learned one."
        ),
    )
    freeze_patch_embed: bool = Field(
        True,
        description=(
            "ViTs only: keep the random patch projection frozen (the paper's stability "
            "trick, --stop-grad-conv1); false = train it."
        ),
    )


# -- the method -------------------------------------------------------------------------------


class MoCoV3(Method):
    """MoCo v3: base/momentum encoders, in-batch keys (no queue), predictor; ViT-ready.

    Official-code details followed: each view is encoded separately (BN statistics per
    view); the momentum encoder (backbone + projector) is updated with the step's
    coefficient before the keys are computed; L = ctr(q₁, k₂) + ctr(q₂, k₁) with ``2τ``
    scaling and the keys gathered from all processes; projector/predictor widths
    4096/256, the projector 3 layers for ViTs and 2 for ResNets, the predictor 2 layers
    (with a final affine-free BN for ViTs only); ResNets with the last BN of each residual
    block zero-initialised (``zero_init_residual=True``); ViTs with the official weight
    initialisation, a fixed sin-cos position embedding and a frozen patch projection;
    BYOL's asymmetric augmentation (bilinear crops).

    Per-backbone defaults: for ViTs (the headline ``ssl train moco-v3 --backbone vit-s``)
    ``recipe`` is the official ViT one: AdamW lr 1.5e-4 × B/256, weight decay 0.1 on every
    parameter, 40 warm-up epochs then cosine; for ResNets :meth:`recipe_for` gives the
    official ResNet-50 one (LARS lr 0.6 × B/256 with 1-D parameters excluded, wd 1e-6, 10
    warm-up epochs; ``examples/recipes/moco-v3-resnet50-imagenet.toml``). The options
    that differ per backbone inside the method (temperature 0.2/1.0, projector depth 3/2,
    crop minimum 0.08/0.2) default to null and are resolved from
    ``backbone.sslcli_spec.is_vit``. The official ViT-S has 12 attention heads (timm's
    ``vit_small`` has 6): :meth:`backbone_kwargs` asks the backbone factory for
    ``num_heads=12``, so ``--backbone vit-s`` builds it, and checkpoints and exports
    record it (plain timm rebuilds the same network from ``config.json``).
    """

    name = "moco-v3"
    # Official code (facebookresearch/moco-v3, main_moco.py): torchvision ResNets built with
    # zero_init_residual=True (γ = 0).
    zero_init_last = True
    Config = MoCoV3Config
    recipe = Recipe(
        optim={
            "name": "adamw",
            "lr": 1.5e-4,
            "lr_scaling": "linear",
            "weight_decay": 0.1,
            "betas": (0.9, 0.999),
            # torch AdamW over model.parameters(): norms, biases and tokens decay too.
            "exclude_norm_bias": False,
        },
        schedule={"kind": "cosine", "warmup_epochs": 40},
    )
    resnet_recipe = Recipe(
        optim={
            "name": "lars",
            "lr": 0.6,
            "lr_scaling": "linear",
            "momentum": 0.9,
            "weight_decay": 1e-6,
            # The official LARS skips weight decay and adaptation for 1-D parameters.
            "exclude_norm_bias": True,
            "lars_eta": 0.001,
        },
        schedule={"kind": "cosine", "warmup_epochs": 10},
    )

    @classmethod
    def recipe_for(cls, backbone: str) -> Recipe:
        return cls.recipe if is_vit_name(backbone) else cls.resnet_recipe

    @classmethod
    def backbone_kwargs(cls, timm_name: str) -> dict[str, Any]:
        """The official ViT-Small: 12 attention heads of width 32 (official ``vits.py``:
        ``vit_small``: patch 16, width 384, depth 12, ``num_heads=12``), where timm's
        ``vit_small_*`` have 6. Everything else of ``vit_small`` / ``vit_base`` is timm's
        default already (MLP ratio 4, qkv bias, LayerNorm eps 1e-6, a class token that is
        the output); the initialisation, the sin-cos table and the frozen projection are
        applied in ``__init__``."""
        return {"num_heads": 12} if timm_name.startswith("vit_small_") else {}

    def __init__(self, config: MoCoV3Config, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: MoCoV3Config = config
        c = config
        self.is_vit = bool(backbone.sslcli_spec.is_vit)
        self.temperature = c.temperature or (0.2 if self.is_vit else 1.0)
        self.crop_min_scale = c.crop_min_scale or (0.08 if self.is_vit else 0.2)
        if self.is_vit:
            # Before the momentum copy, so both encoders start from the same weights.
            moco_v3_init_(backbone)
            if c.fixed_pos_embed:
                try:
                    use_sincos_pos_embed_(backbone)
                except ValueError as e:
                    raise ConfigError([f"method.fixed_pos_embed: {e}"]) from e
            if c.freeze_patch_embed:
                freeze_patch_projection_(backbone)
        proj_layers = c.proj_layers or (3 if self.is_vit else 2)
        self.projector = moco_v3_mlp(
            feature_dim(backbone), c.mlp_dim, c.proj_dim, proj_layers, last_bn=True
        )
        self.predictor = moco_v3_mlp(
            c.proj_dim, c.mlp_dim, c.proj_dim, c.pred_layers, last_bn=self.is_vit
        )
        self.momentum_encoder = nn.Sequential(
            OrderedDict(backbone=momentum_copy(backbone), projector=momentum_copy(self.projector))
        )

    def views(self) -> list[ViewSpec]:
        c = self.config
        return asymmetric_views(
            self.backbone.sslcli_spec.image_size,
            self.crop_min_scale,
            c.blur_p,
            c.solarize_p,
            interpolation="bilinear",  # torchvision's RandomResizedCrop default
        )

    # -- the momentum encoder's update rule -----------------------------------------------------
    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """θ_k ← m·θ_k + (1 − m)·θ_q over backbone and projector (the predictor has no
        momentum counterpart): "f_k: momentum encoder: backbone + proj mlp" (Alg. 1)."""
        enc = self.momentum_encoder
        ema_update_pairs_([(enc.backbone, self.backbone), (enc.projector, self.projector)], m)

    # -- one step ---------------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        c = self.config
        x1, x2 = batch.views
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        m = momentum_at(step.step, step.total_steps, c.momentum, c.momentum_cosine)
        with torch.no_grad():
            # Update first, so this step's keys come from the freshly averaged encoder.
            self.momentum_update(m)
            k1 = self.momentum_encoder(x1)
            k2 = self.momentum_encoder(x2)
        loss_12, logits, labels = ctr_loss(q1, k2, self.temperature)
        loss_21, _, _ = ctr_loss(q2, k1, self.temperature)
        with torch.no_grad():
            logs: dict[str, Tensor | float] = {
                "acc": (logits.argmax(dim=1) == labels).float().mean(),
                "momentum": m,
                "temperature": self.temperature,
            }
        return StepOutput(
            loss=loss_12 + loss_21, logs=logs, embedding=F.normalize(q1.detach(), dim=1)
        )

    def export_candidates(self) -> dict[str, nn.Module]:
        # MoCo v3 evaluates and transfers the base encoder; the momentum one is its average.
        return {"backbone": self.backbone, "momentum_backbone": self.momentum_encoder.backbone}
