"""CPC for images (van den Oord et al. 2018, "Representation Learning with Contrastive
Predictive Coding"; Hénaff et al. 2019, "Data-Efficient Image Recognition with
Contrastive Predictive Coding", CPC v2).

An image is cut into a 7×7 grid of overlapping patches, each patch is encoded on its own
into a vector ``z_{i,j}``, a masked-convolution (PixelCNN-style) context network
summarises the rows above into ``c_{i,j}``, and linear predictors ``ẑ_{i+k,j} = W_k
c_{i,j}`` must pick the true patch feature among all the patches of the batch (InfoNCE).

There is no official code; this follows the papers. What comes from where:

- grid: 64-px patches with a 32-px stride from a 256-px crop (v1) — 7×7 with 50 %
  overlap. Scaled to any image size: stride = size/8, patch = 2·stride (32 px → 8-px
  patches, stride 4). The crop keeps v2's 260-of-300 proportion (``crop_scale``);
  evaluation cuts the grid from the whole image.
- context network: PixelCNN-style masked convolutions over the grid (v1); ``c_{i,j}``
  depends on rows ≤ i only (tested). Its depth and widths are not given in the papers;
  sslcli's choice: ``context_blocks`` residual blocks (1×1 → masked 3×3 → 1×1, bottleneck
  width D/4), 6 by default so the last row sees the whole 7-row grid.
- predictions ``k = 1..K``, K = 5 (v1 predicts up to five rows ahead), ``W_k`` linear
  without bias. InfoNCE with dot-product scores, no normalisation or temperature (v1),
  negatives = every other patch of the batch (across processes too); the loss is the
  mean over all predictions (v2's Σ_{i,j,k} up to a constant).
- v2's changes, on by default: layer normalisation in the patch encoder instead of batch
  norm (batch statistics leak information between the patches of a batch, v2) —
  for timm ResNets a ``GroupNorm(1, C)`` (timm's ``groupnorm1``, normalising over C, H, W
  per patch); predictions from four directions (top-down, plus v2's bottom-up and
  horizontal predictions; sslcli gives each direction its own context network and
  predictors, which the papers do not specify); patch-level augmentation: colour
  dropping (two of the three colour channels of each patch dropped at random; the
  dropped channels are replaced by Gaussian noise of 1/100 the kept channel's std,
  Doersch et al. 2015's recipe that v2 cites) and random flips.
- optimiser: Adam, lr 2e-4 (v1); a constant schedule. Batch: 8 images by default
  (sslcli's choice for a quick CPU run, see ``recipe``); the ImageNet recipe file sets
  its own.
- speed on small images: 16-px images give 4-px patches, on which ResNet-18's last two
  stages run on 1×1 maps; :func:`sslcli.nn.tiny_maps.centre_tap_on_tiny_maps` computes
  those convolutions as the equivalent matrix products (~6× faster encoder on a CPU).

Checked against CPC v2's appendix (Hénaff et al. 2019, App. A). The paper's own text was
not readable from here; what follows rests on its pseudo-code as a public third-party
reimplementation reproduces it (``CPC(latents, target_dim=64, emb_scale=0.1,
steps_to_ignore=2, steps_to_predict=3)`` and a ``pixelCNN`` context network), on the v1
paper's Sec. 3.2, and on summaries of v2's main text; details marked "unverified" could
not be confirmed from the paper itself. The defaults stay as above; options follow the
pseudo-code where it differs:

- target projection: the pseudo-code scores predictions against a 1×1-convolution
  projection of the patch features to ``target_dim`` = 64 channels, and the predictions
  (1×1 convolutions of the context, also 64 wide) are multiplied by ``emb_scale`` = 0.1.
  Default here: no projection, predictions in the patch-feature width D, scale 1 (v1's
  ``W_k c_t`` scored against ``z``); ``method.target_dim=64``, ``method.pred_scale=0.1``
  follow the pseudo-code (a single 1×1 layer for the targets: unverified).
- rows ahead: the pseudo-code's defaults predict offset 3 only (offsets 1–2 skipped);
  whether the reported models used those defaults is unverified. v1 predicts "up to five
  rows" ahead. Default here: offsets 1..5; ``method.pred_min_step=3`` with
  ``method.pred_steps=3`` gives the pseudo-code's.
- per-offset weighting: the pseudo-code adds one cross-entropy per offset, each a mean
  over its own predictions, so every offset weighs the same. Default here: the mean over
  all predictions, so near offsets (more rows) weigh more; ``method.offset_weighting=
  offset`` sums one mean per (direction, offset) as the pseudo-code does.
- encoder stages: v1 uses "the outputs from the third residual block" of ResNet-v2-101,
  mean-pooled to one 1024-d vector per patch; v2's ResNet-161 widens that third stack (46
  blocks, 4096-d maps) — so the patch encoder stops after the third stage. Here the whole
  backbone is the patch encoder (a timm ResNet-50 includes its fourth stage, 2048-d);
  whether v2's ResNet-50 result drops the fourth stage is unverified.
- context network: the pseudo-code stacks 5 residual blocks of 1×1 → 1×3 → a 2×1
  convolution over rows padded on top (the masking) → 1×1, 256 channels wide. Here:
  ``context_blocks`` (6) blocks of 1×1 → masked 3×3 → 1×1 at width D/4.
- directions: v2 predicts from more than one direction; the exact set is unverified.
  Default here: all four, each with its own context network and predictors.

Evaluation (:meth:`CPC.embed`): the patch encoder on the 7×7 grid of the image, mean-pooled
over the patches. Export writes the patch encoder's weights (they load strictly into
plain timm) and the grid under ``config.json["sslcli"]["patch_grid"]``;
:func:`sslcli.load_timm` returns the encoder wrapped to cut that grid and mean-pool, so an
exported CPC encoder gives the same features as the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sslcli.backbones import Backbone, BackboneSpec, feature_dim
from sslcli.data.views import ViewSpec, crop_views
from sslcli.errors import BackboneError, ConfigError
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import centre_tap_on_tiny_maps, dist

Direction = Literal["top-down", "bottom-up", "left-right", "right-left"]
# torch.rot90(grid, r, dims=(-2, -1)) turns each direction into "top-down" on the rotated
# grid: r = 1 puts the last column on top (right-left), r = 3 the first (left-right).
ROTATIONS: dict[str, int] = {"top-down": 0, "right-left": 1, "bottom-up": 2, "left-right": 3}


# -- the patch grid -----------------------------------------------------------------------------


def grid_geometry(image_size: int, grid_size: int) -> tuple[int, int]:
    """(patch side, stride) of a ``grid_size``² grid of half-overlapping patches."""
    if image_size % (grid_size + 1):
        raise ConfigError(
            [f"data.image_size: {image_size} must be a multiple of {grid_size + 1} for a "
             f"{grid_size}x{grid_size} grid of half-overlapping patches (method.grid_size)"]
        )  # fmt: skip
    stride = image_size // (grid_size + 1)
    return 2 * stride, stride


def cut_patches(x: Tensor, patch: int, stride: int) -> Tensor:
    """``[B, C, S, S]`` → ``[B, G, G, C, patch, patch]``, patch (i, j) at (i·stride, j·stride)."""
    p = x.unfold(2, patch, stride).unfold(3, patch, stride)  # [B, C, G, G, patch, patch]
    return p.permute(0, 2, 3, 1, 4, 5)


def patch_augment(patches: Tensor, color_drop: bool, flip_p: float) -> Tensor:
    """CPC v2's per-patch augmentation of ``[M, 3, h, w]`` patches (global torch RNG).

    Flips: each patch mirrored horizontally with probability ``flip_p``. Colour dropping
    (v2: two of the three colour channels of each patch are dropped at random): one
    channel is kept and the two others are replaced by Gaussian noise whose standard
    deviation is 1/100 of the kept channel's, as in Doersch et al. 2015 (Sec. 3.1,
    "color dropping"), whose recipe v2 cites.
    """
    m = patches.shape[0]
    dev = patches.device
    if flip_p > 0:
        flip = (torch.rand(m, device=dev) < flip_p).view(m, 1, 1, 1)
        patches = torch.where(flip, patches.flip(-1), patches)
    if color_drop:
        keep = F.one_hot(torch.randint(0, 3, (m,), device=dev), 3).bool().view(m, 3, 1, 1)
        kept = (patches * keep).sum(1)  # [M, h, w]
        std = kept.flatten(1).float().std(dim=1).to(patches.dtype).view(m, 1, 1, 1)
        noise = torch.randn_like(patches) * (std / 100)
        patches = torch.where(keep, patches, noise)
    return patches


# -- the context network -----------------------------------------------------------------------


class MaskedConv2d(nn.Conv2d):
    """A k×k convolution whose output at row i sees input rows ≤ i only.

    The PixelCNN mask (van den Oord et al. 2016) restricted to rows: kernel rows below the
    centre are zero, so information flows top-down only, and the context ``c_{i,j}`` that
    predicts rows below summarises rows ≤ i (CPC v1's autoregressive model over the grid).
    """

    mask: Tensor

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3) -> None:
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        mask[:, :, kernel_size // 2 + 1 :, :] = 0
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class ContextBlock(nn.Module):
    """Residual bottleneck ``x + 1×1(ReLU(masked 3×3(ReLU(1×1(ReLU(x))))))``."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(width, hidden, 1)
        self.masked = MaskedConv2d(hidden, hidden, 3)
        self.expand = nn.Conv2d(hidden, width, 1)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        h = self.reduce(F.relu(x))
        h = self.masked(F.relu(h))
        return x + self.expand(F.relu(h))


class ContextNetwork(nn.Sequential):
    """Stacked :class:`ContextBlock`: each block extends the upward reach by one row."""

    def __init__(self, width: int, hidden: int, blocks: int) -> None:
        super().__init__(*[ContextBlock(width, hidden) for _ in range(blocks)])

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102 - Sequential semantics
        return super().forward(z)


# -- the loss ----------------------------------------------------------------------------------


def _chunk_infonce(
    preds: Tensor, targets: Tensor, positive: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    logits = preds @ targets.T
    if weights is None:
        loss = F.cross_entropy(logits, positive, reduction="sum")
    else:
        loss = (F.cross_entropy(logits, positive, reduction="none") * weights).sum()
    correct = (logits.detach().argmax(dim=1) == positive).sum()
    return loss, correct


def cpc_infonce(
    preds: Tensor,
    targets: Tensor,
    positive: Tensor,
    max_elements: int = 1 << 26,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """InfoNCE of every prediction against all patch features of the batch.

    "L_N = −E_X [ log f_k(x_{t+k}, c_t) / Σ_{x_j∈X} f_k(x_j, c_t) ]" with
    ``f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t)`` (van den Oord et al. 2018, Eq. 3–4): a
    cross-entropy whose logits are ``ẑ · z_n`` for every patch ``n`` of ``targets`` and
    whose label is the true patch. ``preds`` [M, D] (already ``W_k c``), ``targets`` [T, D],
    ``positive`` [M] (row of the true patch in ``targets``). Mean over the M predictions,
    or, with ``weights`` [M], the weighted sum ``Σ_m w_m ℓ_m``; in fp32. Returns (loss,
    top-1 accuracy of the true patch).

    The logits are ``M × T`` — B²·G²·(rows predicted)·(directions): 29 GB in fp32 for a
    batch of 512 with four directions. Above ``max_elements`` they are computed in row
    chunks that are recomputed in the backward pass (activation checkpointing), so memory
    stays at one chunk for one extra matrix product; the value is the same.
    """
    with torch.autocast(device_type=preds.device.type, enabled=False):
        preds, targets = preds.float(), targets.float()
        m, t = preds.shape[0], targets.shape[0]
        w = None if weights is None else weights.float()
        scale = 1.0 / m if w is None else 1.0
        if m * t <= max_elements:
            loss, correct = _chunk_infonce(preds, targets, positive, w)
            return loss * scale, correct.float() / m
        rows = max(1, max_elements // max(1, t))
        loss = preds.new_zeros(())
        correct = torch.zeros((), dtype=torch.long, device=preds.device)
        for a in range(0, m, rows):
            part, hits = checkpoint(
                _chunk_infonce, preds[a : a + rows], targets, positive[a : a + rows],
                None if w is None else w[a : a + rows], use_reentrant=False,
            )  # fmt: skip
            loss = loss + part
            correct = correct + hits
        return loss * scale, correct.float() / m


# -- the method --------------------------------------------------------------------------------


class CPCConfig(MethodConfig):
    grid_size: int = Field(
        7, ge=2, description="Patches per side (7; image_size must be a multiple of it + 1)."
    )
    pred_steps: int = Field(
        5, ge=1, description="K: predict 1..K rows ahead (v1: 'up to five rows'); < grid_size."
    )
    pred_min_step: int = Field(
        1,
        ge=1,
        description="First row offset predicted: offsets pred_min_step..pred_steps. The v2 "
        "appendix pseudo-code's defaults (steps_to_ignore=2, steps_to_predict=3) predict "
        "offset 3 only: pred_min_step = pred_steps = 3.",
    )
    target_dim: int | None = Field(
        None,
        ge=1,
        description="Project targets (a 1x1 conv of z) and predictions to this width before "
        "scoring (v2 appendix pseudo-code: 64); null: score against z itself (v1's W_k c).",
    )
    pred_scale: float = Field(
        1.0, gt=0, description="Multiplier of the predictions (v2 appendix: emb_scale 0.1)."
    )
    offset_weighting: Literal["prediction", "offset"] = Field(
        "prediction",
        description="'prediction': mean over all predictions (near offsets, having more "
        "rows, weigh more); 'offset': the sum over offsets (and directions) of each one's "
        "mean, as the v2 appendix pseudo-code sums one cross-entropy per offset.",
    )
    directions: list[Direction] = Field(
        default_factory=lambda: ["top-down", "bottom-up", "left-right", "right-left"],
        min_length=1,
        description=(
            "Prediction directions, each with its own context network: all four in v2; "
            "['top-down'] is v1 and ~4x cheaper in the loss."
        ),
    )
    norm: Literal["layer", "batch"] = Field(
        "layer",
        description=(
            "Patch-encoder normalisation: 'layer' (v2; ResNets get GroupNorm(1, C)) or the "
            "backbone's own 'batch' (v1). ViTs always use their LayerNorm."
        ),
    )
    context_blocks: int = Field(
        6, ge=1, description="Residual masked-conv blocks (each sees one more row up)."
    )
    context_hidden: int | None = Field(
        None, ge=1, description="Bottleneck width of the context blocks; default D/4."
    )
    patch_color_drop: bool = Field(
        True, description="v2: keep one random colour channel per patch, noise for the others."
    )
    patch_flip_p: float = Field(
        0.5, ge=0, le=1, description="v2: per-patch horizontal flip probability (0 = off)."
    )
    crop_scale: float = Field(
        (260 / 300) ** 2,
        gt=0,
        le=1,
        description="Area of the random square crop (v2: 260 of a 300-px image, 0.751).",
    )


class CPC(Method):
    """CPC v2: patch grid, masked-conv context network, InfoNCE over the batch's patches."""

    name = "cpc"
    # No official code, and neither paper zeroes a residual block's last normalisation:
    # the plain initialisation (γ = 1), sslcli's choice.
    zero_init_last = False
    Config = CPCConfig
    # The batch is sslcli's choice (the papers give none that maps onto one machine),
    # sized for a CPU: every prediction is scored against all 49·B patches of the batch,
    # so the loss costs B², and at Adam's 2e-4 more, smaller steps learned more in the
    # same epochs. On digits (4 epochs, ResNet-18) B = 8 reached kNN 58.2 % in 390 s,
    # B = 16 56.3 % in 490 s and B = 32 51.0 % in 540 s, against 46.0 % at random init.
    # Raise it on GPUs.
    recipe = Recipe(
        optim={"name": "adamw", "lr": 2e-4, "lr_scaling": "none", "weight_decay": 0.0},
        schedule={"kind": "constant", "warmup_epochs": 0},
        trainer={"batch_size": 8},
    )

    def __init__(self, config: CPCConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: CPCConfig = config
        c = config
        spec: BackboneSpec = backbone.sslcli_spec
        self.patch, self.stride = grid_geometry(spec.image_size, c.grid_size)
        if c.pred_steps >= c.grid_size:
            raise ConfigError(
                [f"method.pred_steps: {c.pred_steps} rows ahead do not fit a {c.grid_size}-row "
                 "grid (method.grid_size)"]
            )  # fmt: skip
        if c.pred_min_step > c.pred_steps:
            raise ConfigError(
                [f"method.pred_min_step: {c.pred_min_step} is beyond method.pred_steps="
                 f"{c.pred_steps}"]
            )  # fmt: skip
        if len(set(c.directions)) != len(c.directions):
            raise ConfigError([f"method.directions: repeated entries in {c.directions}"])
        if c.norm == "layer" and not spec.is_vit:
            self.backbone = _with_layer_norm(spec)
        # Small images give patches of a few pixels: the deep stages then run on 1×1 maps,
        # where a matrix product with the centre tap is the same convolution, ~6× faster.
        centre_tap_on_tiny_maps(self.backbone)
        width = feature_dim(self.backbone)
        hidden = c.context_hidden or max(1, width // 4)
        self.context = nn.ModuleDict(
            {d: ContextNetwork(width, hidden, c.context_blocks) for d in c.directions}
        )
        # W_k for k = pred_min_step..K, per direction: 1×1 convolutions = the same linear
        # map at every grid position, to the target width.
        tdim = c.target_dim or width
        self.target_proj = nn.Conv2d(width, tdim, 1) if c.target_dim else None
        offsets = c.pred_steps - c.pred_min_step + 1
        self.predictors = nn.ModuleDict(
            {
                d: nn.ModuleList([nn.Conv2d(width, tdim, 1, bias=False) for _ in range(offsets)])
                for d in c.directions
            }
        )

    def views(self) -> list[ViewSpec]:
        s = self.config.crop_scale
        # One square crop; the augmentation that matters happens per patch.
        size = self.backbone.sslcli_spec.image_size
        return crop_views(size, (s, s), ratio=(1.0, 1.0), flip_p=0.0)

    def encode_grid(self, x: Tensor, augment: bool = False) -> Tensor:
        """Images ``[B, 3, S, S]`` → patch features ``[B, D, G, G]``."""
        b, g = x.shape[0], self.config.grid_size
        patches = cut_patches(x, self.patch, self.stride).reshape(
            b * g * g, x.shape[1], self.patch, self.patch
        )
        if augment:
            patches = patch_augment(patches, self.config.patch_color_drop, self.config.patch_flip_p)
        z = self.backbone(patches)
        return z.view(b, g, g, -1).permute(0, 3, 1, 2)

    def predictions(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every ``ẑ = W_k c`` of every direction, with the grid positions involved.

        Returns (preds [M, D'], target [M], source [M]): the patch each prediction is
        scored against and the patch whose context made it, both counted image-major,
        then row, then column, in the un-rotated grid. ``D'`` is ``method.target_dim`` (or
        D); the predictions are multiplied by ``method.pred_scale``.
        """
        return self._predictions(z)[:3]

    def _predictions(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:meth:`predictions` plus the (direction, offset) group of each prediction."""
        c = self.config
        b, _, g, _ = z.shape
        ids = torch.arange(b * g * g, device=z.device).view(b, g, g)
        preds, targets, sources, groups = [], [], [], []
        for name in c.directions:
            r = ROTATIONS[name]
            zr = torch.rot90(z, r, dims=(2, 3))
            idr = torch.rot90(ids, r, dims=(1, 2))
            ctx = self.context[name](zr)
            for k, w in enumerate(self.predictors[name], start=c.pred_min_step):
                p = w(ctx[:, :, : g - k, :])  # rows i = 0..G-1-k predict rows i + k
                preds.append(p.permute(0, 2, 3, 1).reshape(-1, p.shape[1]))
                targets.append(idr[:, k:, :].reshape(-1))
                sources.append(idr[:, : g - k, :].reshape(-1))
                groups.append(torch.full_like(targets[-1], len(groups)))
        out = torch.cat(preds)
        if c.pred_scale != 1.0:
            out = out * c.pred_scale
        return out, torch.cat(targets), torch.cat(sources), torch.cat(groups)

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        (x,) = batch.views
        z = self.encode_grid(x, augment=True)
        preds, target, _, groups = self._predictions(z)
        tz = z if self.target_proj is None else self.target_proj(z)
        flat = tz.permute(0, 2, 3, 1).reshape(-1, tz.shape[1])
        # Negatives: every patch of the global batch (with gradient, as the local ones).
        everything = dist.gather_with_grad(flat.float().contiguous())
        target = target + dist.rank() * flat.shape[0]
        weights = None
        if self.config.offset_weighting == "offset":
            # Σ over (direction, offset) groups of each group's mean.
            weights = 1.0 / torch.bincount(groups).float()[groups]
        loss, acc = cpc_infonce(preds, everything, target, weights=weights)
        pooled = z.detach().float().mean(dim=(2, 3))
        return StepOutput(loss=loss, logs={"acc": acc}, embedding=pooled)

    def embed(self, images: Tensor) -> Tensor:
        """Patch features of the image's grid, mean-pooled over the G×G patches."""
        return self.encode_grid(images).mean(dim=(2, 3))

    def export_metadata(self, which: str) -> dict[str, Any]:
        # The exported weights are the patch encoder; the grid lets sslcli.load_timm (and
        # anyone reading config.json) rebuild the grid-pooled representation of embed().
        g = self.config.grid_size
        return {"patch_grid": {"grid_size": g, "patch": self.patch, "stride": self.stride}}


def _with_layer_norm(spec: BackboneSpec) -> nn.Module:
    """The backbone rebuilt with GroupNorm(1, C) layers, recorded in its spec's kwargs so
    an exported encoder is rebuilt by timm with the same layers."""
    new = dataclasses.replace(spec, kwargs={**spec.kwargs, "norm_layer": "groupnorm1"})
    try:
        return new.build()
    except (BackboneError, TypeError, ValueError) as e:
        raise ConfigError(
            [f"method.norm: 'layer' needs a backbone that takes timm's norm_layer argument "
             f"({spec.timm_name} does not: {e}); use method.norm=batch or a ResNet/ViT"]
        ) from e  # fmt: skip
