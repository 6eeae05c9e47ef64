"""Building blocks of the methods: heads, losses, queue and memory bank, momentum (EMA)
encoders and schedules, DINO's head, Sinkhorn-Knopp, shuffle-BN, ViT helpers and the
distributed helpers every loss gathers through.

Everything a method plugin composes is re-exported here (``from sslcli.nn import MLP,
KeyQueue, ema_update_``); the submodules hold the papers' details in their docstrings.
"""

from __future__ import annotations

from sslcli.nn import dist
from sslcli.nn.colorspace import luma_chroma_views, rgb_to_lab, rgb_to_ycbcr
from sslcli.nn.dino_head import DINOHead, WeightNormLinear, multicrop_forward, patch_size
from sslcli.nn.dist import GlobalBatchNorm
from sslcli.nn.ema import cosine_momentum, ema_update_, ema_update_pairs_, momentum_copy
from sslcli.nn.heads import MLP, UnitEmbedding
from sslcli.nn.losses import nt_xent
from sslcli.nn.memory_bank import DeferredBankWrites, MemoryBank
from sslcli.nn.nce import (
    OFFICIAL_NCE_K,
    SMALL_DATA_SET,
    NCELoss,
    NCENormalizer,
    bank_scores,
    bank_softmax_loss,
    default_noise_count,
    nce_criterion,
    noise_count_warning,
    sample_noise_indices,
    sampled_softmax_loss,
)
from sslcli.nn.queue import OFFICIAL_QUEUE_SIZE, KeyQueue, default_queue_size, queue_size_warning
from sslcli.nn.regression import (
    byol_loss,
    mean_cosine,
    negative_cosine,
    normalized_mse,
    simsiam_loss,
)
from sslcli.nn.schedules import (
    cosine_between,
    cosine_increase,
    linear_warmup_value,
    warmup_constant,
    warmup_cosine,
    warmup_step,
)
from sslcli.nn.shuffle_bn import (
    bn_groups,
    grouped_batch_norm,
    shuffle_bn_forward,
    split_batchnorm,
)
from sslcli.nn.sinkhorn import sinkhorn_knopp
from sslcli.nn.tiny_maps import CentreTapConv2d, centre_tap_on_tiny_maps
from sslcli.nn.vit import (
    freeze_patch_projection_,
    is_vit,
    moco_v3_init_,
    sincos_2d_table,
    use_sincos_pos_embed_,
)

__all__ = [
    # heads
    "DINOHead",
    "MLP",
    "UnitEmbedding",
    "WeightNormLinear",
    # losses
    "bank_scores",
    "bank_softmax_loss",
    "byol_loss",
    "mean_cosine",
    "nce_criterion",
    "negative_cosine",
    "normalized_mse",
    "nt_xent",
    "sampled_softmax_loss",
    "simsiam_loss",
    "NCELoss",
    "NCENormalizer",
    # negatives: queue, memory bank, noise samples
    "DeferredBankWrites",
    "KeyQueue",
    "MemoryBank",
    "OFFICIAL_NCE_K",
    "OFFICIAL_QUEUE_SIZE",
    "SMALL_DATA_SET",
    "default_noise_count",
    "default_queue_size",
    "noise_count_warning",
    "queue_size_warning",
    "sample_noise_indices",
    # momentum (EMA) encoders
    "cosine_momentum",
    "ema_update_",
    "ema_update_pairs_",
    "momentum_copy",
    # schedules (pure functions of the step)
    "cosine_between",
    "cosine_increase",
    "linear_warmup_value",
    "warmup_constant",
    "warmup_cosine",
    "warmup_step",
    # clustering
    "sinkhorn_knopp",
    # batch norm across samples and processes
    "GlobalBatchNorm",
    "bn_groups",
    "grouped_batch_norm",
    "shuffle_bn_forward",
    "split_batchnorm",
    # multi-crop, ViT and small-image helpers
    "CentreTapConv2d",
    "centre_tap_on_tiny_maps",
    "freeze_patch_projection_",
    "is_vit",
    "moco_v3_init_",
    "multicrop_forward",
    "patch_size",
    "sincos_2d_table",
    "use_sincos_pos_embed_",
    # colour spaces (CMC's views)
    "luma_chroma_views",
    "rgb_to_lab",
    "rgb_to_ycbcr",
    # distributed helpers (gather, all-reduce, rank)
    "dist",
]
