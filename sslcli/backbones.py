"""Encoders from timm: aliases, small-image adaptation, feature widths.

Every encoder is a plain timm model built with ``num_classes=0`` (it returns pooled
features), so its ``state_dict`` keys are timm's own and export needs no renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    "vit-t": "vit_tiny_patch16_224",
    "vit-s": "vit_small_patch16_224",
    "vit-b": "vit_base_patch16_224",
    "vit-l": "vit_large_patch16_224",
}

SMALL_IMAGE_MAX = 64
VIT_PREFIXES = ("vit_", "deit", "test_vit")
"""Images up to this side get the small-image stem (convnets) or a small patch size (ViTs)."""

Backbone = nn.Module
"""A timm model with ``num_classes=0``; ``backbone.sslcli_spec`` says how it was built."""


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
        except TypeError as e:
            raise BackboneError(f"backbone {self.alias!r} does not accept {kwargs}: {e}") from e
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


def is_vit_name(name: str) -> bool:
    """Whether ``name`` (alias or timm name) is a Vision Transformer; False if unknown."""
    try:
        timm_name = resolve_name(name)
    except BackboneError:
        return False
    return timm_name.startswith(VIT_PREFIXES)


def make_spec(
    name: str,
    image_size: int,
    small_stem: bool | None = None,
    drop_path_rate: float = 0.0,
    kwargs: dict[str, Any] | None = None,
) -> BackboneSpec:
    timm_name = resolve_name(name)
    extra: dict[str, Any] = dict(kwargs or {})
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


def describe_all() -> list[dict[str, Any]]:
    """Rows for ``ssl backbones``: alias, timm name, parameters, feature width."""
    rows = []
    for alias, timm_name in ALIASES.items():
        with torch.device("meta"):
            model = timm.create_model(timm_name, pretrained=False, num_classes=0)
        rows.append(
            {
                "alias": alias,
                "timm": timm_name,
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "features": feature_dim(model),
            }
        )
    return rows
