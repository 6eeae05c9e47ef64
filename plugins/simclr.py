"""SimCLR v1 (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations") and v2 (Chen et al. 2020, "Big Self-Supervised Models are Strong
Semi-Supervised Learners").

Two views of each image, an MLP projection head, and NT-Xent with the partner view as the
positive and the 2N-2 other views as negatives (gathered across processes). Follows the
official TensorFlow code: head Linear(D)->BN->ReLU->Linear(128)->BN without shift (no
biases, weights from N(0, 0.01^2)), LARS with BN and biases excluded, lr 0.3 x B/256, 10
warm-up epochs then cosine, weight decay 1e-6, Inception-style crops with bicubic resize,
colour distortion of strength 1.0 with random order, blur on ImageNet, and no mean/std
normalisation of the pixels.

SimCLR v2 (:class:`SimCLRV2`) keeps the loss and the augmentation and changes the
projection head (three layers, fine-tuned from its middle), the weight decay (1e-4) and
the learning-rate rule (0.075 x sqrt(B)); see its docstring.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim
from sslcli.data.views import ViewSpec, simclr_views
from sslcli.errors import ConfigError
from sslcli.method import (
    RESUME_SAFE,
    Batch,
    Method,
    MethodConfig,
    Recipe,
    StepInfo,
    StepOutput,
)
from sslcli.nn import nt_xent


class BatchNorm1dNoShift(nn.BatchNorm1d):
    """BatchNorm with a learnable scale γ and no shift β.

    The last layer of SimCLR's projection head is built with ``use_bias=False`` and its
    BN with ``center=use_bias`` in the official code, so its output is ``γ·x̂`` with no β.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        self.bias = None  # keeps the 'bias' key out of state_dict; F.batch_norm accepts None

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class SimCLRProjector(nn.Sequential):
    """SimCLR's projection head g: ``[Linear → BN → ReLU] × (L−1) → Linear → BN(γ)``.

    Two layers in v1; "we also increase the capacity of the non-linear network g(·) (a.k.a.
    projection head), by making it deeper ... we use a 3-layer projection head" in v2 (Chen
    et al. 2020b, Sec. 2.1). Both follow the official code's ``linear_layer``: Linear
    without bias (BN follows), weights drawn from N(0, 0.01²), BN with β in the middle
    layers and without β in the last one; the middle layers are as wide as their input.
    ``self[i]`` is layer i (a Sequential), so ``self[:k]`` is the head up to layer k, the
    part kept for fine-tuning.
    """

    def __init__(self, width: int, hidden: int, out: int, num_layers: int) -> None:
        dims = [width] + [hidden] * (num_layers - 1) + [out]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            linear = nn.Linear(dims[i], dims[i + 1], bias=False)
            nn.init.normal_(linear.weight, std=0.01)
            if i < num_layers - 1:
                layers.append(nn.Sequential(linear, nn.BatchNorm1d(dims[i + 1]), nn.ReLU()))
            else:
                layers.append(nn.Sequential(linear, BatchNorm1dNoShift(dims[i + 1])))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 - Sequential semantics
        return super().forward(x)


class SimCLRConfig(MethodConfig):
    temperature: float = Field(
        0.1,
        gt=0,
        description="NT-Xent temperature: 0.1 for ImageNet, 0.5 for CIFAR-size data.",
        json_schema_extra=RESUME_SAFE,  # only scales the loss's logits
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
    # Official code (google-research/simclr, resnet.py, v1 and v2 alike): each block's
    # last BN is batch_norm_relu(..., init_zero=True) (γ = 0).
    zero_init_last = True
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
        self.projector = self._make_projector(feature_dim(backbone))

    def _make_projector(self, width: int) -> nn.Module:
        c = self.config
        hidden = c.proj_hidden_dim or width
        return SimCLRProjector(width, hidden, c.proj_dim, num_layers=2)

    def views(self) -> list[ViewSpec]:
        c = self.config
        size = self.backbone.sslcli_spec.image_size
        return simclr_views(size, c.crop_min_scale, c.color_strength, c.blur_p)

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        x1, x2 = batch.views
        # One forward over both views, as the official code does: BN statistics then come
        # from all 2N images rather than from each view separately.
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
        loss = nt_xent(z1, z2, self.config.temperature)
        return StepOutput(loss=loss, embedding=z1.detach())


# -- SimCLR v2 ---------------------------------------------------------------------------------


class SimCLRV2Config(SimCLRConfig):
    num_proj_layers: int = Field(
        3, ge=1, description="Projection-head layers: 3 in SimCLR v2 (2 is v1's depth)."
    )
    finetune_layer: int = Field(
        1,
        ge=0,
        description=(
            "Head layers kept by finetune_encoder(): v2 fine-tunes from the middle of its "
            "3-layer head (1); 0 = the backbone alone, as v1 does."
        ),
    )


class SimCLRV2(SimCLR):
    """SimCLR v2: SimCLR with a 3-layer projection head fine-tuned from its middle layer.

    Follows the official TF2 code (google-research/simclr, ``tf2/``) and the README's
    ImageNet command that "reflects the default hyperparameters in our paper": NT-Xent with
    τ 0.1, LARS with lr 0.075 × sqrt(B) (= 0.3 × B/256 at B 4096, and better at small
    batches), weight decay 1e-4, 10 warm-up epochs then cosine, the v1 augmentation. Use
    the selective-kernel ResNets of the paper with ``--backbone skresnet50`` or
    ``skresnext50`` (timm's SK blocks, which differ in detail from the paper's SK variant).

    Not included: the MoCo-style memory of the v2 paper ("yields an improvement of ~1%"),
    which the official code does not implement either.

    Fine-tuning: "instead of throwing away g(·) entirely after pretraining, we fine-tune
    from a middle layer" (Sec. 2.1). :meth:`finetune_encoder` returns the backbone followed
    by the first ``layer`` head layers; the evaluator fine-tunes that module with a new
    linear classifier on top.
    """

    name = "simclr-v2"
    Config = SimCLRV2Config
    recipe = Recipe(
        optim={
            "name": "lars",
            "lr": 0.075,
            "lr_scaling": "sqrt",
            "weight_decay": 1e-4,
            "exclude_norm_bias": True,
        },
        schedule={"kind": "cosine", "warmup_epochs": 10},
        # "global BN": statistics over the whole batch across all cores (global_bn=True).
        trainer={"sync_bn": True},
    )

    def __init__(self, config: SimCLRV2Config, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: SimCLRV2Config = config
        if config.finetune_layer > config.num_proj_layers:
            raise ConfigError(
                [
                    f"method.finetune_layer: {config.finetune_layer} is beyond the "
                    f"{config.num_proj_layers}-layer head (method.num_proj_layers)"
                ]
            )

    def _make_projector(self, width: int) -> nn.Module:
        c = self.config
        assert isinstance(c, SimCLRV2Config)
        return SimCLRProjector(width, c.proj_hidden_dim or width, c.proj_dim, c.num_proj_layers)

    def finetune_encoder(self, layer: int | None = None) -> nn.Module:
        """The backbone followed by the first ``layer`` projection-head layers.

        ``layer`` defaults to ``config.finetune_layer`` (1: "fine-tune from the middle
        layer" of the 3-layer head); 0 is the backbone alone (v1's practice) and
        ``num_proj_layers`` the whole head. Layer i is Linear → BN → ReLU (or the last
        Linear → BN(γ)), the official code's ``hiddens_list[layer]``. The modules are
        shared with this method, not copied: deep-copy the result before fine-tuning if
        the pre-trained method must stay unchanged. Its output width is
        :meth:`finetune_dim`.
        """
        k = self.config.finetune_layer if layer is None else layer
        n = len(self.projector)
        if not 0 <= k <= n:
            raise ValueError(f"layer must be in 0..{n} for a {n}-layer head, got {layer}")
        return nn.Sequential(self.backbone, *list(self.projector)[:k])

    def finetune_dim(self, layer: int | None = None) -> int:
        """Output width of :meth:`finetune_encoder` for the same ``layer``."""
        k = self.config.finetune_layer if layer is None else layer
        if k == 0:
            return feature_dim(self.backbone)
        return int(self.projector[k - 1][0].out_features)
