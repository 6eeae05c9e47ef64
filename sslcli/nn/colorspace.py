"""RGB → CIE Lab and RGB → YCbCr on image batches (CMC's views).

CMC splits an image into luminance and chrominance views: RGB is converted to Lab and
split into L and ab (Tian et al. 2019, Sec. 4); YCbCr (Y | CbCr) is a variant from its
study of colour spaces. The official code converts
with scikit-image on the data-loading side; these functions do the same arithmetic on
float tensors ``[B, 3, H, W]`` in ``[0, 1]`` (sRGB), on any device, so views can be
converted after the batched augmentation. Inputs must therefore come un-normalised:
``ViewSpec(normalize=False)``.

Normalisation constants: the official code maps each Lab channel's range over the sRGB
gamut to ``[-1, 1]`` (mean = the range's midpoint, std = half its width) with L ∈ [0, 100],
a ∈ [−86.183, 98.233], b ∈ [−107.857, 94.478]. These extremes are reached at corners of the
RGB cube (a: green / magenta, b: blue / yellow), which the tests check. YCbCr uses the same
rule on the ranges of ITU-R BT.601 "studio swing" (what scikit-image's ``rgb2ycbcr``
returns): Y ∈ [16, 235], Cb and Cr ∈ [16, 240].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# sRGB (D65) → CIE XYZ, the matrix scikit-image uses (IEC 61966-2-1 primaries).
RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
# Reference white of the D65 illuminant, 2° observer (scikit-image's default).
D65_WHITE = (0.95047, 1.0, 1.08883)
# BT.601 studio swing, 8-bit scale: Y = 16 + 65.481 R + 128.553 G + 24.966 B (R, G, B in [0, 1]).
RGB_TO_YCBCR = (
    (65.481, 128.553, 24.966),
    (-37.797, -74.203, 112.0),
    (112.0, -93.786, -18.214),
)
YCBCR_OFFSET = (16.0, 128.0, 128.0)

_LAB_RANGE = ((0.0, 100.0), (-86.183, 98.233), (-107.857, 94.478))
_YCBCR_RANGE = ((16.0, 235.0), (16.0, 240.0), (16.0, 240.0))
LAB_MEAN = tuple((lo + hi) / 2 for lo, hi in _LAB_RANGE)
LAB_STD = tuple((hi - lo) / 2 for lo, hi in _LAB_RANGE)
YCBCR_MEAN = tuple((lo + hi) / 2 for lo, hi in _YCBCR_RANGE)
YCBCR_STD = tuple((hi - lo) / 2 for lo, hi in _YCBCR_RANGE)


def _mix(x: Tensor, matrix: Sequence[Sequence[float]]) -> Tensor:
    """Per-pixel 3×3 colour matrix (element-wise, so autocast never lowers its precision)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    return torch.stack([m[0] * r + m[1] * g + m[2] * b for m in matrix], dim=1)


def _per_channel(x: Tensor, fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    """``fn(channel, i)`` on each channel of ``[B, C, H, W]``, restacked.

    The constants enter as Python numbers (kernel arguments): a ``torch.tensor`` of them
    on the device would be a host-to-device copy, and a host sync, at every call.
    """
    return torch.stack([fn(x[:, i], i) for i in range(x.shape[1])], dim=1)


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB in [0, 1] → CIE Lab (L in [0, 100]), D65 white, as ``skimage.color.rgb2lab``.

    sRGB decoding ``c ≤ 0.04045 ? c/12.92 : ((c+0.055)/1.055)^2.4``, the XYZ matrix, the
    white point, then ``f(t) = t^(1/3)`` above ``0.008856`` and ``7.787·t + 16/116`` below;
    ``L = 116·f(Y) − 16``, ``a = 500·(f(X) − f(Y))``, ``b = 200·(f(Y) − f(Z))``.
    """
    x = x.float().clamp(0, 1)
    linear = torch.where(x > 0.04045, ((x + 0.055) / 1.055).pow(2.4), x / 12.92)
    xyz = _mix(linear, RGB_TO_XYZ)
    t = _per_channel(xyz, lambda c, i: c / D65_WHITE[i])
    f = torch.where(t > 0.008856, t.clamp(min=1e-12).pow(1 / 3), 7.787 * t + 16 / 116)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def rgb_to_ycbcr(x: Tensor) -> Tensor:
    """sRGB in [0, 1] → YCbCr, BT.601 studio swing (Y in [16, 235]), as scikit-image."""
    x = x.float().clamp(0, 1)
    return _per_channel(_mix(x, RGB_TO_YCBCR), lambda c, i: c + YCBCR_OFFSET[i])


def normalize_channels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x − mean) / std`` per channel; ``mean``/``std`` as long as ``x.shape[1]``."""
    return _per_channel(x, lambda c, i: (c - mean[i]) / std[i])


def luma_chroma_views(x: Tensor, space: str = "lab") -> tuple[Tensor, Tensor]:
    """CMC's two views of un-normalised RGB ``x``: (L or Y [B,1,H,W], ab or CbCr [B,2,H,W]).

    Converted, then normalised with the constants above (each channel's range → [−1, 1]).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        if space == "lab":
            y, mean, std = rgb_to_lab(x), LAB_MEAN, LAB_STD
        elif space == "ycbcr":
            y, mean, std = rgb_to_ycbcr(x), YCBCR_MEAN, YCBCR_STD
        else:
            raise ValueError(f"unknown colour space {space!r} (expected 'lab' or 'ycbcr')")
        y = normalize_channels(y, mean, std)
    return y[:, :1], y[:, 1:]
