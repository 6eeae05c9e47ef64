"""Encoders from timm: aliases, small-image adaptation, feature widths.

Every encoder is a plain timm model built with ``num_classes=0`` (it returns pooled
features), so its ``state_dict`` keys are timm's own and export needs no renaming.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import timm
import torch
from torch import nn

from sslcli.errors import BackboneError, suggest

ALIASES: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
    "skresnet18": "skresnet18",
    "skresnet34": "skresnet34",
    "skresnet50": "skresnet50",
    "skresnext50": "skresnext50_32x4d",
    # SimCLR v2's selective-kernel ResNets (its Table 1): timm's SK parts, built with the
    # constructor arguments of ALIAS_KWARGS (see sk_resnet_kwargs).
    "sk-resnet50-1x": "skresnet50",
    "sk-resnet50-2x": "skresnet50",
    "sk-resnet101-1x": "skresnet50",
    "sk-resnet101-2x": "skresnet50",
    "sk-resnet152-1x": "skresnet50",
    "sk-resnet152-2x": "skresnet50",
    "sk-resnet152-3x": "skresnet50",
    "vit-t": "vit_tiny_patch16_224",
    "vit-s": "vit_small_patch16_224",
    "vit-b": "vit_base_patch16_224",
    "vit-l": "vit_large_patch16_224",
}

# Constructor arguments that may come from a file (a recipe, a run's config.json, a
# checkpoint's or an export's metadata). Only shapes of the network: never an argument
# that makes timm open a file or contact a hub (checkpoint_path, pretrained_cfg,
# pretrained_cfg_overlay, file, ...), whatever a file says. Extend it here, in one place.
FILE_SAFE_KWARGS: frozenset[str] = frozenset({
    # input and output
    "in_chans", "num_classes", "global_pool", "img_size", "dynamic_img_size",
    "dynamic_img_pad",
    # Vision Transformers
    "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm",
    "class_token", "reg_tokens", "no_embed_class", "pos_embed", "init_values", "fc_norm",
    "pre_norm", "final_norm", "use_fc_norm",
    # ResNets and their relatives (SK-ResNet, ResNeXt)
    "zero_init_last", "stem_type", "stem_width", "avg_down", "block_args", "cardinality",
    "base_width", "down_kernel_size", "output_stride", "layers", "channels",
    # layer types by timm's registered names (CPC's "groupnorm1"), never a path
    "norm_layer", "act_layer",
    # regularisation (training only)
    "drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate", "attn_drop_rate",
    "pos_drop_rate", "patch_drop_rate",
})  # fmt: skip


def sk_resnet_kwargs(depth: int, width: int) -> dict[str, Any]:
    """timm constructor arguments of SimCLR v2's SK-ResNet-``depth`` at ``width``x.

    The official code (google-research/simclr, ``tf2/resnet.py``, with ``sk_ratio`` 0.0625):
    - selective kernel (``SK_Conv2D``) in place of each bottleneck's 3x3 conv: *two* 3x3
      branches (no dilation, no 5x5), each over all the input channels (one 3x3 conv to
      2x the width, then split), BN + ReLU each; the branches are summed, averaged over
      space, reduced by a 1x1 conv to ``max(int(width * 0.0625), 32)`` channels, BN + ReLU,
      expanded by a 1x1 conv to two sets of per-channel logits, softmax across the
      branches. timm's ``SelectiveKernel`` with ``kernel_size=[3, 3]``,
      ``split_input=False`` and ``rd_ratio=1/16, rd_divisor=32`` is exactly that (its
      default splits the input between a 3x3 and a dilated "5x5" branch);
    - a ResNet-D stem (3x3 stride-2 conv to 32w, 3x3 to 32w, 3x3 to 64w, each with BN +
      ReLU, then the max-pool): timm's ``stem_type="deep"`` with ``stem_width=32w``;
    - ResNet-D shortcuts (2x2 average pool with the block's stride, then a 1x1 conv):
      ``avg_down=True``;
    - every channel count times the width multiplier: ``channels=(64w, 128w, 256w, 512w)``.
    Differences that remain: two without parameters — TF's 'SAME' padding of the
    max-pool, and in the first stage, whose shortcut has stride 1, the official code
    still applies a 2x2 stride-1 average pool (timm's ``avg_down`` uses none there) —
    and at 3x width timm's channel rounding gives stage 3 64 instead of 48 attention
    channels (+1.3 M parameters). Parameter counts (``ssl backbones``) against the
    paper's Table 1: 35.2 / 140.3 M (50, 1x / 2x; paper 35 / 140), 64.7 / 257.1 M (101;
    65 / 257), 88.9 / 353.4 M (152; 89 / 354), 796.0 M (152, 3x; 795).
    """
    layers = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]
    return {
        "layers": layers,
        "channels": [64 * width, 128 * width, 256 * width, 512 * width],
        "stem_type": "deep",
        "stem_width": 32 * width,
        "avg_down": True,
        # Lists, not tuples: SelectiveKernel repeats a non-list kernel_size, and the
        # arguments go through JSON (checkpoints, config.json) anyway.
        "block_args": {
            "sk_kwargs": {
                "kernel_size": [3, 3],
                "split_input": False,
                "rd_ratio": 0.0625,
                "rd_divisor": 32,
            }
        },
    }


ALIAS_KWARGS: dict[str, dict[str, Any]] = {
    f"sk-resnet{d}-{w}x": sk_resnet_kwargs(d, w)
    for d, w in ((50, 1), (50, 2), (101, 1), (101, 2), (152, 1), (152, 2), (152, 3))
}
"""Aliases whose architecture is a registered timm model built with other constructor
arguments; export records them as ``model_args``, so plain timm rebuilds the same network."""

# timm modules whose ResNet-family models take ``zero_init_last`` (their residual blocks
# end with a normalisation layer whose weight it zeroes).
ZERO_INIT_LAST_MODULES = ("timm.models.resnet", "timm.models.sknet", "timm.models.resnest")

SMALL_IMAGE_MAX = 64
VIT_PREFIXES = ("vit_", "deit", "test_vit")
"""Images up to this side get the small-image stem (convnets) or a small patch size (ViTs)."""

Backbone = nn.Module
"""A timm model with ``num_classes=0``; ``backbone.sslcli_spec`` says how it was built."""


class BackboneRequests(Protocol):
    """What a method asks of its backbone (:class:`sslcli.Method` implements it)."""

    zero_init_last: ClassVar[bool | None]

    @classmethod
    def backbone_kwargs(cls, timm_name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BackboneSpec:
    """How to (re)build an encoder: what export and second encoders (CMC) need."""

    alias: str
    timm_name: str
    image_size: int
    small_stem: bool
    """ResNet stem replaced by a 3x3 stride-1 conv without max-pool (CIFAR style)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments given to ``timm.create_model`` (e.g. img_size, patch_size)."""

    @property
    def is_vit(self) -> bool:
        return self.timm_name.startswith(VIT_PREFIXES)

    def build(self, **overrides: Any) -> nn.Module:
        """A fresh, randomly initialised encoder (``overrides`` e.g. in_chans=1 for CMC)."""
        kwargs = {**self.kwargs, **overrides}
        try:
            model = timm.create_model(self.timm_name, pretrained=False, num_classes=0, **kwargs)
        except (TypeError, ValueError, AssertionError, KeyError, IndexError, RuntimeError) as e:
            # A bad value (depth="x", num_heads that does not divide embed_dim, ...) fails
            # deep inside the constructor; it is still the user's kwargs that are wrong.
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise BackboneError(
                f"backbone {self.alias!r} cannot be built with {kwargs}: {first}"
            ) from e
        if self.small_stem:
            _small_stem(model, kwargs.get("in_chans", 3))
        model.sslcli_spec = self  # type: ignore[assignment]
        return model


def resolve_name(name: str) -> str:
    """Alias or timm name -> timm name; a one-line error with suggestions otherwise."""
    if name in ALIASES:
        return ALIASES[name]
    if name in timm.list_models():
        return name
    raise BackboneError(
        f"unknown backbone {name!r}{suggest(name, list(ALIASES) + timm.list_models())}; "
        "run 'ssl backbones' for the aliases, or give any timm model name"
    )


def check_kwargs(kwargs: object, source: str = "backbone.kwargs") -> dict[str, Any]:
    """``kwargs`` if every key is in :data:`FILE_SAFE_KWARGS`, else a one-line error."""
    if not isinstance(kwargs, dict):
        raise BackboneError(f"{source}: expected a mapping of argument names to values")
    bad = sorted(str(k) for k in kwargs if k not in FILE_SAFE_KWARGS)
    if bad:
        raise BackboneError(
            f"{source}: {', '.join(repr(k) for k in bad)} may not be set from a file or "
            f"the command line (allowed: {', '.join(sorted(FILE_SAFE_KWARGS))})"
        )
    return dict(kwargs)


def spec_from_meta(meta: object, source: str) -> BackboneSpec:
    """A :class:`BackboneSpec` from untrusted metadata (a checkpoint's ``backbone``
    block), validated as user input is: the name through :func:`resolve_name` (so no
    ``hf-hub:`` or ``local-dir:`` model is ever built), the kwargs through the allow-list."""
    if not isinstance(meta, dict):
        raise BackboneError(f"{source}: the backbone metadata is not a mapping")
    name = meta.get("timm_name")
    if not isinstance(name, str):
        raise BackboneError(f"{source}: the backbone metadata names no timm model")
    try:
        timm_name = resolve_name(name)
        size = int(meta["image_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise BackboneError(f"{source}: bad backbone metadata ({type(e).__name__}: {e})") from e
    except BackboneError as e:
        raise BackboneError(f"{source}: {e}") from e
    if not 1 <= size <= 4096:
        raise BackboneError(f"{source}: bad backbone image_size {size}")
    alias = meta.get("alias", timm_name)
    return BackboneSpec(
        alias=alias if isinstance(alias, str) else timm_name,
        timm_name=timm_name,
        image_size=size,
        small_stem=bool(meta.get("small_stem", False)),
        kwargs=check_kwargs(meta.get("kwargs") or {}, f"{source}: backbone kwargs"),
    )


def is_vit_name(name: str) -> bool:
    """Whether ``name`` (alias or timm name) is a Vision Transformer; False if unknown."""
    try:
        timm_name = resolve_name(name)
    except BackboneError:
        return False
    return timm_name.startswith(VIT_PREFIXES)


def accepts_zero_init_last(timm_name: str) -> bool:
    """Whether the timm model takes ``zero_init_last`` (ResNet-family models)."""
    try:
        module = timm.models.model_entrypoint(timm_name).__module__
    except (RuntimeError, KeyError):
        return False
    return module in ZERO_INIT_LAST_MODULES


@functools.cache
def has_bottleneck_blocks(timm_name: str) -> bool:
    """Whether the timm model's residual blocks are bottlenecks (a third conv, ``conv3``),
    told from a build on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    return any(
        hasattr(m, "conv3") and callable(getattr(m, "zero_init_last", None))
        for m in model.modules()
    )


def make_spec(
    name: str,
    image_size: int,
    small_stem: bool | None = None,
    drop_path_rate: float = 0.0,
    kwargs: dict[str, Any] | None = None,
    method: BackboneRequests | None = None,
) -> BackboneSpec:
    """How to build backbone ``name`` for ``image_size`` px images.

    Constructor arguments, later ones winning: the alias's architecture
    (:data:`ALIAS_KWARGS`), what ``method`` asks for (its ``zero_init_last``, passed only
    to models that take it, and its :meth:`~sslcli.Method.backbone_kwargs`), the user's
    ``kwargs`` (``backbone.kwargs``); then the image-size adaptations below fill in what
    is still unset. The result is ``spec.kwargs``: what the encoder is built with, what
    checkpoints and exports record.
    """
    timm_name = resolve_name(name)
    extra: dict[str, Any] = copy.deepcopy(ALIAS_KWARGS.get(name, {}))
    if method is not None:
        if method.zero_init_last is not None and accepts_zero_init_last(timm_name):
            extra["zero_init_last"] = bool(method.zero_init_last)
        extra.update(copy.deepcopy(method.backbone_kwargs(timm_name)))
    extra.update(kwargs or {})
    small = image_size <= SMALL_IMAGE_MAX if small_stem is None else small_stem
    is_vit = timm_name.startswith(VIT_PREFIXES)
    if is_vit:
        extra.setdefault("img_size", image_size)
        if small:
            # 32 px -> patch 4 (an 8x8 grid), the usual CIFAR ViT; never below 2.
            extra.setdefault("patch_size", max(2, image_size // 8))
        # Local crops of another size need interpolated position embeddings.
        extra.setdefault("dynamic_img_size", True)
    if drop_path_rate:
        extra["drop_path_rate"] = drop_path_rate
    is_resnet = _is_resnet(timm_name)
    return BackboneSpec(
        alias=name,
        timm_name=timm_name,
        image_size=image_size,
        small_stem=bool(small and is_resnet),
        kwargs=extra,
    )


def build_backbone(spec: BackboneSpec) -> nn.Module:
    return spec.build()


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled features; timm's head_hidden_size first, as heads expect."""
    width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
    if not width:
        raise BackboneError(f"cannot tell the feature width of {type(model).__name__}")
    return int(width)


def _is_resnet(timm_name: str) -> bool:
    return timm_name.startswith(
        ("resnet", "skresnet", "skresnext", "resnext", "wide_resnet", "test_resnet")
    )


def _small_stem(model: nn.Module, in_chans: int) -> None:
    """CIFAR-style stem: 3x3 stride-1 conv, no max-pool (keeps 32 px images at 32x32)."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d):
        # Deep stems (test_resnet, *d variants) are Sequentials: make their first conv stride 1.
        if isinstance(conv1, nn.Sequential) and isinstance(conv1[0], nn.Conv2d):
            first = conv1[0]
            conv1[0] = nn.Conv2d(in_chans, first.out_channels, 3, 1, 1, bias=False)
        else:
            return
    else:
        model.conv1 = nn.Conv2d(in_chans, conv1.out_channels, 3, 1, 1, bias=False)
    if hasattr(model, "maxpool"):
        model.maxpool = nn.Identity()


def describe_all(aliases: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows for ``ssl backbones``: alias, timm name (and the constructor arguments an
    alias adds), parameters, feature width; every alias, or those of ``aliases``."""
    rows = []
    for alias, timm_name in ALIASES.items():
        if aliases is not None and alias not in aliases:
            continue
        with torch.device("meta"):
            model = timm.create_model(
                timm_name, pretrained=False, num_classes=0, **ALIAS_KWARGS.get(alias, {})
            )
        rows.append(
            {
                "alias": alias,
                "timm": timm_name,
                "kwargs": copy.deepcopy(ALIAS_KWARGS.get(alias, {})),
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "features": feature_dim(model),
            }
        )
    return rows
