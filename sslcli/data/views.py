"""View specifications: what crops a method asks the data pipeline for.

A method's ``views()`` returns a list of :class:`ViewSpec`. They are data, not code: the
batched augmentation pipeline (:mod:`sslcli.data.augment`) turns a uint8 batch into one
float tensor per view, drawing independent random parameters for every sample.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViewSpec(BaseModel):
    """One kind of augmented view (``count`` crops of it per image)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(1, ge=1, description="How many crops of this kind per image.")
    size: int = Field(224, ge=1, description="Output side in pixels.")
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range, fraction of the image."
    )
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="Crop aspect-ratio range.")
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    flip_p: float = Field(0.5, ge=0, le=1, description="Horizontal flip probability.")
    jitter_p: float = Field(0.8, ge=0, le=1, description="Colour-jitter probability.")
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)
    grayscale_p: float = Field(0.2, ge=0, le=1)
    grayscale_first: bool = Field(
        False, description="Grayscale before colour jitter (InstDisc, MoCo v1 order)."
    )
    blur_p: float = Field(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = Field(
        0.1, gt=0, le=1, description="Blur kernel side as a fraction of the view size."
    )
    solarize_p: float = Field(0.0, ge=0, le=1)
    solarize_threshold: float = Field(0.5, ge=0, le=1)
    normalize: bool = Field(True, description="Subtract mean / divide std after augmenting.")
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @model_validator(mode="after")
    def _ranges(self) -> ViewSpec:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        return self


def expand(specs: list[ViewSpec]) -> list[ViewSpec]:
    """One entry per produced view (``count`` repeats), in the order methods receive them."""
    return [s for s in specs for _ in range(s.count)]


def moco_v2_views(size: int, crop_min_scale: float, blur_p: float) -> list[ViewSpec]:
    """MoCo v2's augmentation (also SimSiam's, which reuses it unchanged): two views of
    RandomResizedCrop(crop_min_scale–1) → ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8 →
    Grayscale p 0.2 → GaussianBlur(σ 0.1–2) with ``blur_p`` → flip, then normalise."""
    return [
        ViewSpec(
            count=2,
            size=size,
            scale=(crop_min_scale, 1.0),
            jitter_p=0.8,
            brightness=0.4,
            contrast=0.4,
            saturation=0.4,
            hue=0.1,
            grayscale_p=0.2,
            blur_p=blur_p,
            blur_sigma=(0.1, 2.0),
            normalize=True,
        )
    ]


def asymmetric_views(
    size: int,
    crop_min_scale: float,
    blur_p: tuple[float, float] = (1.0, 0.1),
    solarize_p: tuple[float, float] = (0.0, 0.2),
    interpolation: Literal["bilinear", "bicubic"] = "bicubic",
) -> list[ViewSpec]:
    """BYOL's two differently distributed views (Grill et al. 2020, Table 6).

    Both: random resized crop (area ``crop_min_scale``–1, ratio 3/4–4/3), horizontal
    flip p 0.5, colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1)
    with p 0.8, grayscale p 0.2, then mean/std normalisation. View 1: blur p 1.0, no
    solarisation; view 2: blur p 0.1, solarisation p 0.2 (threshold 0.5). Blur kernel
    ≈ 10 % of the side, σ ∈ [0.1, 2]. MoCo v3 uses the same views ("BYOL's augmentation").
    """
    return [
        ViewSpec(
            count=1,
            size=size,
            scale=(crop_min_scale, 1.0),
            interpolation=interpolation,
            flip_p=0.5,
            jitter_p=0.8,
            brightness=0.4,
            contrast=0.4,
            saturation=0.2,
            hue=0.1,
            grayscale_p=0.2,
            blur_p=blur_p[i],
            blur_sigma=(0.1, 2.0),
            blur_kernel_frac=0.1,
            solarize_p=solarize_p[i],
            solarize_threshold=0.5,
            normalize=True,
        )
        for i in range(2)
    ]
