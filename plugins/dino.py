"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Self-distillation with no labels: a student network is trained to match, on every crop,
the output distribution of a teacher network on the *other* global crops of the same
image; the teacher is an exponential moving average of the student, and collapse is
avoided by centring and sharpening the teacher's outputs.

Follows the official PyTorch code (facebookresearch/dino, ``main_dino.py``), the paper
where they agree:

- the loss averages the cross-entropies of all (teacher crop, student crop) pairs with
  different indices, each a batch mean;
- the centre is updated inside the loss, after it is computed, from the teacher outputs
  of both global crops of all processes;
- the teacher temperature follows a per-epoch linear warm-up (``np.linspace`` over the
  warm-up epochs, so it reaches its final value in the last warm-up epoch); the code's
  default is 0.04 throughout, the longer recipe warms 0.04 → 0.07 over 30 epochs;
- the teacher momentum follows a per-step cosine from 0.996 to 1, applied after the
  optimiser step;
- the last layer of the student head receives no update (``grad = None``) during the
  first ``freeze_last_layer`` epochs;
- stochastic depth (``backbone.drop_path_rate`` 0.1) is used by the student only: the
  official teacher is built without ``drop_path_rate`` and then loaded with the student's
  weights, so here the teacher copy has every DropPath disabled. The teacher stays in
  training mode otherwise (its BatchNorm layers, if any, use batch statistics), as in the
  code, which never calls ``teacher.eval()``;
- AdamW with lr 5e-4 x B/256, 10 warm-up epochs and a cosine to 1e-6, weight decay
  following a cosine from 0.04 to 0.4 on weights only, per-tensor gradient clipping at 3.

The teacher is what is evaluated and exported ("the teacher ... performs better than the
student", Sec. 5.2): :meth:`DINO.encoder` returns it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from timm.layers import DropPath
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim, is_vit_name
from sslcli.data.views import ViewSpec, dino_views, local_crop_size
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import (
    DINOHead,
    cosine_momentum,
    dist,
    ema_update_pairs_,
    momentum_copy,
    multicrop_forward,
    patch_size,
)

# -- the loss and its schedules -----------------------------------------------------------------


def dino_loss(
    student_out: Tensor,
    teacher_out: Tensor,
    center: Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
    n_global: int = 2,
) -> Tensor:
    """Cross-entropy of the student's crops against the centred, sharpened teacher.

    "P_s(x)^(i) = exp(g_θs(x)^(i)/τ_s) / Σ_k exp(g_θs(x)^(k)/τ_s)" and likewise for the
    teacher with τ_t; "we minimize: Σ_{x∈{x1g,x2g}} Σ_{x'∈V, x'≠x} H(P_t(x), P_s(x'))"
    with H(a, b) = −a log b (Caron et al. 2021, Eq. 3); centring: "g_t(x) ← g_t(x) + c"
    with c subtracted before the softmax. As in the code, each pair's cross-entropy is a
    batch mean and the sum is divided by the number of pairs.

    ``student_out``: [V*B, K], the V crops in order (the first ``n_global`` are the
    global ones); ``teacher_out``: [n_global*B, K]; ``center``: [1, K].

    Precision: fp32 with autocast off; the logits themselves come from the head's last
    layer in fp32 (:class:`sslcli.nn.dino_head.WeightNormLinear`), not from bf16.
    """
    with torch.autocast(device_type=student_out.device.type, enabled=False):
        b = teacher_out.shape[0] // n_global
        log_p = F.log_softmax(student_out.float() / student_temp, dim=-1).split(b)
        t = F.softmax((teacher_out.float() - center.float()) / teacher_temp, dim=-1)
        t = t.detach().chunk(n_global)
        # Σ_{iq} Σ_{v≠iq} mean_b H(q_iq, p_v) = Σ_v mean_b H(Σ_{iq≠v} q_iq, p_v): one
        # product per student crop instead of one per pair (the 65536-wide rows dominate).
        t_sum = torch.stack(t).sum(0)
        total = student_out.new_zeros((), dtype=torch.float32)
        pairs = 0
        for v, lp in enumerate(log_p):
            # The student never predicts the teacher's output for the same crop.
            q = t_sum - t[v] if v < n_global else t_sum
            total = total - (q * lp).sum(dim=-1).mean()
            pairs += n_global - 1 if v < n_global else n_global
        return total / pairs


@torch.no_grad()
def update_center(center: Tensor, teacher_out: Tensor, momentum: float) -> None:
    """``c ← m·c + (1 − m)·mean(teacher outputs)`` in place, the mean over all processes.

    "The center c is updated with an exponential moving average ... c ← mc + (1 − m)
    (1/B) Σ_i g_θt(x_i)" (Caron et al. 2021, Eq. 4), B counting the rows of every
    process (the code all-reduces the sum and divides by the global count).
    """
    total = dist.all_reduce_sum(teacher_out.detach().float().sum(dim=0, keepdim=True))
    batch_center = total / (teacher_out.shape[0] * dist.world_size())
    center.mul_(momentum).add_(batch_center.to(center.dtype), alpha=1.0 - momentum)


def teacher_temperature(epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """The official per-epoch teacher temperature: ``linspace(start, end, W)`` then ``end``.

    "a linear warm-up for τ_t from 0.04 to 0.07 during the first 30 epochs" (Caron et al.
    2021, Sec. 3.1). ``np.linspace`` includes both ends, so epoch W−1 already uses ``end``.
    """
    if epoch >= warmup_epochs:
        return end
    if warmup_epochs == 1:
        return start
    return start + (end - start) * epoch / (warmup_epochs - 1)


# -- configuration ----------------------------------------------------------------------------


class DINOConfig(MethodConfig):
    out_dim: int = Field(
        65536,
        ge=2,
        description=(
            "Output width K of the head: 65536 for ImageNet; a few thousand suffice on small "
            "data and are much faster on a CPU."
        ),
    )
    hidden_dim: int = Field(2048, ge=1, description="Head MLP hidden width (2048).")
    bottleneck_dim: int = Field(256, ge=1, description="Head bottleneck width before n(·) (256).")
    head_layers: int = Field(3, ge=1, description="Linear layers of the head MLP (3).")
    use_bn_in_head: bool = Field(
        False, description="BatchNorm after the head's hidden layers (the code's use_bn_in_head)."
    )
    norm_last_layer: bool = Field(
        True,
        description=(
            "Fix the weight-normalised last layer's norm to 1 (stabler). False performs "
            "better but can make training unstable: the authors use it with ViT-S only."
        ),
    )
    momentum_teacher: float = Field(
        0.996,
        ge=0,
        le=1,
        description="Base teacher EMA momentum, cosine to 1; use 0.9995 at batch 256.",
    )
    warmup_teacher_temp: float = Field(
        0.04, gt=0, description="Teacher temperature at epoch 0 (0.04)."
    )
    teacher_temp: float = Field(
        0.04,
        gt=0,
        description=(
            "Teacher temperature after the warm-up: 0.04; 0.07 with 30 warm-up epochs in the "
            "longer recipe (above 0.07 is unstable). Lower it if the loss does not decrease."
        ),
    )
    warmup_teacher_temp_epochs: int = Field(
        0, ge=0, description="Epochs of linear teacher-temperature warm-up (0; 30 long recipe)."
    )
    student_temp: float = Field(0.1, gt=0, description="Student temperature τ_s (0.1).")
    center_momentum: float = Field(0.9, ge=0, lt=1, description="EMA momentum of the centre (0.9).")
    freeze_last_layer: int = Field(
        1,
        ge=0,
        description="Epochs during which the head's last layer is not updated (1); raise if "
        "the loss does not decrease.",
    )
    global_crops_scale: tuple[float, float] | None = Field(
        None,
        description="Area range of the 2 global crops; default (0.4, 1) for ViTs, (0.14, 1) "
        "for convnets (the ResNet-50 recipe) and when local_crops_number is 0.",
    )
    local_crops_number: int = Field(
        8,
        ge=0,
        description="Number of local crops (8); more help at a cost, 0 disables multi-crop.",
    )
    local_crops_scale: tuple[float, float] | None = Field(
        None,
        description="Area range of the local crops; default (0.05, 0.4) for ViTs, (0.05, 0.14) "
        "for convnets.",
    )
    local_crops_size: int | None = Field(
        None,
        ge=1,
        description="Side of the local crops; default 96/224 of the image size (96 at 224), "
        "rounded to a multiple of a ViT's patch.",
    )

    @model_validator(mode="after")
    def _check(self) -> DINOConfig:
        for name in ("global_crops_scale", "local_crops_scale"):
            rng = getattr(self, name)
            if rng is not None and not 0 < rng[0] <= rng[1] <= 1:
                raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {rng}")
        return self


# -- the method -------------------------------------------------------------------------------


def disable_drop_path(module: nn.Module) -> None:
    """Turn every stochastic-depth layer of ``module`` into the identity (drop rate 0)."""
    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0


class DINO(Method):
    """DINO: self-distillation of an EMA teacher into a student across multi-crop views."""

    name = "dino"
    # Official code (facebookresearch/dino, main_dino.py): torchvision_models[arch]() with
    # torchvision's default zero_init_residual=False (γ = 1) for its ResNets.
    zero_init_last = False
    Config = DINOConfig
    recipe = Recipe(
        optim={
            "name": "adamw",
            "lr": 5e-4,
            "lr_scaling": "linear",
            "weight_decay": 0.04,
            "exclude_norm_bias": True,
            "grad_clip": 3.0,
            "grad_clip_mode": "per_tensor",
        },
        # min_lr 1e-6 = 0.002 x 5e-4: exact at batch 256, the batch the lr refers to.
        schedule={
            "kind": "cosine",
            "warmup_epochs": 10,
            "final_lr_fraction": 0.002,
            "weight_decay_end": 0.4,
        },
        backbone={"drop_path_rate": 0.1},
    )
    # The README's ResNet-50 command: SGD (momentum 0.9) lr 0.03 x B/256, constant weight
    # decay 1e-4; warm-up, min_lr 1e-6 and clipping as for ViTs; no stochastic depth (the
    # official code passes drop_path_rate to its ViTs only).
    convnet_recipe = Recipe(
        optim={
            "name": "sgd",
            "lr": 0.03,
            "lr_scaling": "linear",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "exclude_norm_bias": True,
            "grad_clip": 3.0,
            "grad_clip_mode": "per_tensor",
        },
        schedule={
            "kind": "cosine",
            "warmup_epochs": 10,
            "final_lr_fraction": 1e-6 / 0.03,
            "weight_decay_end": 1e-4,
        },
    )

    @classmethod
    def recipe_for(cls, backbone: str) -> Recipe:
        return cls.recipe if is_vit_name(backbone) else cls.convnet_recipe

    center: Tensor

    def __init__(self, config: DINOConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: DINOConfig = config
        c = config
        self.head = DINOHead(
            feature_dim(backbone),
            c.out_dim,
            hidden_dim=c.hidden_dim,
            bottleneck_dim=c.bottleneck_dim,
            num_layers=c.head_layers,
            use_bn=c.use_bn_in_head,
            norm_last_layer=c.norm_last_layer,
        )
        # "teacher and student start with the same weights"; no gradients reach the teacher.
        self.teacher_backbone = momentum_copy(backbone)
        self.teacher_head = momentum_copy(self.head)
        disable_drop_path(self.teacher_backbone)
        self.register_buffer("center", torch.zeros(1, c.out_dim))

    # -- views --------------------------------------------------------------------------------
    def _is_vit(self) -> bool:
        return bool(self.backbone.sslcli_spec.is_vit)

    def crop_scales(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(global, local) crop area ranges after applying the per-family defaults."""
        c = self.config
        vit = self._is_vit()
        # Without local crops the README recommends the wider global range (0.14, 1).
        g_default = (0.4, 1.0) if vit and c.local_crops_number > 0 else (0.14, 1.0)
        l_default = (0.05, 0.4) if vit else (0.05, 0.14)
        return c.global_crops_scale or g_default, c.local_crops_scale or l_default

    def views(self) -> list[ViewSpec]:
        c = self.config
        size = self.backbone.sslcli_spec.image_size
        local = c.local_crops_size or local_crop_size(size, patch_size(self.backbone))
        g_scale, l_scale = self.crop_scales()
        # Global crop 1 always blurred; global crop 2 rarely blurred, sometimes solarised.
        return dino_views(
            size,
            local,
            global_scale=g_scale,
            local_count=c.local_crops_number,
            local_scale=l_scale,
        )

    # -- one step -----------------------------------------------------------------------------
    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        c = self.config
        globals_ = batch.views[:2]
        with torch.no_grad():
            # Only the 2 global views pass through the teacher.
            t_feats = multicrop_forward(self.teacher_backbone, globals_)
            t_out = self.teacher_head(t_feats)
        s_out = self.head(multicrop_forward(self.backbone, batch.views))
        temp = teacher_temperature(
            step.epoch, c.warmup_teacher_temp_epochs, c.warmup_teacher_temp, c.teacher_temp
        )
        loss = dino_loss(s_out, t_out, self.center, temp, c.student_temp, n_global=2)
        update_center(self.center, t_out, c.center_momentum)
        b = batch.views[0].shape[0]
        return StepOutput(
            loss=loss,
            logs={"teacher_temp": temp, "center_norm": self.center.norm()},
            embedding=t_feats[:b],  # the evaluated representation
        )

    def before_optimizer_step(self, step: StepInfo) -> None:
        # "cancel_gradients_last_layer": no update at all during the first epochs (a zero
        # gradient would still let AdamW decay the weights and advance its step count).
        if step.epoch < self.config.freeze_last_layer:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, step: StepInfo) -> None:
        # "The teacher weights are updated with a cosine schedule from 0.996 to 1" (Sec. 3.1).
        m = cosine_momentum(step.step, step.total_steps, self.config.momentum_teacher)
        pairs = [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]
        ema_update_pairs_(pairs, m)

    # -- evaluation and export ----------------------------------------------------------------
    def encoder(self) -> nn.Module:
        return self.teacher_backbone

    def export_candidates(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher_backbone, "student": self.backbone}
