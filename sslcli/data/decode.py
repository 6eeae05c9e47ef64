"""Decoding images to square uint8 tensors, the one shape every dataset yields.

Two paths produce the same geometry — shorter side resized to ``size`` (bilinear,
antialiased when shrinking), then the centre ``size x size`` crop:

* :func:`decode_image_file` for image files (PIL), run inside DataLoader workers;
* :func:`to_square` for uint8 tensors already in memory (CIFAR, STL-10, IDX, digits) and
  for images decoded on the GPU from :meth:`FileImageDataset.read_bytes`.

This is the geometry of evaluation and of in-memory arrays. Training views of image files
are cut from the original image instead (:mod:`sslcli.data.crops`); the colour and other
augmentations run later, on the device, in batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

# Extensions PIL decodes out of the box; matched case-insensitively. Anything else in a
# folder (.txt, .json, .DS_Store, thumbnails databases) is ignored rather than "corrupt".
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
JPEG_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg"})


def is_image_file(name: str) -> bool:
    """True for a visible file name with one of :data:`IMAGE_EXTENSIONS`."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _resized_dims(h: int, w: int, size: int) -> tuple[int, int]:
    # Same rounding as torchvision's "resize shorter side" (truncate the long side), so the
    # PIL path and the tensor path agree on the pre-crop geometry.
    if h <= w:
        return size, max(size, int(size * w / h))
    return max(size, int(size * h / w)), size


def _crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear, antialiased resize of uint8 ``[..., C, H, W]``.

    Plain torch rather than torchvision: importing torchvision costs ~2 s (it loads every
    model definition), paid by each CLI call and each spawned worker.
    """
    lead = img.shape[:-3]
    x = img.reshape(-1, *img.shape[-3:])
    # antialias=True matters only when shrinking (a 500 px photo to 64 px would alias
    # badly otherwise); for upsampling it equals plain bilinear.
    if x.device.type == "cpu":  # native uint8 kernel, no float round trip
        out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    else:
        y = F.interpolate(
            x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )
        out = y.round_().clamp_(0, 255).to(torch.uint8)
    return out.reshape(*lead, *out.shape[-3:])


def to_square(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side of ``img`` (uint8 ``[..., C, H, W]``) to ``size`` and centre-crop.

    Works on single images and batches, on any device. Returns ``img`` itself when it
    already has the target shape, so callers can use it unconditionally.
    """
    h, w = img.shape[-2:]
    if h == size and w == size:
        return img
    nh, nw = _resized_dims(h, w, size)
    if (nh, nw) != (h, w):
        img = _resize(img, nh, nw)
    top, left = _crop_offsets(nh, nw, size)
    return img[..., top : top + size, left : left + size]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, with sensible handling of alpha and high bit depths."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # Palette images may carry transparency; going through RGBA avoids PIL's warning and
        # lets the alpha branch below treat them like any transparent image.
        img = img.convert("RGBA")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # PIL's convert() clips these to 0..255 instead of scaling, which would turn a
        # 16-bit scan into a white page; rescale by the value range instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and arr.max(initial=0) <= 1.0 else 65535.0
        if img.mode != "F" and arr.max(initial=0) <= 255:
            top = 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # 2-d uint8 -> mode L
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        # The colour under fully transparent pixels is arbitrary (often black or junk);
        # compositing over white shows the image as viewers do instead of exposing it.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_pil(img: Image.Image, size: int) -> torch.Tensor:
    """An opened PIL image -> uint8 ``[3, size, size]`` (see module docstring)."""
    # draft() lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while decoding, the
    # largest saving in the whole data path; it never goes below the requested size in
    # either dimension, so the shorter side stays >= size.
    img.draft("RGB", (size, size))
    # Phone photos store rotation as an EXIF tag; without this they train sideways.
    img = ImageOps.exif_transpose(img) or img
    return square_from_pil(_to_rgb(img), size)


def square_from_pil(img: Image.Image, size: int) -> torch.Tensor:
    """A decoded, upright RGB PIL image -> uint8 ``[3, size, size]``: shorter side resized
    to ``size``, centre crop (the evaluation transform's geometry)."""
    w, h = img.size
    nh, nw = _resized_dims(h, w, size)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = _crop_offsets(nh, nw, size)
    if (nh, nw) != (size, size):
        img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_image_file(path: str | Path, size: int) -> torch.Tensor:
    """Fully decode an image file to uint8 ``[3, size, size]``.

    Raises whatever PIL raises for a corrupt or truncated file (``OSError``,
    ``ValueError``, ``PIL.UnidentifiedImageError``...); callers decide what to do.
    """
    with Image.open(path) as img:
        img.load()  # forces the full decode, so truncation is detected here
        return decode_pil(img, size)


def probe_image(path: str | Path) -> str | None:
    """Cheap validity check reading only the header: None if it looks fine, else a reason.

    Catches zero-byte files, HTML pages saved as .jpg, unknown formats; a truncated body
    is only found by a full decode.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
        if w < 1 or h < 1:
            return "image has zero size"
    except Exception as e:  # any failure at all means "unreadable", whatever PIL raised
        return error_reason(e)
    return None


def error_reason(e: BaseException) -> str:
    """'ExceptionType: first line of its message', for one-line warnings and errors."""
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
