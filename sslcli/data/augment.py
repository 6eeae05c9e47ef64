"""Batched augmentation on the training device, with independent random parameters per sample.

Self-supervised methods learn from the *difference* between two views of one image, so every
image in a batch needs its own crop box, flip, jitter factors, blur sigma... torchvision's
batch transforms draw one set of parameters per call, which would give every image in the
batch the same crop: useless for SSL. The per-image alternative (a DataLoader worker per
core, PIL or tensor ops one image at a time) costs several milliseconds per view. Here the
same operations run on a whole uint8 batch at once, on the CPU or on a GPU, with the
parameters drawn per sample as tensors.

Two layers:

* **ops** take the batch and per-sample parameter tensors (``resized_crop``,
  ``adjust_brightness``, ``adjust_hue``, ``gaussian_blur``, ``solarize`` ...). Each one
  reproduces the matching single-image function of ``torchvision.transforms.v2.functional``
  on float images in [0, 1] (the tests check this sample by sample), so recipes written for
  torchvision mean the same thing here.
* **samplers** draw those parameters with the distributions of torchvision's random
  transforms (``RandomResizedCrop``, ``ColorJitter``, ``GaussianBlur``, ...), but one set
  per sample, from an explicit ``torch.Generator``.

:class:`ViewPipeline` strings them together for a list of :class:`ViewSpec`.

Rules the code keeps, and why:

* No Python loop over samples and no host synchronisation (``.item()``, ``.tolist()``,
  boolean-mask indexing) in the hot path: on a GPU either would stall the launch queue
  every step. Optional ops are applied to the whole batch with an identity parameter for
  the samples that skip them (factor 1, an impulse kernel, an unreachable threshold).
* Every random number comes from the ``generator`` argument, drawn on the generator's own
  device (the global RNG of the images' device when it is ``None``). The trainer keeps one
  generator per process and saves its state in checkpoints, so resumed runs see the very
  same views. CPU and CUDA use the same formulas, hence the same distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torch.nn import functional as F

from sslcli.data.crops import Crops
from sslcli.data.views import ViewSpec, expand

Interpolation = Literal["bilinear", "bicubic"]

# ITU-R 601-2 luma weights, the ones torchvision's rgb_to_grayscale uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Default bound on the float32 bytes of one view slice rendered at a time on the CPU (see
# ViewPipeline). Measured on a 2-core EPYC at 64 px: 4 MiB slices take half the CPU time of
# whole-batch tensors; much smaller ones lose to per-op dispatch overhead.
CPU_CHUNK_BYTES = 4 << 20
# Column order of the colour-jitter factors (and the op ids in ``order``), as in
# torchvision's ColorJitter (its ``fn_idx``): 0 brightness, 1 contrast, 2 saturation, 3 hue.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _per_sample(v: Tensor) -> Tensor:
    """[B] → [B, 1, 1, 1], to broadcast a per-sample parameter over an image batch."""
    return v.reshape(-1, 1, 1, 1)


# ============================================================================================
# Parameter samplers
# ============================================================================================


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | None
) -> Tensor:
    """U[0, 1) float32 numbers from ``generator`` (or the global RNG), returned on ``device``.

    A generator can only fill tensors on its own device, so the numbers are drawn there and
    moved: a CUDA generator with CUDA images (the trainer's case) costs no copy at all.
    """
    if generator is not None:
        u = torch.rand(shape, generator=generator, device=generator.device)
        return u if device is None else u.to(device, non_blocking=True)
    return torch.rand(shape, device=device)


def sample_mask(
    n: int,
    p: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Bool [n]: which samples an op with probability ``p`` applies to (torchvision's
    ``torch.rand(1) < p`` per sample)."""
    return _uniform((n,), generator, device) < p


def sample_uniform(
    n: int,
    low: float,
    high: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Float32 [n] from U[low, high), torchvision's ``torch.empty(1).uniform_(low, high)``."""
    return low + (high - low) * _uniform((n,), generator, device)


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
    u = _uniform((n, 22), generator, device).double()
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


def _jitter_range(strength: float, center: float, lower: float) -> tuple[float, float]:
    return max(lower, center - strength), center + strength


def sample_jitter(
    n: int,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    hue: float = 0.0,
    p: float = 1.0,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-sample ColorJitter parameters: ``(factors [n, 4] float32, order [n, 4] int64)``.

    ``factors[:, k]`` is the factor of op ``JITTER_OPS[k]``, drawn as torchvision's
    ColorJitter draws it: brightness, contrast, saturation uniform in
    ``[max(0, 1 - s), 1 + s]``, hue uniform in ``[-h, h]``. ``order[b]`` is a uniformly random
    permutation of the four op ids, the per-sample counterpart of ColorJitter's ``fn_idx =
    torch.randperm(4)``. Samples outside the probability-``p`` draw (RandomApply), and ops
    of strength 0 (which ColorJitter skips), get identity factors: 1, 1, 1 and hue 0.
    """
    u = _uniform((n, 9), generator, device)
    applied = u[:, 0] < p
    columns = []
    for k, strength in enumerate((brightness, contrast, saturation, hue)):
        if strength == 0:
            columns.append(torch.full_like(u[:, 0], 0.0 if k == 3 else 1.0))
            continue
        lo, hi = (-strength, strength) if k == 3 else _jitter_range(strength, 1.0, 0.0)
        f = lo + (hi - lo) * u[:, 1 + k]
        columns.append(torch.where(applied, f, 0.0 if k == 3 else 1.0))
    factors = torch.stack(columns, dim=1)
    # argsort of i.i.d. uniform keys is a uniformly random permutation (ties have
    # probability ~0 and would only bias the order of two ops, not the factors).
    order = torch.argsort(u[:, 5:9], dim=1)
    return factors, order


def blur_kernel_size(size: int, frac: float) -> int:
    """Odd kernel side closest to ``frac * size``, at least 3 (SimCLR: 10 % of the view, e.g.
    23 for 224 px), and small enough for reflect padding (side ≤ 2·size − 1)."""
    k = int(round(frac * size))
    k = max(3, k if k % 2 == 1 else k + 1)
    return min(k, max(1, 2 * size - 1))


# ============================================================================================
# Geometry: per-sample resized crop (+ horizontal flip)
# ============================================================================================


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


def _crop_taps(
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


def _resample(images: Tensor, rows: tuple[Tensor, Tensor], cols: Tensor) -> Tensor:
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


def _to_float(images: Tensor) -> Tensor:
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
    rows, cols = _crop_taps(boxes, (h, w), _size2(size), interpolation, flip)
    return _resample(_to_float(images), rows, cols)


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    """Mirror the samples where ``mask`` (bool [B]) is set."""
    return torch.where(_per_sample(mask), x.flip(-1), x)


# ============================================================================================
# Colour (float images in [0, 1], [B, 3, H, W])
#
# The public functions return new tensors; the pipeline calls the in-place ``_..._``
# versions on tensors it owns. On a CPU an out-of-place op on a whole batch costs ~5× an
# in-place one (fresh pages, twice the memory traffic), and the pipeline runs ~40 of them
# per view. torch.where, fmod, aminmax and reductions over the channel dim are avoided in
# per-pixel code for the same reason: their CPU kernels are 10-40× slower than plain
# arithmetic; masks are 0/1 float factors instead.
# ============================================================================================


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """Luma [B, 1, H, W], torchvision's weights and summation order."""
    r, g, b = x.unbind(dim=-3)
    luma = (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    return luma.unsqueeze(-3)


def _random_grayscale_(x: Tensor, weight: Tensor) -> Tensor:
    """In place; ``weight`` [B, 1, 1, 1] is 1 for the samples to turn grey, else 0.
    x + w·(luma − x) is exactly x for w = 0 and exactly the luma for w = 1 (torch.lerp
    switches formulas at 0.5), with no torch.where pass."""
    return x.lerp_(rgb_to_grayscale(x), weight)


def random_grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace the samples where ``mask`` is set by their luma on all three channels."""
    return _random_grayscale_(x.clone(), _per_sample(mask.to(x.dtype)))


def _blend_(x: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    # f·x + (1 − f)·other = x + (1 − f)·(other − x), clamped: torchvision's _blend.
    return x.lerp_(other, _per_sample(1.0 - factors)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factors: Tensor) -> Tensor:
    """Scale intensities by ``factors`` [B] (0 black, 1 unchanged), clamped to [0, 1]."""
    return (x * _per_sample(factors)).clamp_(0.0, 1.0)


def adjust_contrast(x: Tensor, factors: Tensor) -> Tensor:
    """Blend each image with its mean luma (a flat grey image) by ``factors`` [B]."""
    mean = rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend_(x.clone(), mean, factors)


def adjust_saturation(x: Tensor, factors: Tensor) -> Tensor:
    """Blend each image with its own luma image by ``factors`` [B] (0 grey, 1 unchanged)."""
    return _blend_(x.clone(), rgb_to_grayscale(x), factors)


def _hue_shift(factors: Tensor) -> Tensor:
    """[B, 3, 1, 1]: the per-channel offset n − 2 (= 3, 1, −1) plus 6·hue of each sample,
    built on the device (torch.tensor(list) would be a host-to-device copy)."""
    n = 3.0 - 2.0 * torch.arange(3, device=factors.device, dtype=torch.float32)
    return n.view(1, 3, 1, 1) + _per_sample(factors.to(torch.float32) * 6.0)


def _hue_(x: Tensor, shift: Tensor) -> Tensor:
    """``adjust_hue`` writing its result into ``x``; ``shift`` from ``_hue_shift``.

    HSV is never materialised. With M = max, m = min, C = M − m of a pixel and h6 its hue
    in sixths of a turn, HSV → RGB is ``channel_n = m + C·clamp(d(h6 + n − 2) − 1, 0, 1)``
    for n = 5, 3, 1 (R, G, B), where d is the distance to the nearest multiple of 6: the
    textbook ``V − V·S·clamp(min(k, 4 − k), 0, 1)``, ``k = (h6 + n) mod 6``, with V·S = C.
    The argument y = h6 + n − 2 + 6·hue lies in [−5, 11] (h6 ∈ [−1, 5], |hue| ≤ 0.5),
    where d(y) = 3 − | ||y| − 6| − 3 |: three abs instead of a modulo (fmod and round are
    several times slower than abs on a CPU, and this runs on every value of the batch).
    """
    r, g, b = x.unbind(dim=-3)
    hi = torch.maximum(torch.maximum(r, g), b)
    lo = torch.minimum(torch.minimum(r, g), b)
    chroma = hi - lo
    # Which channel holds the max, with torchvision's priority on ties (R, then G, then B):
    # 0/1 float masks written by the comparisons themselves.
    is_r = torch.eq(hi, r, out=torch.empty_like(hi))
    is_g = torch.eq(hi, g, out=torch.empty_like(hi)).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    # h6·C: (G − B) if R is max, 2C + (B − R) if G is, 4C + (R − G) if B is.
    num = (g - b).mul_(is_r).addcmul_(b - r, is_g).addcmul_(r - g, is_b)
    # Grey pixels (C = 0) have num = 0 and any hue maps back to grey: divide by 1 there.
    h6 = num.div_(torch.clamp(chroma, min=torch.finfo(x.dtype).tiny))
    h6.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0)
    y = torch.add(h6.unsqueeze(1), shift, out=x)  # x's pixels are no longer needed
    # clamp(d(y) − 1, 0, 1) = clamp(2 − | ||y| − 6| − 3 |, 0, 1)
    y.abs_().sub_(6.0).abs_().sub_(3.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return y.mul_(chroma.unsqueeze(1)).add_(lo.unsqueeze(1))


def adjust_hue(x: Tensor, factors: Tensor) -> Tensor:
    """Rotate hue by ``factors`` [B] turns (in [-0.5, 0.5]) in HSV space, value and
    saturation kept: torchvision's ``adjust_hue`` per sample."""
    return _hue_(x.clone(), _hue_shift(factors))


@dataclass
class _Blend:
    """One blend slot of the jitter schedule, per-sample [B, 1, 1, 1] coefficients: the
    result is clamp(x + keep·(g − x), 0, 1) with g = sat·luma + con·mean luma, i.e.
    clamp(f·x + (1 − f)·g) with keep = 1 − f. Brightness has sat = con = 0 (g = 0); a
    sample with nothing to do in this slot has keep = 0."""

    keep: Tensor
    sat: Tensor
    con: Tensor

    def select(self, sl: slice) -> _Blend:
        return _Blend(self.keep[sl], self.sat[sl], self.con[sl])


@dataclass
class _Hue:
    shift: Tensor  # [B, 3, 1, 1] from _hue_shift

    def select(self, sl: slice) -> _Hue:
        return _Hue(self.shift[sl])


def _jitter_schedule(factors: Tensor, order: Tensor, active: Sequence[bool]) -> list[_Blend | _Hue]:
    """The slot schedule of :func:`color_jitter` as per-sample coefficient tensors."""
    dev = factors.device
    blends = [op for op in (0, 1, 2) if active[op]]
    use_hue = bool(active[3])
    nb = len(blends)
    if nb == 0:
        return [_Hue(_hue_shift(factors[:, 3]))] if use_hue else []

    slots = torch.arange(4, device=dev)
    is_blend = torch.zeros_like(order, dtype=torch.bool)
    for op in blends:
        is_blend |= order == op
    # Each sample's active blends in its application order: their positions in ``order``,
    # stably sorted to the front.
    front = torch.argsort(torch.where(is_blend, slots, slots + 4), dim=1, stable=True)[:, :nb]
    seq = order.gather(1, front)  # [B, nb]
    if use_hue:
        hue_at = (order == 3).to(torch.uint8).argmax(dim=1, keepdim=True)
        before = (is_blend & (slots < hue_at)).sum(dim=1)  # L: blends applied before hue
    else:
        before = torch.full_like(order[:, 0], nb)

    def blend(rank: Tensor) -> _Blend:
        valid = (rank >= 0) & (rank < nb)
        op = seq.gather(1, rank.clamp(0, nb - 1)[:, None])[:, 0]
        f = factors.gather(1, op[:, None])[:, 0]
        keep = torch.where(valid, 1.0 - f, 0.0)
        is_op = [_per_sample((valid & (op == k)).to(torch.float32)) for k in (2, 1)]
        return _Blend(_per_sample(keep), *is_op)

    steps: list[_Blend | _Hue] = [blend(j - (nb - before)) for j in range(nb)]  # right-aligned
    if use_hue:
        steps.append(_Hue(_hue_shift(factors[:, 3])))
        steps += [blend(before + j) for j in range(nb)]  # left-aligned after the hue slot
    return steps


def _jitter_(
    x: Tensor, schedule: Sequence[_Blend | _Hue], contrast: bool, saturation: bool
) -> Tensor:
    """Run a jitter schedule in place. ``contrast``/``saturation`` False (the op is off for
    every sample) skip the luma and its mean."""
    for s in schedule:
        if isinstance(s, _Hue):
            x = _hue_(x, s.shift)
            continue
        if not (contrast or saturation):
            # brightness only: x + keep·(0 − x) = (1 − keep)·x
            x = x.mul_(1.0 - s.keep).clamp_(0.0, 1.0)
            continue
        g = rgb_to_grayscale(x)
        mean = g.mean(dim=(-3, -2, -1), keepdim=True) if contrast else None
        g.mul_(s.sat)
        if mean is not None:
            g.add_(mean.mul_(s.con))
        x = x.lerp_(g, s.keep).clamp_(0.0, 1.0)
    return x


def color_jitter(
    x: Tensor,
    factors: Tensor,
    order: Tensor,
    active: Sequence[bool] = (True, True, True, True),
) -> Tensor:
    """torchvision's ColorJitter with per-sample ``factors`` [B, 4] and ``order`` [B, 4] (a
    permutation of the op ids per sample, see :func:`sample_jitter`).

    ``active[k]`` False skips op k for every sample (ColorJitter skips ops of strength 0);
    a static flag, so no computation is spent on an op nobody gets.

    Why the schedule: the four ops do not commute (each clamps, contrast reads the current
    mean, hue is nonlinear) and every sample wants its own order. Brightness, contrast and
    saturation share one form, clamp(f·x + (1 − f)·g) with g = 0, the mean luma or the
    luma, so a sample's sequence is "L blends, hue, 3 − L blends". Running 3 blend slots,
    one hue slot and 3 more blend slots, each sample's blends right-aligned before its hue
    and left-aligned after it (identity in the slots it does not use), applies every
    sample's own order exactly with one evaluation of hue, the expensive op, for the whole
    batch. Samples with identity factors (not drawn for jitter) come back unchanged up to
    the float rounding of the hue round trip (~1e-7).
    """
    schedule = _jitter_schedule(factors, order, active)
    return _jitter_(x.clone(), schedule, bool(active[1]), bool(active[2]))


# ============================================================================================
# Blur, solarize, normalise
# ============================================================================================


def gaussian_kernel1d(sigmas: Tensor, kernel_size: int) -> Tensor:
    """[B, K] normalised Gaussians ``exp(-d² / 2σ²)`` at integer offsets d from the centre
    (torchvision's kernel, which its sqrt(2)-scaled linspace and softmax also compute)."""
    d = torch.arange(kernel_size, device=sigmas.device, dtype=torch.float32) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (d / sigmas.to(torch.float32)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def _blur_kernels(sigmas: Tensor, kernel_size: int, mask: Tensor | None) -> Tensor:
    """[B, K] kernels, an impulse (identity) where ``mask`` is False."""
    k = gaussian_kernel1d(sigmas, kernel_size)
    if mask is None:
        return k
    impulse = torch.zeros_like(k)
    impulse[:, kernel_size // 2] = 1.0
    return torch.lerp(impulse, k, mask.to(k.dtype)[:, None])


def _blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Separable blur of each sample with its own 1-D kernel ([B, K], odd K), reflect
    padding; a new tensor."""
    b, c, h, w = x.shape
    kernel_size = kernels.shape[1]
    k = kernels.to(x.dtype).repeat_interleave(c, dim=0)  # one kernel per (sample, channel)
    p = kernel_size // 2
    planes = F.pad(x.reshape(1, b * c, h, w), (p, p, p, p), mode="reflect")
    planes = F.conv2d(planes, k[:, None, None, :], groups=b * c)
    planes = F.conv2d(planes, k[:, None, :, None], groups=b * c)
    return planes.view(b, c, h, w)


def gaussian_blur(
    x: Tensor, sigmas: Tensor, kernel_size: int, mask: Tensor | None = None
) -> Tensor:
    """Blur each sample with its own isotropic Gaussian (``sigmas`` [B]), reflect padding,
    square ``kernel_size``: torchvision's ``gaussian_blur``. Samples where ``mask`` is False
    get an impulse kernel, i.e. come back unchanged.

    Separable (a row pass and a column pass: 2K instead of K² multiply-adds per pixel),
    every (sample, channel) plane its own group of one grouped convolution: that is how a
    different kernel per sample stays a single kernel launch.
    """
    return _blur(x, _blur_kernels(sigmas, kernel_size, mask))


def _solarize_threshold(mask: Tensor, threshold: float) -> Tensor:
    """[B, 1, 1, 1]: ``threshold`` where ``mask``, else 2 (unreachable for x in [0, 1]),
    so the op needs no separate mask pass."""
    return _per_sample(torch.where(mask, threshold, 2.0).to(torch.float32))


def _solarize_(x: Tensor, threshold: Tensor) -> Tensor:
    # For x in [0, 1], |x − s| with s = 1 where x >= threshold is 1 − x there and x
    # elsewhere: two cheap in-place passes and a comparison instead of a torch.where.
    s = torch.ge(x, threshold, out=torch.empty_like(x))
    return x.sub_(s).abs_()


def solarize(x: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Invert (1 − x) the pixels ``>= threshold`` of the samples where ``mask`` is set
    (x in [0, 1])."""
    return _solarize_(x.clone(), _solarize_threshold(mask, threshold))


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x − mean) / std per channel. (Builds its constants from Python lists: fine
    standalone; the pipeline caches them per device instead.)"""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


# ============================================================================================
# The pipeline
# ============================================================================================


@dataclass
class ViewParams:
    """Every random parameter of one view for a batch, one row per sample (see the samplers).

    ``blur``/``solarize``/``gray``/``flip`` are bool [B]; ``boxes`` int64 [B, 4] (top, left,
    height, width), None for views cropped beforehand (:class:`~sslcli.data.crops.Crops`);
    ``jitter_factors`` [B, 4] and ``jitter_order`` [B, 4] as in :func:`sample_jitter`;
    ``blur_sigma`` float32 [B] (drawn for every sample, used where ``blur``).
    Ops a spec disables are ``None``.
    """

    boxes: Tensor | None
    flip: Tensor | None = None
    jitter_factors: Tensor | None = None
    jitter_order: Tensor | None = None
    gray: Tensor | None = None
    blur: Tensor | None = None
    blur_sigma: Tensor | None = None
    solarize: Tensor | None = None

    def select(self, sl: slice) -> ViewParams:
        """The parameters of samples ``sl`` (for chunked rendering)."""
        return ViewParams(**{k: None if v is None else v[sl] for k, v in vars(self).items()})


def _jitter_active(spec: ViewSpec) -> tuple[bool, bool, bool, bool]:
    return (spec.brightness > 0, spec.contrast > 0, spec.saturation > 0, spec.hue > 0)


def sample_view_params(
    spec: ViewSpec,
    n: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
    crop: bool = True,
) -> ViewParams:
    """Draw one view's parameters for ``n`` images of ``height`` × ``width``.

    The draws happen in a fixed order (crop, flip, jitter, grayscale, blur, solarize) and
    are skipped only for ops the spec disables, so the generator advances by the same
    amount every step: a resumed run draws exactly what the uninterrupted one did.
    ``crop=False``: no box (the images are the view's crops already, cut in the workers).
    """
    g, d = generator, device
    p = ViewParams(
        boxes=sample_crop_boxes(n, height, width, spec.scale, spec.ratio, generator=g, device=d)
        if crop
        else None
    )
    if spec.flip_p > 0:
        p.flip = sample_mask(n, spec.flip_p, generator=g, device=d)
    if spec.jitter_p > 0 and any(_jitter_active(spec)):
        p.jitter_factors, p.jitter_order = sample_jitter(
            n,
            spec.brightness,
            spec.contrast,
            spec.saturation,
            spec.hue,
            spec.jitter_p,
            generator=g,
            device=d,
        )
    if spec.grayscale_p > 0:
        p.gray = sample_mask(n, spec.grayscale_p, generator=g, device=d)
    if spec.blur_p > 0:
        p.blur = sample_mask(n, spec.blur_p, generator=g, device=d)
        lo, hi = spec.blur_sigma
        p.blur_sigma = sample_uniform(n, lo, hi, generator=g, device=d)
    if spec.solarize_p > 0:
        p.solarize = sample_mask(n, spec.solarize_p, generator=g, device=d)
    return p


@dataclass
class _Plan:
    """Everything a view needs beyond the pixels, derived once per batch from its
    :class:`ViewParams`: taps, column matrices, jitter schedule, blur kernels,
    thresholds. These are all small [B, ...] tensors; computing them once instead of per
    rendered slice keeps the per-slice work to the heavy passes (on a CPU each op costs
    ~10 µs of dispatch whatever its size)."""

    rows: tuple[Tensor, Tensor] | None
    cols: Tensor | None
    flip: Tensor | None = None  # [B, 1, 1, 1] bool, only for pre-cropped views
    gray: Tensor | None = None
    jitter: list[_Blend | _Hue] = field(default_factory=list)
    blur: Tensor | None = None
    solarize: Tensor | None = None

    def select(self, sl: slice) -> _Plan:
        return _Plan(
            rows=None if self.rows is None else (self.rows[0][sl], self.rows[1][sl]),
            cols=None if self.cols is None else self.cols[sl],
            flip=None if self.flip is None else self.flip[sl],
            gray=None if self.gray is None else self.gray[sl],
            jitter=[s.select(sl) for s in self.jitter],
            blur=None if self.blur is None else self.blur[sl],
            solarize=None if self.solarize is None else self.solarize[sl],
        )


def _plan(spec: ViewSpec, p: ViewParams, in_hw: tuple[int, int]) -> _Plan:
    if p.boxes is None:  # pre-cropped: only the flip is left of the geometry
        flip = None if p.flip is None else _per_sample(p.flip)
        plan = _Plan(rows=None, cols=None, flip=flip)
    else:
        size = (spec.size, spec.size)
        rows, cols = _crop_taps(p.boxes, in_hw, size, spec.interpolation, p.flip)
        plan = _Plan(rows=rows, cols=cols)
    if p.gray is not None:
        plan.gray = _per_sample(p.gray.to(torch.float32))
    if p.jitter_factors is not None and p.jitter_order is not None:
        plan.jitter = _jitter_schedule(p.jitter_factors, p.jitter_order, _jitter_active(spec))
    if p.blur is not None and p.blur_sigma is not None:
        k = blur_kernel_size(spec.size, spec.blur_kernel_frac)
        plan.blur = _blur_kernels(p.blur_sigma, k, p.blur)
    if p.solarize is not None:
        plan.solarize = _solarize_threshold(p.solarize, spec.solarize_threshold)
    return plan


@dataclass(frozen=True)
class _Static:
    """The per-spec constants the rendering code branches on."""

    bicubic: bool
    gray_first: bool
    contrast: bool
    saturation: bool

    @staticmethod
    def of(spec: ViewSpec) -> _Static:
        return _Static(
            bicubic=spec.interpolation == "bicubic",
            gray_first=spec.grayscale_first,
            contrast=spec.contrast > 0,
            saturation=spec.saturation > 0,
        )


def _render(
    static: _Static, source: Tensor, plan: _Plan, norm: tuple[Tensor, Tensor] | None
) -> Tensor:
    """The heavy passes of one view over ``source`` (float [B, C, H, W] in [0, 1]);
    ``norm`` = (mean, std) [1, 3, 1, 1] or None."""
    if plan.rows is None or plan.cols is None:
        # Cropped and resized in the workers (uint8, so nothing to clamp); a fresh tensor
        # either way, since everything below is in place.
        x = source.clone() if plan.flip is None else torch.where(plan.flip, source.flip(-1), source)
    else:
        x = _resample(source, plan.rows, plan.cols)  # fresh: everything below is in place
        if static.bicubic:
            x = x.clamp_(0.0, 1.0)  # cubic overshoot; torchvision's uint8 path clamps too
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1).contiguous()
    if plan.gray is not None and static.gray_first:
        x = _random_grayscale_(x, plan.gray)
    if plan.jitter:
        x = _jitter_(x, plan.jitter, static.contrast, static.saturation)
    if plan.gray is not None and not static.gray_first:
        x = _random_grayscale_(x, plan.gray)
    if plan.blur is not None:
        x = _blur(x, plan.blur)
    if plan.solarize is not None:
        x = _solarize_(x, plan.solarize)
    if norm is not None:
        x = x.sub_(norm[0]).div_(norm[1])
    return x


class ViewPipeline:
    """Turn a uint8 batch into the views a method's :class:`ViewSpec` list asks for.

    ``pipeline(images, generator)`` takes uint8 [B, C, H, W] (C = 1 or 3; float in [0, 1] is
    accepted too) on the training device and returns one float32 [B, 3, size, size] tensor
    per expanded view (``spec.count`` repeats, in order). Given a
    :class:`~sslcli.data.crops.Crops` instead (views cropped from the original images in
    the workers), it skips the crop and applies the rest to each view. Per view and per sample:
    RandomResizedCrop → horizontal flip → colour jitter (per-sample op order) → grayscale
    (before the jitter when ``grayscale_first``) → Gaussian blur → solarize → normalise.

    ``chunk_bytes`` bounds the float32 size of one view slice rendered at a time on the
    CPU (default :data:`CPU_CHUNK_BYTES`). The ~60 elementwise passes of a view are
    memory-bound there: slices of a few MiB stay in cache, and their temporaries are
    recycled by malloc, where whole-batch temporaries are fresh mmap'ed pages every time
    (page faults cost as much as the arithmetic). Parameters are drawn for the whole batch
    first, so results do not depend on the slicing. On CUDA the batch is one slice: there
    the launch count matters, not the cache.
    """

    def __init__(self, specs: Sequence[ViewSpec], chunk_bytes: int | None = None) -> None:
        self.specs = list(specs)
        self.views = expand(self.specs)
        if not self.views:
            raise ValueError("ViewPipeline needs at least one ViewSpec")
        self.chunk_bytes = chunk_bytes
        # Per-device channel constants, built once: torch.tensor(list, device="cuda") on
        # every call would be a blocking host-to-device copy in the hot path.
        self._constants: dict[tuple[object, ...], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return f"ViewPipeline({len(self.views)} views: {[v.size for v in self.views]})"

    def sample(
        self,
        spec: ViewSpec,
        images: Tensor,
        generator: torch.Generator | None = None,
        crop: bool = True,
    ) -> ViewParams:
        """One view's parameters for ``images`` (exposed so tests can inspect the draws)."""
        b, _, h, w = images.shape
        return sample_view_params(
            spec, b, h, w, generator=generator, device=images.device, crop=crop
        )

    def __call__(
        self, images: Tensor | Crops, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        if isinstance(images, Crops):
            return self._from_crops(images, generator)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W], got {tuple(images.shape)}")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"expected uint8 or float images, got {images.dtype}")
        # One float copy of the batch, shared by all views of the step.
        source = _to_float(images)
        return [self._view(source, spec, generator) for spec in self.views]

    def _from_crops(self, crops: Crops, generator: torch.Generator | None) -> list[Tensor]:
        """Views already cropped and resized (in the workers, or by the GPU decoder): the
        batched ops after the geometry, with per-sample parameters as for a full batch."""
        if len(crops.views) != len(self.views):
            raise ValueError(
                f"expected {len(self.views)} pre-cropped views, got {len(crops.views)}"
            )
        out = []
        for spec, v in zip(self.views, crops.views, strict=True):
            if v.ndim != 4 or v.shape[1] not in (1, 3) or v.shape[-1] != spec.size:
                raise ValueError(
                    f"expected a pre-cropped view [B, 3, {spec.size}, {spec.size}], "
                    f"got {tuple(v.shape)}"
                )
            out.append(self._view(_to_float(v), spec, generator, crop=False))
        return out

    def _normalizer(self, spec: ViewSpec, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """``(mean, std)`` as [1, 3, 1, 1] tensors on ``device``, None without normalising."""
        if not spec.normalize:
            return None
        key = (spec.mean, spec.std, str(device))
        if key not in self._constants:
            self._constants[key] = (
                torch.tensor(spec.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(spec.std, device=device).view(1, 3, 1, 1),
            )
        return self._constants[key]

    def _chunk(self, spec: ViewSpec, source: Tensor) -> int:
        b, _, h, w = source.shape
        if source.device.type != "cpu":
            return b
        limit = self.chunk_bytes if self.chunk_bytes is not None else CPU_CHUNK_BYTES
        per_sample = 4 * 3 * max(spec.size * spec.size, h * w)
        return max(1, min(b, limit // per_sample))

    def _view(
        self,
        source: Tensor,
        spec: ViewSpec,
        generator: torch.Generator | None,
        crop: bool = True,
    ) -> Tensor:
        params = self.sample(spec, source, generator, crop)
        plan = _plan(spec, params, (source.shape[2], source.shape[3]))
        static = _Static.of(spec)
        norm = self._normalizer(spec, source.device)
        b = source.shape[0]
        step = self._chunk(spec, source)
        if step >= b:
            return _render(static, source, plan, norm)
        out = torch.empty(b, 3, spec.size, spec.size, device=source.device)
        for start in range(0, b, step):
            sl = slice(start, min(b, start + step))
            out[sl] = _render(static, source[sl], plan.select(sl), norm)
        return out
