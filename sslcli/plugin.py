"""The public API for method plugins: everything a third-party method needs, in one place.

A plugin imports from here (and from :mod:`sslcli.testing` in its tests), never from
sslcli's internal modules: those are free to move between releases, this module is not.
See ``docs/plugins.md`` for the contract and a walk-through.

Versioning: :data:`PLUGIN_API_VERSION` is this module's own version. Within one major
version, names in ``__all__`` keep their meaning and signatures (new names and new
optional arguments may appear); a name is removed or changed incompatibly only with a new
major version, after at least one minor sslcli release in which using it warns
(``DeprecationWarning``). The names listed here are the whole promise: anything reached
through another sslcli module is internal.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sslcli.backbones import Backbone, BackboneSpec, feature_dim, is_vit_name
from sslcli.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewSpec,
    asymmetric_views,
    crop_views,
    dino_views,
    instdisc_views,
    invaspread_views,
    local_crop_size,
    moco_v1_views,
    moco_v2_views,
    multi_crop_views,
    multicrop_blur_frac,
    simclr_views,
    swav_views,
)
from sslcli.errors import ConfigError, MethodContractError, PluginError, SSLError
from sslcli.method import (
    RESERVED_LOG_KEYS,
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
    MLP,
    DeferredBankWrites,
    DINOHead,
    KeyQueue,
    MemoryBank,
    byol_loss,
    cosine_between,
    cosine_increase,
    cosine_momentum,
    dist,
    ema_update_,
    ema_update_pairs_,
    linear_warmup_value,
    mean_cosine,
    momentum_copy,
    negative_cosine,
    nt_xent,
    simsiam_loss,
    sinkhorn_knopp,
    warmup_cosine,
)

PLUGIN_API_VERSION = (1, 1)
"""(major, minor) of this module; see the module docstring for what a bump means."""

byol_views = asymmetric_views
"""BYOL's asymmetric pair of views (blur 1.0 / 0.1, solarise 0 / 0.2, bicubic crops);
MoCo v3 and Barlow Twins use the same."""


def view_size(backbone: Backbone) -> int:
    """The side of the training views the run asked for (``--image-size``): the size a
    method's :class:`ViewSpec` should use for its global crops."""
    spec = getattr(backbone, "sslcli_spec", None)
    if spec is None:
        raise PluginError("view_size() needs a backbone built by sslcli (it has no sslcli_spec)")
    return int(spec.image_size)


def backbone_spec(backbone: Backbone) -> BackboneSpec:
    """How the backbone was built (timm name, image size, small stem, kwargs): what a
    method needs to build a second encoder of the same kind (``spec.build(in_chans=1)``)."""
    spec = getattr(backbone, "sslcli_spec", None)
    if spec is None:
        raise PluginError("backbone_spec() needs a backbone built by sslcli")
    return spec  # type: ignore[no-any-return]


@contextmanager
def full_precision(device: torch.device | str | None = None) -> Iterator[None]:
    """Run the enclosed code in float32 even inside the engine's autocast region.

    ``training_step`` runs under bf16 autocast on CUDA (``--precision``). A loss that sums
    many products (a cross-correlation or covariance matrix, a log-sum-exp over a large
    batch) loses digits there: cast its inputs with ``.float()`` *and* compute it inside
    this block, because autocast would otherwise run the matrix products in bf16 again.
    """
    kinds = [torch.device(device).type] if device is not None else ["cuda", "cpu"]
    # Only where autocast is on: disabling it for an absent CUDA device would warn.
    with _autocast_off([k for k in kinds if torch.is_autocast_enabled(k)]):
        yield


@contextmanager
def _autocast_off(types: list[str]) -> Iterator[None]:
    if not types:
        yield
        return
    with torch.autocast(device_type=types[0], enabled=False), _autocast_off(types[1:]):
        yield


__all__ = [
    # the contract
    "Batch",
    "Method",
    "MethodConfig",
    "PLUGIN_API_VERSION",
    "RESERVED_LOG_KEYS",
    "Recipe",
    "StepInfo",
    "StepOutput",
    # option markers and the run an option's default may depend on
    "RESUME_SAFE",
    "RunContext",
    "depends_on",
    # views
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ViewSpec",
    "asymmetric_views",
    "byol_views",
    "crop_views",
    "dino_views",
    "instdisc_views",
    "invaspread_views",
    "local_crop_size",
    "moco_v1_views",
    "moco_v2_views",
    "multi_crop_views",
    "multicrop_blur_frac",
    "simclr_views",
    "swav_views",
    # the backbone
    "Backbone",
    "BackboneSpec",
    "backbone_spec",
    "feature_dim",
    "is_vit_name",
    "view_size",
    # parts
    "DINOHead",
    "DeferredBankWrites",
    "KeyQueue",
    "MLP",
    "MemoryBank",
    "byol_loss",
    "dist",
    "ema_update_",
    "ema_update_pairs_",
    "full_precision",
    "mean_cosine",
    "momentum_copy",
    "negative_cosine",
    "nt_xent",
    "simsiam_loss",
    "sinkhorn_knopp",
    # schedules (pure functions of the step)
    "cosine_between",
    "cosine_increase",
    "cosine_momentum",
    "linear_warmup_value",
    "warmup_cosine",
    # errors
    "ConfigError",
    "MethodContractError",
    "PluginError",
    "SSLError",
]
