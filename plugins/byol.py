"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised
Learning").

An online network (encoder → projector → predictor) learns to predict, for one view of an
image, the target network's projection of another view. The target network (encoder →
projector, no predictor) is not trained by gradients: after every optimiser step it moves
towards the online weights by an exponential moving average whose rate τ rises from
τ_base to 1 along a cosine. No negatives; the predictor and the slow target prevent
collapse.

Follows the official JAX code (deepmind-research/byol) where it and the paper differ in
detail; see :class:`BYOL`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import (
    Backbone,
    accepts_zero_init_last,
    feature_dim,
    has_bottleneck_blocks,
)
from sslcli.data.views import ViewSpec, asymmetric_views
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import MLP, byol_loss, cosine_momentum, ema_update_pairs_, mean_cosine, momentum_copy

# -- shared parts -----------------------------------------------------------------------------


def byol_head(width: int, hidden: int, out: int) -> nn.Module:
    """BYOL's projector / predictor: ``Linear(hidden) → BN → ReLU → Linear(out)``.

    "a multi-layer perceptron (MLP) in which a linear layer with output size 4096 is
    followed by batch normalization, rectified linear units (ReLU), and a final linear
    layer with output dimension 256" (Grill et al. 2020, Sec. 3.3); "the predictor q_θ
    uses the same architecture as g_θ". The official MLP has a bias on the first linear
    layer and none on the last.
    """
    return MLP([width, hidden, out], bias=True, last_bias=False)


# -- configuration ----------------------------------------------------------------------------


class BYOLConfig(MethodConfig):
    proj_hidden_dim: int = Field(4096, ge=1, description="Hidden width of projector (4096).")
    proj_dim: int = Field(256, ge=1, description="Output width of projector and predictor (256).")
    pred_hidden_dim: int = Field(4096, ge=1, description="Hidden width of the predictor (4096).")
    base_momentum: float = Field(
        0.996,
        ge=0,
        le=1,
        description=(
            "τ_base of the target EMA (cosine to 1): 0.996 for 1000 epochs, 0.99 for "
            "100-300 epochs, 0.97 for 40; lower it for short runs on small data."
        ),
    )
    crop_min_scale: float = Field(0.08, gt=0, le=1, description="Smallest crop area fraction.")
    blur_p: tuple[float, float] = Field(
        (1.0, 0.1),
        description="Gaussian-blur probability of view 1 and view 2; (0, 0) for CIFAR-size data.",
    )
    solarize_p: tuple[float, float] = Field(
        (0.0, 0.2), description="Solarisation probability of view 1 and view 2."
    )


# -- the method -------------------------------------------------------------------------------


class BYOL(Method):
    """BYOL: online predictor regresses an EMA target's projection of the other view.

    Official-code details followed: the projector and predictor are 4096/256 MLPs with BN;
    each view goes through the networks separately (BN statistics per view, as
    ``apply_once_fn``); the target runs in training mode, so its BN layers normalise with
    the current batch's statistics and keep their own running averages; the target update
    ``ξ ← τ·ξ + (1 − τ)·θ`` uses the online weights *after* the optimiser step of step k
    and τ of step k. LARS (η 1e-3, momentum 0.9, biases and BN parameters excluded from
    weight decay and adaptation), lr 0.2 × B/256, weight decay 1.5e-6, 10 warm-up epochs
    then cosine — the 1000-epoch preset (300 epochs: lr 0.3, wd 1e-6, τ_base 0.99).

    Difference from the official code: the target starts as a copy of the online network
    (:func:`sslcli.nn.ema.momentum_copy`); the official code draws its initial weights
    with another seed, and its authors note that they saw no significant difference when
    using the same one.
    """

    name = "byol"
    # Official code (deepmind-research byol/utils/networks.py): haiku's ResNet BlockV1,
    # whose bottleneck blocks build their last BN with scale_init=jnp.zeros (γ = 0); its
    # basic blocks (ResNet-18/34) keep γ = 1, see backbone_kwargs.
    zero_init_last = True
    Config = BYOLConfig
    recipe = Recipe(
        optim={
            "name": "lars",
            "lr": 0.2,
            "lr_scaling": "linear",
            "momentum": 0.9,
            "weight_decay": 1.5e-6,
            "exclude_norm_bias": True,
            "lars_eta": 1e-3,
        },
        schedule={"kind": "cosine", "warmup_epochs": 10},
    )

    @classmethod
    def backbone_kwargs(cls, timm_name: str) -> dict[str, Any]:
        """γ = 1 in basic-block ResNets: haiku's ``BlockV1`` (BYOL's ResNet18/34) gives only
        a bottleneck block's last BN ``scale_init=jnp.zeros``."""
        if accepts_zero_init_last(timm_name) and not has_bottleneck_blocks(timm_name):
            return {"zero_init_last": False}
        return {}

    def __init__(self, config: BYOLConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: BYOLConfig = config
        c = config
        self.projector = byol_head(feature_dim(backbone), c.proj_hidden_dim, c.proj_dim)
        self.predictor = byol_head(c.proj_dim, c.pred_hidden_dim, c.proj_dim)
        # "The target network has the same architecture as the online network" minus the
        # predictor; its weights ξ are an exponential moving average of θ (Sec. 3.1).
        self.target = nn.Sequential(
            OrderedDict(backbone=momentum_copy(backbone), projector=momentum_copy(self.projector))
        )

    def views(self) -> list[ViewSpec]:
        c = self.config
        return asymmetric_views(
            self.backbone.sslcli_spec.image_size, c.crop_min_scale, c.blur_p, c.solarize_p
        )

    # -- one step ---------------------------------------------------------------------------------
    def _online(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        z1, p1 = self._online(x1)
        _, p2 = self._online(x2)
        with torch.no_grad():
            t1 = self.target(x1)
            t2 = self.target(x2)
        loss = byol_loss(p1, p2, t1, t2)
        logs: dict[str, Tensor | float] = {
            "tau": cosine_momentum(step.step, step.total_steps, self.config.base_momentum),
            "cos": mean_cosine(p1.detach(), t2),
        }
        return StepOutput(
            loss=loss, logs=logs, embedding=nn.functional.normalize(z1.detach(), dim=1)
        )

    # -- the target's update rule -----------------------------------------------------------------
    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """ξ ← τ·ξ + (1 − τ)·θ over encoder and projector (Grill et al. 2020, Sec. 3.1)."""
        ema_update_pairs_(
            [(self.target.backbone, self.backbone), (self.target.projector, self.projector)], tau
        )

    def after_optimizer_step(self, step: StepInfo) -> None:
        # "after each training step we perform the following update, ξ ← τξ + (1 − τ)θ"
        # (Sec. 3.1): θ here is what the optimiser has just produced, as in the official
        # update function, and τ is that of the step just taken (k, counted from 0), rising
        # from τ_base to 1 along half a cosine (Sec. 3.3).
        self.update_target(cosine_momentum(step.step, step.total_steps, self.config.base_momentum))

    def export_candidates(self) -> dict[str, nn.Module]:
        # BYOL evaluates the online encoder; the target is its smoother average.
        return {"backbone": self.backbone, "target_backbone": self.target.backbone}
