"""Geometry of the batched views: per-sample random resized crop and horizontal flip.

Each op reproduces torchvision's single-image function (``RandomResizedCrop``'s box
draw, ``resized_crop(..., antialias=True)``, ``hflip``) on a whole batch, with one set of
parameters per sample (see :mod:`sslcli.data.augment` for the rules the code keeps).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sslcli.data.sampling import per_sample, uniform01
from sslcli.data.views import Interpolation


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Int64 [n, 4] boxes ``(top, left, height, width)``, one RandomResizedCrop draw per sample.

    The algorithm of torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an area
    uniform in ``scale`` times the image area and an aspect ratio log-uniform in ``ratio``; the
    first try whose rounded box fits is kept, at a uniformly random integer position; when
    none fits, the central crop of the largest box the ratio range allows. All 10 tries are
    drawn for every sample (a sample only *uses* the first that fits), which keeps the draw
    a fixed-size tensor op without data-dependent control flow.
    """
    u = uniform01((n, 22), generator, device).double()
    # float64 for the box arithmetic: torchvision rounds Python floats, and float32 would
    # move some rounding boundaries on large images.
    area = float(height * width)
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :10])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, 10:20])
    # torch.round rounds half to even, exactly like Python's round().
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first max
    found = fits.any(dim=1)

    # Central fallback, the same for every sample: plain Python on the static image size.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w.gather(1, first).squeeze(1), float(fw))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(fh))

    # torch.randint(0, m + 1) per sample, vectorised as floor(u * (m + 1)); the clamp only
    # guards the u → 1 rounding edge.
    top = torch.minimum(torch.floor(u[:, 20] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(u[:, 21] * (width - w + 1)), width - w)
    top = torch.where(found, top, float((height - fh) // 2))
    left = torch.where(found, left, float((width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).long()


def _filter(x: Tensor, interpolation: Interpolation) -> Tensor:
    """The resampling kernels of torch's ``interpolate(antialias=True)``."""
    ax = x.abs()
    if interpolation == "bilinear":
        return (1.0 - ax).clamp_(min=0.0)
    # Keys' cubic convolution with a = -0.5, what PIL and torch's antialiased bicubic use
    # (plain bicubic without antialias uses -0.75).
    a = -0.5
    near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
    far = ((a * ax - 5.0 * a) * ax + 8.0 * a) * ax - 4.0 * a
    return torch.where(ax < 1.0, near, torch.where(ax < 2.0, far, torch.zeros_like(ax)))


def taps_per_output(in_size: int, out_size: int, interpolation: Interpolation) -> int:
    """How many input pixels one output pixel can read along an axis, for segments of at
    most ``in_size`` pixels resized to ``out_size``: the kernel support (2 or 4 pixels,
    stretched by the shrink factor when shrinking)."""
    support = (1.0 if interpolation == "bilinear" else 2.0) * max(in_size / out_size, 1.0)
    return max(1, min(in_size, math.ceil(2.0 * support)))


def resample_taps(
    start: Tensor,
    length: Tensor,
    in_size: int,
    out_size: int,
    interpolation: Interpolation = "bilinear",
) -> tuple[Tensor, Tensor]:
    """Per-sample resampling of one axis: ``(index, weight)``, int64 and float32 [n, out, K].

    Output pixel ``i`` of sample ``b`` is ``sum_k weight[b, i, k] * line[index[b, i, k]]``
    when the segment ``[start[b], start[b] + length[b])`` of a line of ``in_size`` pixels is
    resized to ``out_size``. The weights are those of torch's antialiased interpolation,
    which torchvision's ``resize(..., antialias=True)`` runs: a triangle (bilinear) or Keys
    cubic (bicubic) kernel centred on ``scale * (i + 0.5)``, stretched by the scale factor
    when shrinking so that every input pixel is averaged in (no aliasing from big crops),
    normalised to sum 1; when enlarging, plain bilinear/bicubic interpolation. Exact
    weights keep crops comparable with torchvision's to float rounding, where supersampling
    (e.g. ``roi_align``) would only approximate the anti-aliasing filter.

    The K taps of an output pixel are K consecutive pixels; taps beyond its window have
    weight 0 and their index wraps around the line, so the K indices of one output pixel
    are always distinct (``resampling_matrix`` relies on it).
    """
    k_max = taps_per_output(in_size, out_size, interpolation)
    base = 1.0 if interpolation == "bilinear" else 2.0
    dev = start.device
    seg = length.to(torch.float32)[:, None]  # [n, 1]
    scale = seg / out_size
    stretch = scale.clamp(min=1.0)  # > 1 only when shrinking
    support = base * stretch
    center = scale * (torch.arange(out_size, device=dev, dtype=torch.float32) + 0.5)  # [n, out]
    # torch truncates toward zero (a C++ cast) and clips the window to the segment.
    first = (center - support + 0.5).trunc().clamp_(min=0.0)
    stop = torch.minimum((center + support + 0.5).trunc(), seg)
    j = first[..., None] + torch.arange(k_max, device=dev, dtype=torch.float32)  # [n, out, K]
    w = _filter((j - center[..., None] + 0.5) / stretch[..., None], interpolation)
    # Taps past the window (or past K at a float-rounding edge, where the kernel is ~0
    # anyway) get weight 0.
    w = torch.where(j < stop[..., None], w, torch.zeros_like(w))
    w = w / w.sum(dim=-1, keepdim=True)
    index = torch.remainder(start[:, None, None] + j.long(), in_size)
    return index, w


def resampling_matrix(index: Tensor, weight: Tensor, in_size: int) -> Tensor:
    """Dense [n, in_size, out] matrices from taps: ``line @ matrix[b]`` resamples a line."""
    n, out, _ = index.shape
    m = torch.zeros(n, in_size, out, device=weight.device, dtype=weight.dtype)
    # A plain scatter (no accumulation: the K indices of one output are distinct) is
    # deterministic on every device, unlike scatter_add's atomics on CUDA.
    return m.scatter_(1, index.transpose(1, 2), weight.transpose(1, 2))


def _gather_rows(rows: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """``out[b, c, i] = sum_k weight[b, i, k] * rows[b, c, index[b, i, k]]``.

    ``rows`` [B, C, N, L] (float), index/weight [B, M, K] → [B, C, M, L]. One
    ``index_select`` of whole rows per tap: a memory copy, fast everywhere.
    """
    b, c, n, length = rows.shape
    m = index.shape[1]
    flat = rows.reshape(b * c * n, length)
    base = (torch.arange(b * c, device=rows.device) * n).view(b, c, 1)
    out: Tensor | None = None
    for k in range(index.shape[2]):
        g = flat.index_select(0, (base + index[:, None, :, k]).reshape(-1)).view(b, c, m, length)
        wk = weight[:, None, :, k, None]
        out = g.mul_(wk) if out is None else out.addcmul_(g, wk)
    assert out is not None
    return out


def crop_taps(
    boxes: Tensor,
    in_hw: tuple[int, int],
    size: tuple[int, int],
    interpolation: Interpolation,
    flip: Tensor | None,
) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Row taps and the dense column matrices [B, W, w] of per-sample crops."""
    iy, wy = resample_taps(boxes[:, 0], boxes[:, 2], in_hw[0], size[0], interpolation)
    ix, wx = resample_taps(boxes[:, 1], boxes[:, 3], in_hw[1], size[1], interpolation)
    if flip is not None:
        # A horizontal flip of the output is the column taps read right to left: free.
        m = flip[:, None, None]
        ix, wx = torch.where(m, ix.flip(1), ix), torch.where(m, wx.flip(1), wx)
    return (iy, wy), resampling_matrix(ix, wx, in_hw[1])


def resample(images: Tensor, rows: tuple[Tensor, Tensor], cols: Tensor) -> Tensor:
    """Separable per-sample resampling of float [B, C, H, W] → [B, C, h, w].

    Rows by gathering K whole input rows per output row (cost ∝ taps, whatever the source
    height); columns by one batched matrix product with a dense [W, w] matrix per sample.
    The dense product does W/K times the arithmetic a gather would, but it reads the data
    in place and writes NCHW directly, where a column gather needs two transposes of the
    batch, the slowest passes of all on a CPU; on a GPU it is one batched GEMM. The price:
    on a CPU the cost grows with the source width, so big sources are slow there.
    """
    b, c, _, w_in = images.shape
    y = _gather_rows(images, *rows)  # [B, C, h, W]
    h = y.shape[2]
    return torch.bmm(y.view(b, c * h, w_in), cols).view(b, c, h, -1)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def to_float(images: Tensor) -> Tensor:
    """uint8 → float32 in [0, 1]; float images are taken as already in [0, 1]."""
    # NCHW-contiguous whatever the input's memory format: the row gather reshapes it.
    x = images.to(torch.float32, memory_format=torch.contiguous_format)
    # Only read afterwards, so a float input may be returned as is.
    return x.mul_(1.0 / 255.0) if images.dtype == torch.uint8 else x


def resized_crop(
    images: Tensor,
    boxes: Tensor,
    size: int | tuple[int, int],
    interpolation: Interpolation = "bilinear",
    flip: Tensor | None = None,
) -> Tensor:
    """Crop ``boxes`` [B, 4] = (top, left, height, width) out of each image and resize it.

    ``images``: uint8 (scaled to [0, 1]) or float [B, C, H, W]. Returns float32 [B, C, h, w]:
    sample b equals torchvision's ``resized_crop(images[b], *boxes[b], size, interpolation,
    antialias=True)`` to float rounding, mirrored where ``flip[b]`` (bool [B]) is set.
    Bicubic can overshoot [0, 1] slightly, as torchvision's float path does; the pipeline
    clamps.
    """
    h, w = images.shape[-2:]
    rows, cols = crop_taps(boxes, (h, w), _size2(size), interpolation, flip)
    return resample(to_float(images), rows, cols)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the samples where ``mask`` (bool [B]) is set."""
    return torch.where(per_sample(mask), x.flip(-1), x)
