"""Training crops cut from the original image, in the DataLoader workers.

The official codes of the built-in methods draw every view's RandomResizedCrop box on the
full, original-aspect image and resample the crop from its pixels. Resizing every image
to a square first (what evaluation does) would hide the borders of non-square photos and
blow small crops up from a few dozen pixels. So for image files each view is made here:

1. the EXIF orientation and the image size are read from the header;
2. one box per view is drawn on that original-size image with torchvision's
   ``RandomResizedCrop.get_params`` algorithm (:func:`crop_box`);
3. the JPEG is decoded reduced by DCT scaling (``Image.draft``) only as far as every box
   keeps at least its view's resolution;
4. each box is resampled to its view size (``Image.resize(..., box=...)``, antialiased,
   the filter of the view's ``interpolation``).

What stays batched on the device (flip, jitter, grayscale, blur, solarize, normalise) is
done later by :class:`sslcli.data.augment.ViewPipeline`, which takes the :class:`Crops`
of a batch instead of uint8 squares.

Exact resume: the boxes of sample ``index`` in ``epoch`` come from a generator seeded with
``(seed, epoch, index)`` (:func:`crop_rng`), a pure function like the data order itself,
so they do not depend on which worker or process decodes the image, on how many there
are, or on where a run was interrupted. The device-side parameters still come from the
trainer's checkpointed augmentation generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

from sslcli.data.images import FileImageDataset
from sslcli.data.views import ViewSpec, expand

# Uniform numbers one box draw consumes: 10 areas, 10 log-ratios, the top and left offsets.
DRAWS_PER_BOX = 22
# Separates this random stream from any other seeded with the same (seed, epoch, index).
_STREAM_TAG = 0x63726F70  # "crop"
_EXIF_ORIENTATION = 0x0112
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

Box = tuple[int, int, int, int]  # (top, left, height, width), as torchvision's get_params


class Crops(NamedTuple):
    """The pre-cropped views of a batch (or of one image, without the batch dimension).

    ``views[k]``: uint8 ``[B, 3, s_k, s_k]`` for the k-th expanded view of the method's
    :class:`ViewSpec` list. ``full``: uint8 ``[B, 3, S, S]``, the image as the evaluation
    transform sees it (shorter side to ``S``, centre crop), for the online probe; None when
    nobody asked for it.
    """

    views: list[Tensor]
    full: Tensor | None = None


def crop_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of sample ``index``'s crop boxes in ``epoch`` (a pure function)."""
    key = [seed & 0xFFFFFFFFFFFFFFFF, epoch, index, _STREAM_TAG]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    u: Sequence[float],
) -> Box:
    """One RandomResizedCrop box on a ``height`` x ``width`` image from 22 uniforms ``u``.

    torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an area uniform in
    ``scale`` times the image area and an aspect ratio log-uniform in ``ratio``, rounded;
    the first box that fits is placed at a uniformly random integer position; when none
    fits, the central crop of the largest box the ratio range allows. ``u[0:10]`` are the
    areas, ``u[10:20]`` the log-ratios, ``u[20]``/``u[21]`` the top/left positions; the
    batched :func:`sslcli.data.geometric.sample_crop_boxes` uses the same layout.
    """
    area = float(height * width)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[k])
        aspect = math.exp(lo + (hi - lo) * u[10 + k])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            # torch.randint(0, m + 1) as floor(u * (m + 1)); min() guards u -> 1 rounding.
            top = min(int(u[20] * (height - h + 1)), height - h)
            left = min(int(u[21] * (width - w + 1)), width - w)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CropPlan:
    """What the workers cut from every image: one crop per expanded view.

    ``specs``: the method's view list (``count`` repeats are expanded here); ``seed``: the
    run's seed; ``full_size``: also return the evaluation square of this side (the online
    probe's input), or None.
    """

    specs: tuple[ViewSpec, ...]
    seed: int
    full_size: int | None = None

    @staticmethod
    def of(specs: Sequence[ViewSpec], seed: int, full_size: int | None = None) -> CropPlan:
        return CropPlan(tuple(expand(list(specs))), seed, full_size)

    def boxes(self, epoch: int, index: int, height: int, width: int) -> list[Box]:
        """Every view's box for sample ``index`` of ``epoch`` on a ``height`` x ``width``
        image (orientation already applied)."""
        u = crop_rng(self.seed, epoch, index).random((len(self.specs), DRAWS_PER_BOX))
        return [
            crop_box(height, width, s.scale, s.ratio, row)
            for s, row in zip(self.specs, u.tolist(), strict=True)
        ]


# --------------------------------------------------------------------------------------------
# Worker side (PIL)
# --------------------------------------------------------------------------------------------


def _oriented_size(img: Image.Image) -> tuple[int, int, int]:
    """(width, height, orientation) as the image is shown after ``exif_transpose``."""
    try:
        orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        orientation = 1
    w, h = img.size
    return (h, w, orientation) if orientation in (5, 6, 7, 8) else (w, h, orientation)


def _reduction(boxes: list[Box], specs: Sequence[ViewSpec], extra: float) -> float:
    """How far the decode may shrink the image: every box keeps >= its view's side."""
    r = extra
    for (_, _, h, w), spec in zip(boxes, specs, strict=True):
        r = min(r, min(h, w) / spec.size)
    return r


def crop_views_pil(img: Image.Image, plan: CropPlan, epoch: int, index: int) -> Crops:
    """The views of one opened (not yet loaded) image: :class:`Crops` without batch dim."""
    from sslcli.data.decode import _to_rgb, square_from_pil

    ow, oh, orientation = _oriented_size(img)
    boxes = plan.boxes(epoch, index, oh, ow)
    extra = min(ow, oh) / plan.full_size if plan.full_size else math.inf
    r = _reduction(boxes, plan.specs, extra)
    f = 1.0  # how much the decode shrinks the image
    if r >= 2:
        # draft() picks the largest DCT scale (1/2, 1/4, 1/8) whose result is at least the
        # requested size in both dimensions: boxes scaled by it keep >= the view's side.
        # (JPEG and MPO only; other formats return None.)
        rw, rh = math.ceil(ow / r), math.ceil(oh / r)
        raw_w = img.size[0]
        drafted = img.draft("RGB", (rh, rw) if orientation in (5, 6, 7, 8) else (rw, rh))
        if drafted is not None:
            f = raw_w / drafted[1][2]  # its box is the original extent in decoded pixels
    img.load()  # full decode now, so truncation is detected here, as in decode_image_file
    if orientation != 1:
        img = ImageOps.exif_transpose(img) or img
    img = _to_rgb(img)
    dw, dh = img.size
    views = []
    for (top, left, h, w), spec in zip(boxes, plan.specs, strict=True):
        box = (left / f, top / f, min(dw, (left + w) / f), min(dh, (top + h) / f))
        v = img.resize((spec.size, spec.size), _RESAMPLE[spec.interpolation], box=box)
        views.append(_chw(v))
    full = square_from_pil(img, plan.full_size) if plan.full_size else None
    return Crops(views, full)


def _chw(img: Image.Image) -> Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class CropDataset(Dataset[tuple[Crops, int, int]]):
    """``ds[i] -> (Crops, label, index)`` for a file dataset, for one epoch's training.

    Unreadable files follow the base dataset's rules (warning, shared bad-file mask,
    ``max_bad_fraction``, substitute = the next readable image, whose index is returned).
    The boxes are those of the requested index ``i``, so they do not depend on which
    files turned out bad.
    """

    def __init__(self, base: object, plan: CropPlan, epoch: int) -> None:
        if not isinstance(base, FileImageDataset):
            raise TypeError(f"CropDataset needs a FileImageDataset, got {type(base).__name__}")
        self.base = base
        self.plan = plan
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Crops, int, int]:
        base = self.base
        i = base.check_index(i)
        return base.read(i, lambda img: crop_views_pil(img, self.plan, self.epoch, i))


def collate_crops(samples: Sequence[tuple[Crops, int, int]]) -> tuple[Crops, Tensor, Tensor]:
    """DataLoader ``collate_fn`` for :class:`CropDataset`."""
    first = samples[0][0]
    views = [torch.stack([s[0].views[k] for s in samples]) for k in range(len(first.views))]
    full = None
    if first.full is not None:
        full = torch.stack([s[0].full for s in samples])  # type: ignore[misc]
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    index = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return Crops(views, full), labels, index


# --------------------------------------------------------------------------------------------
# Device side (images decoded on the GPU)
# --------------------------------------------------------------------------------------------


def resized_crop_tensor(img: Tensor, box: Box, size: int, interpolation: str) -> Tensor:
    """uint8 ``[C, H, W]`` -> uint8 ``[C, size, size]``: the box resized with an antialiased
    filter (torchvision's ``resized_crop(..., antialias=True)`` on a tensor), on any device."""
    top, left, h, w = box
    x = img[None, :, top : top + h, left : left + w]
    if x.device.type == "cpu" and interpolation == "bilinear":  # native uint8 kernel
        out = F.interpolate(x, (size, size), mode="bilinear", align_corners=False, antialias=True)
        return out[0]
    y = F.interpolate(
        x.float(), (size, size), mode=interpolation, align_corners=False, antialias=True
    )
    return y.round_().clamp_(0, 255).to(torch.uint8)[0]


__all__ = [
    "CropDataset",
    "CropPlan",
    "Crops",
    "collate_crops",
    "crop_box",
    "crop_rng",
    "crop_views_pil",
    "resized_crop_tensor",
]
