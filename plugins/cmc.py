"""CMC (Tian et al. 2019, "Contrastive Multiview Coding").

An image is split into a luminance view (L of Lab, or Y of YCbCr) and a chrominance view
(ab, or CbCr); each view has its own encoder with a linear 128-d layer and L2 norm, and
its own memory bank. The L embedding is contrasted with the ab bank and the ab embedding
with the L bank (the positive is the same image's row, the K noise rows are shared by
both directions), with InstDisc's NCE objective, the two losses summed. Follows the
official code (HobbitLong/CMC, ``NCEAverage``/``NCECriterion``/``train_CMC.py``): one Z
per direction estimated on the first batch and frozen, bank rows read for the loss and
then updated (momentum 0.5), SGD with weight decay on all parameters.

Encoders: the paper's ResNets are half width per view (so the pair costs about one
ResNet); here both are built from the configured backbone (``--backbone``), whatever its
width: pick a narrower one to match the paper's budget. The L encoder takes 1 input
channel, the ab encoder 2 (timm's ``in_chans``).

Evaluation uses the concatenation of both encoders' pooled features (the paper evaluates
the representations of the two views concatenated): :meth:`CMC.embed`. A timm model has one
input stem, so ``ssl export`` writes one encoder as the timm model (``l`` by default, or
``--which ab``) and the other beside it; :func:`sslcli.load_timm` returns the pair, which
gives the same concatenated features as the run.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import Backbone, BackboneSpec, feature_dim
from sslcli.data.views import ViewSpec, crop_views
from sslcli.errors import ConfigError
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import (
    DeferredBankWrites,
    MemoryBank,
    NCELoss,
    default_noise_count,
    luma_chroma_views,
    noise_count_warning,
    sample_noise_indices,
    sampled_softmax_loss,
)


class CMCConfig(MethodConfig):
    temperature: float = Field(
        0.07, gt=0, description="τ of exp(v·f/τ): 0.07 ImageNet, 0.1 STL-10 (README)."
    )
    proj_dim: int = Field(128, ge=1, description="Width of each view's embedding (128).")
    nce_k: int | None = Field(
        None,
        ge=1,
        description=(
            "Noise rows per image, shared by both directions: 4096 (README; the last code "
            "defaults to 16384), or N/8 on data sets under 32,768 images (default). Drawn "
            "with replacement, so it may exceed the data set size."
        ),
    )
    loss: Literal["nce", "softmax"] = Field(
        "nce",
        description=(
            "'nce': InstDisc's NCE with a frozen Z (paper). 'softmax': cross-entropy over "
            "the positive and its K noise rows (the code's NCESoftmaxLoss; steadier)."
        ),
    )
    bank_momentum: float = Field(
        0.5, ge=0, lt=1, description="m of each bank's update v ← n(m·v + (1−m)·f); 0.5."
    )
    z_momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        description=(
            "NCE only. None: each direction's Z estimated on the first batch and frozen "
            "(official); e.g. 0.99: an EMA of the per-batch estimates."
        ),
    )
    color_space: Literal["lab", "ycbcr"] = Field(
        "lab",
        description="'lab': L | ab views (paper); 'ycbcr': Y | CbCr, reported +0.5–1 %.",
    )
    crop_min_scale: float = Field(
        0.08, gt=0, le=1, description="Smallest crop area: 0.08 ResNets, 0.2 AlexNet."
    )


class CMC(Method):
    """CMC: L and ab encoders, two memory banks, NCE of each view against the other's bank."""

    name = "cmc"
    # Official code (HobbitLong/CMC, models/resnet.py): every BN weight filled with 1.
    zero_init_last = False
    Config = CMCConfig
    needs_dataset_size = True
    # train_CMC.py: torch SGD over all parameters, lr 0.03, weight decay 1e-4, batch 128
    # for ResNets, ×0.1 at epochs 120/160/200 of 240 (stated as fractions of the run).
    recipe = Recipe(
        optim={
            "name": "sgd",
            "lr": 0.03,
            "lr_scaling": "none",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "exclude_norm_bias": False,
        },
        schedule={
            "kind": "step",
            "milestones": [120 / 240, 160 / 240, 200 / 240],
            "gamma": 0.1,
            "warmup_epochs": 0,
        },
    )

    def __init__(self, config: CMCConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: CMCConfig = config
        c = config
        if dataset_size < 1:
            raise ConfigError(["cmc needs the data set size (one bank row per image)"])
        self.nce_k = default_noise_count(dataset_size) if c.nce_k is None else c.nce_k
        if self.nce_k >= dataset_size:
            warnings.warn(noise_count_warning("cmc", self.nce_k, dataset_size), stacklevel=2)
        spec = backbone.sslcli_spec
        # One encoder per view, built from the configured backbone with 1 and 2 input
        # channels. in_chans is written into each encoder's spec, so an exporter that
        # writes the spec's kwargs gives timm the right stem. The 3-channel backbone the
        # engine built is not used and is dropped.
        self.backbone = _build(spec, in_chans=1)
        self.backbone_ab = _build(spec, in_chans=2)
        self.head_l = nn.Linear(feature_dim(self.backbone), c.proj_dim)
        self.head_ab = nn.Linear(feature_dim(self.backbone_ab), c.proj_dim)
        self.memory_l = MemoryBank(dataset_size, c.proj_dim, c.bank_momentum)
        self.memory_ab = MemoryBank(dataset_size, c.proj_dim, c.bank_momentum)
        # One Z per direction, as the official params[2] (Z_l) and params[3] (Z_ab).
        self.nce_l = NCELoss(dataset_size, c.temperature, c.z_momentum)
        self.nce_ab = NCELoss(dataset_size, c.temperature, c.z_momentum)
        # This step's features, applied to the banks after the optimiser step.
        self.bank_writes = DeferredBankWrites()

    def views(self) -> list[ViewSpec]:
        # train_CMC.py: RandomResizedCrop → flip → Lab; no colour jitter, no grayscale.
        # Un-normalised, because the colour conversion needs [0, 1] RGB.
        size = self.backbone.sslcli_spec.image_size
        return crop_views(size, (self.config.crop_min_scale, 1.0), normalize=False)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[0, 1] RGB → the normalised (L, ab) or (Y, CbCr) inputs of the two encoders."""
        return luma_chroma_views(x, self.config.color_space)

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        c = self.config
        (x,) = batch.views
        x_l, x_ab = self.split(x)
        f_l = F.normalize(self.head_l(self.backbone(x_l)).float(), dim=1)
        f_ab = F.normalize(self.head_ab(self.backbone_ab(x_ab)).float(), dim=1)
        # The same K noise indices for both directions (the official draws one idx).
        idx = sample_noise_indices(batch.index, self.nce_k, self.dataset_size)
        rows_l, rows_ab = self.memory_l.rows(idx), self.memory_ab.rows(idx)
        logs: dict[str, Tensor | float] = {}
        if c.loss == "nce":
            # L anchor scored against the ab bank, ab anchor against the L bank.
            loss_l, p_l = self.nce_l(f_l, rows_ab)
            loss_ab, p_ab = self.nce_ab(f_ab, rows_l)
            logs["l_prob"] = p_l[:, 0].detach().mean()
            logs["ab_prob"] = p_ab[:, 0].detach().mean()
        else:
            loss_l, logits_l = sampled_softmax_loss(f_l, rows_ab, c.temperature)
            loss_ab, logits_ab = sampled_softmax_loss(f_ab, rows_l, c.temperature)
            with torch.no_grad():
                logs["l_acc"] = (logits_l.argmax(dim=1) == 0).float().mean()
                logs["ab_acc"] = (logits_ab.argmax(dim=1) == 0).float().mean()
        logs["l_loss"] = loss_l.detach()
        logs["ab_loss"] = loss_ab.detach()
        self.bank_writes.stage(
            batch.index, batch.index_distinct, (self.memory_l, f_l), (self.memory_ab, f_ab)
        )
        return StepOutput(loss=loss_l + loss_ab, logs=logs, embedding=f_l.detach())

    def after_optimizer_step(self, step: StepInfo) -> None:
        # Rows were read for this step's loss; now each bank takes its own view's features.
        self.bank_writes.flush()

    # -- evaluation and export ------------------------------------------------------------------
    def encoder(self) -> nn.Module:
        """The L encoder (one timm model); :meth:`embed` uses both encoders."""
        return self.backbone

    def export_candidates(self) -> dict[str, nn.Module]:
        return {"l": self.backbone, "ab": self.backbone_ab}

    def embed(self, images: Tensor) -> Tensor:
        """Concatenated pooled features of both encoders, from un-normalised RGB."""
        x_l, x_ab = self.split(images)
        return torch.cat([self.backbone(x_l), self.backbone_ab(x_ab)], dim=1)

    def export_metadata(self, which: str) -> dict[str, Any]:
        # Either encoder is exported as the timm model; the other goes beside it, so the
        # export reproduces embed() (sslcli.load_timm returns the pair).
        other = "ab" if which == "l" else "l"
        return {
            "paired_views": {
                "which": which,
                "companion": other,
                "color_space": self.config.color_space,
            }
        }


def _build(spec: BackboneSpec, in_chans: int) -> nn.Module:
    return dataclasses.replace(spec, kwargs={**spec.kwargs, "in_chans": in_chans}).build()
