"""Colour ops of the batched views: grayscale, colour jitter, Gaussian blur, solarize and
normalisation, on float images in [0, 1] ([B, 3, H, W]), with per-sample parameters.

Each op reproduces the matching single-image function of
``torchvision.transforms.v2.functional`` (the tests check this sample by sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from sslcli.data.sampling import per_sample, uniform01

# ITU-R 601-2 luma weights, the ones torchvision's rgb_to_grayscale uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# Column order of the colour-jitter factors (and the op ids in ``order``), as in
# torchvision's ColorJitter (its ``fn_idx``): 0 brightness, 1 contrast, 2 saturation, 3 hue.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


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
    u = uniform01((n, 9), generator, device)
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
# Colour (float images in [0, 1], [B, 3, H, W])
#
# The public functions return new tensors; the pipeline calls the in-place ``..._``
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


def random_grayscale_(x: Tensor, weight: Tensor) -> Tensor:
    """In place; ``weight`` [B, 1, 1, 1] is 1 for the samples to turn grey, else 0.
    x + w·(luma − x) is exactly x for w = 0 and exactly the luma for w = 1 (torch.lerp
    switches formulas at 0.5), with no torch.where pass."""
    return x.lerp_(rgb_to_grayscale(x), weight)


def random_grayscale(x: Tensor, mask: Tensor) -> Tensor:
    """Replace the samples where ``mask`` is set by their luma on all three channels."""
    return random_grayscale_(x.clone(), per_sample(mask.to(x.dtype)))


def _blend_(x: Tensor, other: Tensor, factors: Tensor) -> Tensor:
    # f·x + (1 − f)·other = x + (1 − f)·(other − x), clamped: torchvision's _blend.
    return x.lerp_(other, per_sample(1.0 - factors)).clamp_(0.0, 1.0)


def adjust_brightness(x: Tensor, factors: Tensor) -> Tensor:
    """Scale intensities by ``factors`` [B] (0 black, 1 unchanged), clamped to [0, 1]."""
    return (x * per_sample(factors)).clamp_(0.0, 1.0)


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
    return n.view(1, 3, 1, 1) + per_sample(factors.to(torch.float32) * 6.0)


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
class JitterBlend:
    """One blend slot of the jitter schedule, per-sample [B, 1, 1, 1] coefficients: the
    result is clamp(x + keep·(g − x), 0, 1) with g = sat·luma + con·mean luma, i.e.
    clamp(f·x + (1 − f)·g) with keep = 1 − f. Brightness has sat = con = 0 (g = 0); a
    sample with nothing to do in this slot has keep = 0."""

    keep: Tensor
    sat: Tensor
    con: Tensor

    def select(self, sl: slice) -> JitterBlend:
        return JitterBlend(self.keep[sl], self.sat[sl], self.con[sl])


@dataclass
class JitterHue:
    shift: Tensor  # [B, 3, 1, 1] from _hue_shift

    def select(self, sl: slice) -> JitterHue:
        return JitterHue(self.shift[sl])


def jitter_schedule(
    factors: Tensor, order: Tensor, active: Sequence[bool]
) -> list[JitterBlend | JitterHue]:
    """The slot schedule of :func:`color_jitter` as per-sample coefficient tensors."""
    dev = factors.device
    blends = [op for op in (0, 1, 2) if active[op]]
    use_hue = bool(active[3])
    nb = len(blends)
    if nb == 0:
        return [JitterHue(_hue_shift(factors[:, 3]))] if use_hue else []

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

    def blend(rank: Tensor) -> JitterBlend:
        valid = (rank >= 0) & (rank < nb)
        op = seq.gather(1, rank.clamp(0, nb - 1)[:, None])[:, 0]
        f = factors.gather(1, op[:, None])[:, 0]
        keep = torch.where(valid, 1.0 - f, 0.0)
        is_op = [per_sample((valid & (op == k)).to(torch.float32)) for k in (2, 1)]
        return JitterBlend(per_sample(keep), *is_op)

    steps: list[JitterBlend | JitterHue] = [
        blend(j - (nb - before)) for j in range(nb)
    ]  # right-aligned
    if use_hue:
        steps.append(JitterHue(_hue_shift(factors[:, 3])))
        steps += [blend(before + j) for j in range(nb)]  # left-aligned after the hue slot
    return steps


def jitter_(
    x: Tensor, schedule: Sequence[JitterBlend | JitterHue], contrast: bool, saturation: bool
) -> Tensor:
    """Run a jitter schedule in place. ``contrast``/``saturation`` False (the op is off for
    every sample) skip the luma and its mean."""
    for s in schedule:
        if isinstance(s, JitterHue):
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
    schedule = jitter_schedule(factors, order, active)
    return jitter_(x.clone(), schedule, bool(active[1]), bool(active[2]))


# ============================================================================================
# Blur, solarize, normalise
# ============================================================================================


def gaussian_kernel1d(sigmas: Tensor, kernel_size: int) -> Tensor:
    """[B, K] normalised Gaussians ``exp(-d² / 2σ²)`` at integer offsets d from the centre
    (torchvision's kernel, which its sqrt(2)-scaled linspace and softmax also compute)."""
    d = torch.arange(kernel_size, device=sigmas.device, dtype=torch.float32) - (kernel_size - 1) / 2
    k = torch.exp(-0.5 * (d / sigmas.to(torch.float32)[:, None]) ** 2)
    return k / k.sum(dim=1, keepdim=True)


def blur_kernels(sigmas: Tensor, kernel_size: int, mask: Tensor | None) -> Tensor:
    """[B, K] kernels, an impulse (identity) where ``mask`` is False."""
    k = gaussian_kernel1d(sigmas, kernel_size)
    if mask is None:
        return k
    impulse = torch.zeros_like(k)
    impulse[:, kernel_size // 2] = 1.0
    return torch.lerp(impulse, k, mask.to(k.dtype)[:, None])


def blur_with_kernels(x: Tensor, kernels: Tensor) -> Tensor:
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
    return blur_with_kernels(x, blur_kernels(sigmas, kernel_size, mask))


def solarize_threshold(mask: Tensor, threshold: float) -> Tensor:
    """[B, 1, 1, 1]: ``threshold`` where ``mask``, else 2 (unreachable for x in [0, 1]),
    so the op needs no separate mask pass."""
    return per_sample(torch.where(mask, threshold, 2.0).to(torch.float32))


def solarize_(x: Tensor, threshold: Tensor) -> Tensor:
    # For x in [0, 1], |x − s| with s = 1 where x >= threshold is 1 − x there and x
    # elsewhere: two cheap in-place passes and a comparison instead of a torch.where.
    s = torch.ge(x, threshold, out=torch.empty_like(x))
    return x.sub_(s).abs_()


def solarize(x: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Invert (1 − x) the pixels ``>= threshold`` of the samples where ``mask`` is set
    (x in [0, 1])."""
    return solarize_(x.clone(), solarize_threshold(mask, threshold))


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x − mean) / std per channel. (Builds its constants from Python lists: fine
    standalone; the pipeline caches them per device instead.)"""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s
