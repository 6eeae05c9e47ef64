"""View specifications: what crops a method asks the data pipeline for, and the presets.

A method's ``views()`` returns a list of :class:`ViewSpec`. They are data, not code: the
batched augmentation pipeline (:mod:`sslcli.data.augment`) turns a uint8 batch into one
float tensor per view, drawing independent random parameters for every sample.

The presets below are the published augmentations by name, each built on the one it
varies (``ViewSpec.replace``), so a difference between two methods reads as one line:

- :func:`crop_views`: random resized crop and flip, no colour (CMC; CPC's square crop);
- :func:`instdisc_views` (InstDisc) → :func:`moco_v1_views` (two views, optional blur)
  and :func:`invaspread_views` (two views, jitter before grayscale);
- :func:`simclr_views` (colour distortion of strength s, blur) → :func:`moco_v2_views`
  (s = 0.5, bilinear, normalised) → :func:`asymmetric_views` (BYOL's pair: saturation
  0.2, blur 1.0 / 0.1, solarise 0 / 0.2; also MoCo v3's) → :func:`dino_views`;
- :func:`multi_crop_views` (global views plus low-resolution local crops, one blur kernel
  in pixels) under :func:`swav_views` (SimCLR's colour at s = 1) and :func:`dino_views`
  (BYOL's pair as the global crops).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SwAV's official normalisation: ImageNet's with std 0.228 (not 0.229) in the red channel.
SWAV_MEAN = (0.485, 0.456, 0.406)
SWAV_STD = (0.228, 0.224, 0.225)
LOCAL_TO_GLOBAL = 96 / 224
"""Side of a local crop relative to a global one in SwAV and DINO (96 vs 224 pixels)."""

Interpolation = Literal["bilinear", "bicubic"]
Range = tuple[float, float]


class ViewSpec(BaseModel):
    """One kind of augmented view (``count`` crops of it per image)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(1, ge=1, description="How many crops of this kind per image.")
    size: int = Field(224, ge=1, description="Output side in pixels.")
    scale: tuple[float, float] = Field(
        (0.08, 1.0), description="RandomResizedCrop area range, fraction of the image."
    )
    ratio: tuple[float, float] = Field((3 / 4, 4 / 3), description="Crop aspect-ratio range.")
    interpolation: Interpolation = "bilinear"
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

    def replace(self, **changes: Any) -> ViewSpec:
        """A copy with ``changes`` applied, validated like a new spec."""
        return ViewSpec.model_validate({**self.model_dump(), **changes})

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


# -- crop geometry of multi-crop ---------------------------------------------------------------


def local_crop_size(image_size: int, patch: int = 1) -> int:
    """Local-crop side for global crops of ``image_size``: 96/224 of it, as on ImageNet.

    Rounded to the nearest multiple of ``patch`` (a ViT's patch embedding needs whole
    patches; 224 px with 16 px patches gives exactly 96 = 6 patches) and never below one
    patch. Examples: 224 → 96; 32 → 14 for convnets and 12 for a ViT with 4 px patches;
    96 (STL-10) → 41 / 40 with 8 px patches.
    """
    patch = max(1, patch)
    side = round(image_size * LOCAL_TO_GLOBAL / patch) * patch
    return max(patch, side)


def multicrop_blur_frac(crop_size: int, image_size: int) -> float:
    """Blur-kernel side, as a fraction of ``crop_size``, giving every crop the kernel of the
    global crops in pixels: 23 px at 224 (SwAV's ``cv2.GaussianBlur(img, (23, 23), σ)`` on
    every crop; DINO's PIL blur is not truncated at all, and 23 px covers ±3σ for σ ≤ 2 at
    every crop size), scaled with the global image size; at most the whole crop."""
    return min(1.0, (23 / 224) * image_size / crop_size)


# -- presets --------------------------------------------------------------------------------


def crop_views(
    size: int,
    scale: Range = (0.08, 1.0),
    *,
    count: int = 1,
    ratio: Range = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    interpolation: Interpolation = "bilinear",
    normalize: bool = True,
) -> list[ViewSpec]:
    """Random resized crop (area ``scale``, aspect ``ratio``) and horizontal flip, with
    no colour jitter and no grayscale: the geometry every other preset starts from. CMC
    uses it as is (its colour-space split needs the raw colours), CPC with one fixed
    square crop and no flip."""
    spec = ViewSpec(
        count=count,
        size=size,
        scale=scale,
        ratio=ratio,
        interpolation=interpolation,
        flip_p=flip_p,
        jitter_p=0.0,
        grayscale_p=0.0,
        normalize=normalize,
    )
    return [spec]


def instdisc_views(
    size: int,
    crop_min_scale: float = 0.2,
    *,
    count: int = 1,
    flip_p: float = 0.5,
    grayscale_first: bool = True,
    blur_p: float = 0.0,
) -> list[ViewSpec]:
    """InstDisc's augmentation (lemniscate ``main.py``): RandomResizedCrop(crop_min_scale–1)
    → RandomGrayscale(0.2) → ColorJitter(0.4, 0.4, 0.4, 0.4) always → flip, normalised.
    ``grayscale_first=False`` jitters first (its CIFAR script)."""
    (crop,) = crop_views(size, (crop_min_scale, 1.0), count=count, flip_p=flip_p)
    spec = crop.replace(
        jitter_p=1.0,
        brightness=0.4,
        contrast=0.4,
        saturation=0.4,
        hue=0.4,
        grayscale_p=0.2,
        grayscale_first=grayscale_first,
        blur_p=blur_p,
    )
    return [spec]


def moco_v1_views(size: int, crop_min_scale: float = 0.2, blur_p: float = 0.0) -> list[ViewSpec]:
    """MoCo v1's augmentation: InstDisc's (grayscale before a full-strength jitter) on two
    views, with an optional Gaussian blur (σ 0.1–2, ``blur_p``; 0 in the paper)."""
    return instdisc_views(size, crop_min_scale, count=2, blur_p=blur_p)


def invaspread_views(size: int, crop_min_scale: float = 0.2) -> list[ViewSpec]:
    """InvaSpread's augmentation (``demo_seen.py``): two views of RandomResizedCrop(0.2–1)
    → ColorJitter(0.4, 0.4, 0.4, 0.4) always → RandomGrayscale(0.2) → flip: InstDisc's
    with the jitter before the grayscale."""
    return instdisc_views(size, crop_min_scale, count=2, grayscale_first=False)


def simclr_views(
    size: int,
    crop_min_scale: float = 0.08,
    color_strength: float = 1.0,
    blur_p: float = 0.5,
    *,
    count: int = 2,
    interpolation: Interpolation = "bicubic",
    normalize: bool = False,
) -> list[ViewSpec]:
    """SimCLR's augmentation (Chen et al. 2020, appendix A): RandomResizedCrop
    (crop_min_scale–1, bicubic) → flip → colour distortion of strength s =
    ``color_strength`` (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p 0.8, grayscale p 0.2)
    → Gaussian blur (σ 0.1–2, kernel 10 % of the side) with ``blur_p``; no mean/std
    normalisation, as in the official code."""
    s = color_strength
    (crop,) = crop_views(
        size,
        (crop_min_scale, 1.0),
        count=count,
        interpolation=interpolation,
        normalize=normalize,
    )
    spec = crop.replace(
        jitter_p=0.8,
        brightness=0.8 * s,
        contrast=0.8 * s,
        saturation=0.8 * s,
        hue=min(0.5, 0.2 * s),
        grayscale_p=0.2,
        blur_p=blur_p,
    )
    return [spec]


def moco_v2_views(size: int, crop_min_scale: float, blur_p: float) -> list[ViewSpec]:
    """MoCo v2's augmentation (also SimSiam's, which reuses it unchanged): two views of
    RandomResizedCrop(crop_min_scale–1) → ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8 →
    Grayscale p 0.2 → GaussianBlur(σ 0.1–2) with ``blur_p`` → flip, then normalise:
    SimCLR's at strength 0.5, bilinear and normalised."""
    return simclr_views(size, crop_min_scale, 0.5, blur_p, interpolation="bilinear", normalize=True)


def asymmetric_views(
    size: int,
    crop_min_scale: float,
    blur_p: tuple[float, float] = (1.0, 0.1),
    solarize_p: tuple[float, float] = (0.0, 0.2),
    interpolation: Interpolation = "bicubic",
    *,
    scale: Range | None = None,
    blur_kernel_frac: float = 0.1,
) -> list[ViewSpec]:
    """BYOL's two differently distributed views (Grill et al. 2020, Table 6).

    Both: random resized crop (area ``crop_min_scale``–1, or ``scale``; ratio 3/4–4/3),
    horizontal flip p 0.5, colour jitter (brightness 0.4, contrast 0.4, saturation 0.2,
    hue 0.1) with p 0.8, grayscale p 0.2, then mean/std normalisation. View 1: blur p 1.0,
    no solarisation; view 2: blur p 0.1, solarisation p 0.2 (threshold 0.5). Blur kernel
    ≈ 10 % of the side (``blur_kernel_frac``), σ ∈ [0.1, 2]. MoCo v2's colour with
    saturation 0.2; MoCo v3 uses the same views ("BYOL's augmentation").
    """
    (base,) = moco_v2_views(size, crop_min_scale, 0.0)
    base = base.replace(
        count=1,
        scale=scale or base.scale,
        interpolation=interpolation,
        saturation=0.2,
        blur_kernel_frac=blur_kernel_frac,
    )
    return [base.replace(blur_p=blur_p[i], solarize_p=solarize_p[i]) for i in range(2)]


def multi_crop_views(
    global_views: list[ViewSpec],
    local_view: ViewSpec,
    *,
    local_count: int,
    local_size: int,
    local_scale: Range,
) -> list[ViewSpec]:
    """Multi-crop (Caron et al. 2020): the ``global_views`` at full resolution, then
    ``local_count`` low-resolution crops (``local_size``, area ``local_scale``) otherwise
    like ``local_view``. Every crop gets the global crops' blur kernel in pixels
    (:func:`multicrop_blur_frac`). No local crops when ``local_count`` is 0."""
    size = global_views[0].size
    specs = [v.replace(blur_kernel_frac=multicrop_blur_frac(v.size, size)) for v in global_views]
    if local_count:
        local = local_view.replace(
            count=local_count,
            size=local_size,
            scale=local_scale,
            blur_kernel_frac=multicrop_blur_frac(local_size, size),
        )
        specs.append(local)
    return specs


def swav_views(
    size: int,
    local_size: int,
    *,
    global_count: int = 2,
    global_scale: Range = (0.14, 1.0),
    local_count: int = 6,
    local_scale: Range = (0.05, 0.14),
    blur_p: float = 0.5,
) -> list[ViewSpec]:
    """SwAV's multi-crop (official ``main_swav.py``): SimCLR's colour distortion at
    strength 1 (ColorJitter(0.8, 0.8, 0.8, 0.2) p 0.8, grayscale p 0.2), Gaussian blur
    with ``blur_p`` on every crop, bilinear crops, flip, normalised with the official
    mean/std (:data:`SWAV_MEAN`, :data:`SWAV_STD`)."""
    (colour,) = simclr_views(
        size, color_strength=1.0, blur_p=blur_p, interpolation="bilinear", normalize=True
    )
    crop = colour.replace(count=global_count, scale=global_scale, mean=SWAV_MEAN, std=SWAV_STD)
    return multi_crop_views(
        [crop], crop, local_count=local_count, local_size=local_size, local_scale=local_scale
    )


def dino_views(
    size: int,
    local_size: int,
    *,
    global_scale: Range = (0.4, 1.0),
    local_count: int = 8,
    local_scale: Range = (0.05, 0.4),
) -> list[ViewSpec]:
    """DINO's multi-crop (official ``DataAugmentationDINO``): BYOL's asymmetric pair as
    the two global crops (bicubic; blur 1.0 / 0.1, solarise 0 / 0.2) and ``local_count``
    local crops with the same colour distortion and blur p 0.5."""
    pair = asymmetric_views(size, global_scale[0], scale=global_scale)
    local = pair[0].replace(blur_p=0.5)
    return multi_crop_views(
        pair, local, local_count=local_count, local_size=local_size, local_scale=local_scale
    )
