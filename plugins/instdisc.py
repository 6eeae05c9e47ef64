"""InstDisc (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination").

Every image is its own class. The encoder's features go through a linear layer to 128-d
and onto the unit sphere; a memory bank holds one such vector per training image, and the
objective is NCE that tells the image's own bank row from K rows drawn at random (or,
with ``nce_k = 0``, a softmax over the whole bank: the default below 32,768 images, where
NCE's approximation is neither needed nor stable). Follows the official PyTorch code
(zhirongw/lemniscate.pytorch) where it and the paper differ in detail:

- the normalising constant Z is estimated on the first batch and then frozen;
- the bank rows are read for the loss, then the images' rows are updated with the new
  features (momentum 0.5, re-normalised);
- SGD with weight decay on every parameter (BN and biases included), no warm-up.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from sslcli.backbones import Backbone, feature_dim
from sslcli.data.views import ViewSpec, instdisc_views
from sslcli.errors import ConfigError
from sslcli.method import Batch, Method, MethodConfig, Recipe, StepInfo, StepOutput
from sslcli.nn import (
    OFFICIAL_NCE_K,
    SMALL_DATA_SET,
    DeferredBankWrites,
    MemoryBank,
    NCELoss,
    UnitEmbedding,
    bank_softmax_loss,
    noise_count_warning,
    sample_noise_indices,
)


class InstDiscConfig(MethodConfig):
    temperature: float = Field(
        0.07, gt=0, description="τ of exp(v·f/τ): 0.07 ImageNet, 0.1 in the CIFAR script."
    )
    proj_dim: int = Field(128, ge=1, description="Width of the embedding and of the bank rows.")
    nce_k: int | None = Field(
        None,
        ge=0,
        description=(
            "Noise samples per image for NCE (official: 4096); 0 = the exact non-parametric "
            "softmax over the whole bank. Default: 4096 from 32,768 images up, the exact "
            "softmax below (NCE approximates it for large N; on digits it collapsed)."
        ),
    )
    bank_momentum: float = Field(
        0.5, ge=0, lt=1, description="m of the bank update v ← n(m·v + (1−m)·f); 0.5 official."
    )
    z_momentum: float | None = Field(
        None,
        ge=0,
        lt=1,
        description=(
            "None: Z estimated on the first batch and frozen (official). A momentum such as "
            "0.99 keeps an EMA of the per-batch estimate, which tracks the embedding as it "
            "sharpens (a known improvement on long runs)."
        ),
    )
    crop_min_scale: float = Field(0.2, gt=0, le=1, description="Smallest crop area fraction.")
    grayscale_first: bool = Field(
        True,
        description=(
            "Grayscale before colour jitter (ImageNet script); False = jitter first (CIFAR script)."
        ),
    )
    flip_p: float = Field(
        0.5, ge=0, le=1, description="Horizontal-flip probability (ImageNet 0.5; CIFAR script 0)."
    )


class InstDisc(Method):
    """InstDisc: memory bank of 128-d unit features, NCE with K uniform noise rows."""

    name = "instdisc"
    # Official code (zhirongw/lemniscate.pytorch, models/resnet.py): every BN weight filled
    # with 1 — no zeroed residual BN.
    zero_init_last = False
    Config = InstDiscConfig
    needs_dataset_size = True
    # lemniscate main.py: torch SGD over all parameters, lr 0.03 at batch 256, no warm-up,
    # ×0.1 at epochs 120 and 160 of 200 (stated as fractions of the run).
    recipe = Recipe(
        optim={
            "name": "sgd",
            "lr": 0.03,
            "lr_scaling": "linear",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "exclude_norm_bias": False,
        },
        schedule={"kind": "step", "milestones": [0.6, 0.8], "gamma": 0.1, "warmup_epochs": 0},
    )

    def __init__(self, config: InstDiscConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__(config, backbone, dataset_size)
        self.config: InstDiscConfig = config
        if dataset_size < 1:
            raise ConfigError(["instdisc needs the data set size (one bank row per image)"])
        k = config.nce_k
        # NCE stands in for the softmax "when the number of classes n is very large" (Sec.
        # 3.2); on a small set the exact softmax is cheap, and NCE with a frozen Z was
        # measured to collapse on digits (kNN 57 % at random init -> 23-37 %) where the
        # softmax learns (-> 76 %). Why: with Z frozen at its first-batch value (≈ N),
        # the positive term saturates once v_i·f nears 1, while each of the K noise terms
        # pushes f away from its row with up to 1/τ; on a small, similar-looking set the
        # rows share one direction, so that push is the same for every image and drags all
        # features together (loss ≈ K·(1/τ − log K), embedding std 0.003). An EMA of Z
        # (z_momentum 0.99) grows with the scores and avoids it (std 0.028), but learns
        # slowly: kNN 57.7 % after the default 4 epochs at K = 179.
        self.nce_k = (OFFICIAL_NCE_K if dataset_size >= SMALL_DATA_SET else 0) if k is None else k
        if self.nce_k >= dataset_size:
            hint = noise_count_warning("instdisc", self.nce_k, dataset_size)
            warnings.warn(f"{hint}, or nce_k=0 for the exact softmax", stacklevel=2)
        # The official ResNet's fc replaced by a 128-d Linear (with bias), then L2 norm.
        self.head = nn.Linear(feature_dim(backbone), config.proj_dim)
        self.memory = MemoryBank(dataset_size, config.proj_dim, config.bank_momentum)
        self.nce = NCELoss(dataset_size, config.temperature, config.z_momentum)
        # The features of the current step wait until after the optimiser step: the
        # softmax variant's backward still needs the bank as it was when it was read.
        self.bank_writes = DeferredBankWrites()

    def views(self) -> list[ViewSpec]:
        c = self.config
        size = self.backbone.sslcli_spec.image_size
        return instdisc_views(
            size, c.crop_min_scale, flip_p=c.flip_p, grayscale_first=c.grayscale_first
        )

    def features(self, x: Tensor) -> Tensor:
        """The unit 128-d embedding f = n(W·encoder(x) + b)."""
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)

    def export_candidates(self) -> dict[str, nn.Module]:
        # The backbone's pooled feature is the default (linear probes read it, as the
        # paper's linear numbers do); the paper's kNN / 1-NN numbers read the 128-d unit
        # embedding that the bank holds: ``--which embedding``.
        return {"backbone": self.backbone, "embedding": UnitEmbedding(self.backbone, self.head)}

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        c = self.config
        (x,) = batch.views
        f = self.features(x)
        logs: dict[str, Tensor | float] = {}
        if self.nce_k > 0:
            idx = sample_noise_indices(batch.index, self.nce_k, self.dataset_size)
            loss, probs = self.nce(f, self.memory.rows(idx))
            logs["pos_prob"] = probs[:, 0].detach().mean()
            logs["z"] = self.nce.normalizer.z.detach().clone()
        else:
            loss, logits = bank_softmax_loss(f, self.memory.bank, batch.index, c.temperature)
            with torch.no_grad():
                logs["acc"] = (logits.argmax(dim=1) == batch.index).float().mean()
        self.bank_writes.stage(batch.index, batch.index_distinct, (self.memory, f))
        return StepOutput(loss=loss, logs=logs, embedding=f.detach())

    def after_optimizer_step(self, step: StepInfo) -> None:
        # The official update order: rows were read for this step's loss, now they take
        # the new features ("v_i ← m·v_i + (1 − m)·f_i", then normalised).
        self.bank_writes.flush()
