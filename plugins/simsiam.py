"""SimSiam (Chen & He 2020, "Exploring Simple Siamese Representation Learning").

One encoder (backbone + projection MLP) sees both views; a prediction MLP maps one view's
projection towards the other's, whose gradient is stopped. No negatives, no momentum
encoder, no large batches: the stop-gradient alone prevents collapse. Follows the
official PyTorch code (facebookresearch/simsiam); see :class:`SimSiam`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim
from sslcli.data.views import ViewSpec, moco_v2_views
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import MLP, mean_cosine, simsiam_loss


def simsiam_projector(width: int, hidden: int, out: int, num_layers: int) -> nn.Module:
    """SimSiam's projection MLP: ``[Linear → BN → ReLU] × (L−1) → Linear → BN(no affine)``.

    "The projection MLP (in f) has BN applied to each fully-connected (fc) layer,
    including its output fc. Its output fc has no ReLU. The hidden fc is 2048-d. This MLP
    has 3 layers." (Chen & He 2020, Sec. 3, "Baseline settings"). In the official code
    the hidden layers are as wide as the encoder's features, no linear layer has an
    effective bias (the output layer's bias is frozen and cancelled by the BN after it)
    and that BN has no learnable scale or shift.
    """
    dims = [width] + [hidden] * (num_layers - 1) + [out]
    return MLP(dims, last_bn=True, last_bn_affine=False)


def simsiam_predictor(dim: int, hidden: int) -> nn.Module:
    """SimSiam's bottleneck prediction MLP ``Linear(d→h) → BN → ReLU → Linear(h→d)``.

    "The prediction MLP (h) has BN applied to its hidden fc layers. Its output fc does not
    have BN or ReLU. This MLP has 2 layers. The dimension of h's input and output (z and
    p) is d = 2048, and h's hidden layer's dimension is 512, making h a bottleneck
    structure" (Chen & He 2020, Sec. 3, "Baseline settings"). The output layer keeps its
    bias.
    """
    return MLP([dim, hidden, dim])


class SimSiamConfig(MethodConfig):
    proj_dim: int = Field(2048, ge=1, description="Width d of z and p (2048).")
    proj_hidden_dim: int | None = Field(
        None, ge=1, description="Projector hidden width; default: the encoder's feature width."
    )
    num_proj_layers: int = Field(
        3, ge=1, description="Projector depth: 3 on ImageNet; 2 in the paper's CIFAR setup."
    )
    pred_hidden_dim: int = Field(
        512, ge=1, description="Predictor bottleneck width (512 = d/4); keep it below proj_dim."
    )
    fix_pred_lr: bool = Field(
        True,
        description=(
            "Keep the predictor's learning rate at its initial value while the rest decays "
            "(the official recipe, +0.4% on ImageNet); false = one schedule for all."
        ),
    )
    crop_min_scale: float = Field(0.2, gt=0, le=1, description="Smallest crop area fraction.")
    blur_p: float = Field(
        0.5, ge=0, le=1, description="Gaussian-blur probability (0.5; 0 for CIFAR-size images)."
    )


class SimSiam(Method):
    """SimSiam: siamese encoder, predictor, stop-gradient; no negatives, no momentum encoder.

    Official-code details followed: each view is encoded separately (BN statistics per
    view); L = −½[cos(p₁, sg z₂) + cos(p₂, sg z₁)] (batch means); the encoder is built with
    its last BN in each residual block zero-initialised (torchvision's
    ``zero_init_residual=True``, :attr:`zero_init_last`); SGD lr 0.05 × B/256, momentum
    0.9, weight decay 1e-4 on every parameter (BN and biases included), cosine decay
    without warm-up, 100 epochs at B 512; with ``fix_pred_lr`` the predictor is its own
    optimiser group whose learning rate is never decayed; MoCo v2's augmentation.

    Difference: the official code sets the learning rate once per epoch; the engine's
    cosine is evaluated at every step (the same curve, sampled more finely).
    """

    name = "simsiam"
    # Official code (facebookresearch/simsiam, simsiam/builder.py):
    # base_encoder(num_classes=dim, zero_init_residual=True) (γ = 0).
    zero_init_last = True
    Config = SimSiamConfig
    recipe = Recipe(
        optim={
            "name": "sgd",
            "lr": 0.05,
            "lr_scaling": "linear",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            # torch SGD over model.parameters(): BN parameters and biases decay too.
            "exclude_norm_bias": False,
        },
        schedule={"kind": "cosine", "warmup_epochs": 0},
    )

    def __init__(self, config: SimSiamConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: SimSiamConfig = config
        c = config
        width = feature_dim(backbone)
        self.projector = simsiam_projector(
            width, c.proj_hidden_dim or width, c.proj_dim, c.num_proj_layers
        )
        self.predictor = simsiam_predictor(c.proj_dim, c.pred_hidden_dim)

    def views(self) -> list[ViewSpec]:
        c = self.config
        # MoCo v2's augmentation, which the official code uses unchanged.
        return moco_v2_views(self.backbone.sslcli_spec.image_size, c.crop_min_scale, c.blur_p)

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        z1 = self.projector(self.backbone(x1))
        z2 = self.projector(self.backbone(x2))
        p1 = self.predictor(z1)
        p2 = self.predictor(z2)
        loss = simsiam_loss(p1, p2, z1, z2)
        logs: dict[str, Tensor | float] = {"cos": mean_cosine(p1.detach(), z2.detach())}
        # The paper's collapse monitor is the per-dimension std of z/‖z‖ (≈ 1/√d when
        # healthy, 0 when collapsed); the engine logs the std of this embedding.
        return StepOutput(
            loss=loss, logs=logs, embedding=nn.functional.normalize(z1.detach(), dim=1)
        )

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Encoder (backbone + projector) and predictor; the predictor's lr is fixed.

        A constant (not decayed) learning rate for the predictor h gives 68.1 % against
        67.7 % with the decayed one (Chen & He 2020, Sec. 4.2, Table 1). Official code:
        two groups, the predictor's with ``fix_lr``.
        """
        if not self.config.fix_pred_lr:
            return None
        encoder = [
            p for m in (self.backbone, self.projector) for p in m.parameters() if p.requires_grad
        ]
        predictor = [p for p in self.predictor.parameters() if p.requires_grad]
        return [
            {"params": encoder, "name": "encoder"},
            {"params": predictor, "name": "predictor", "fixed_lr": True},
        ]
