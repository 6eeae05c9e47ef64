"""Batched per-sample augmentation (sslcli.data.augment) against torchvision, on the CPU.

Three kinds of checks:

* every op, sample by sample, against the single-image function of
  ``torchvision.transforms.v2.functional`` given the same parameters (float images in
  [0, 1]); the whole pipeline against a per-sample torchvision re-run of the parameters
  it drew;
* the parameter samplers against torchvision's own random transforms (crop area and
  aspect statistics, flip/jitter/grayscale/blur/solarize rates, jitter factor ranges and
  op orders) on a few thousand draws;
* the pipeline contract: shapes, dtypes, multi-crop counts, 1-channel input,
  reproducibility, chunking invariance, no host synchronisation, no per-sample loop.

Tolerances (max absolute difference on [0, 1] images unless said otherwise):
``OP_TOL`` = 1e-5 for single ops (observed ≤ 2e-6: float rounding in a different order of
operations); ``PIPE_TOL`` = 1e-4 for whole views after normalisation, which divides by
std ≈ 0.22 and chains ~10 ops. Statistical tolerances are ≥ 4 standard errors of the
compared quantity; all draws use fixed seeds, so the tests are deterministic anyway.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import transforms as T1
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from sslcli.data import augment as A
from sslcli.data import geometric as G
from sslcli.data import photometric as P
from sslcli.data import sampling as S
from sslcli.data.views import ViewSpec

OP_TOL = 1e-5
PIPE_TOL = 1e-4
N_STAT = 4000  # draws per distribution check
# Two-sample KS critical value at significance 1e-4 for N_STAT vs N_STAT: c·sqrt(2/N) with
# c = sqrt(-ln(1e-4 / 2) / 2) ≈ 2.23 (conservative for discrete distributions).
KS_CRIT = 2.23 * math.sqrt(2 / N_STAT)


def _images(b: int = 12, h: int = 40, w: int = 52, seed: int = 0) -> Tensor:
    """Float images in [0, 1] with smooth structure plus noise (resampling is exercised by
    both), and a few exactly grey / saturated pixels for the hue edge cases."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    phase = torch.rand(b, 3, 1, 1, generator=g) * 6.0
    base = 0.5 + 0.4 * torch.sin(4 * xx + 3 * yy + phase)
    x = (base + 0.1 * torch.rand(b, 3, h, w, generator=g)).clamp(0, 1)
    x[:, :, :3, :3] = 0.5  # grey: hue undefined
    x[:, 0, -2:, -2:] = 1.0  # a saturated corner
    return x


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _per_sample(fn: Callable[..., Tensor], x: Tensor, *params: Tensor) -> Tensor:
    """torchvision reference: ``fn(x[b], params[b]...)`` stacked over the batch."""
    return torch.stack([fn(x[b], *(float(p[b]) for p in params)) for b in range(x.shape[0])])


def _close(a: Tensor, b: Tensor, tol: float) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs difference {err:.3g} > {tol:g}"


# ============================================================================================
# Ops against torchvision, per sample
# ============================================================================================


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(16, 16), (32, 32), (64, 64), (24, 40)])
def test_resized_crop_matches_torchvision(
    interpolation: G.Interpolation, size: tuple[int, int]
) -> None:
    x = _images()
    boxes = G.sample_crop_boxes(x.shape[0], 40, 52, (0.08, 1.0), generator=_gen(1))
    boxes[0] = torch.tensor([0, 0, 40, 52])  # whole image: strongest shrink
    boxes[1] = torch.tensor([5, 7, 3, 2])  # tiny crop: strong enlargement
    out = G.resized_crop(x, boxes, size, interpolation)
    mode = InterpolationMode(interpolation)
    ref = torch.stack(
        [
            TF.resized_crop(x[b], *boxes[b].tolist(), list(size), mode, antialias=True)
            for b in range(x.shape[0])
        ]
    )
    _close(out, ref, OP_TOL)


def test_resized_crop_flip_and_uint8() -> None:
    x8 = (_images() * 255).round().to(torch.uint8)
    boxes = G.sample_crop_boxes(x8.shape[0], 40, 52, generator=_gen(2))
    flip = torch.arange(x8.shape[0]) % 2 == 0
    out = G.resized_crop(x8, boxes, 24, "bilinear", flip=flip)
    ref = torch.stack(
        [
            TF.resized_crop(x8[b].float() / 255, *boxes[b].tolist(), [24, 24], antialias=True)
            for b in range(x8.shape[0])
        ]
    )
    ref = torch.stack([TF.horizontal_flip(r) if f else r for r, f in zip(ref, flip, strict=True)])
    _close(out, ref, OP_TOL)
    unflipped = G.resized_crop(x8, boxes, 24, "bilinear")
    _close(G.hflip(unflipped, flip), out, OP_TOL)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resized_crop_strong_shrink(interpolation: G.Interpolation) -> None:
    # 200 px wide crops down to 12 px: ~17x shrink, dozens of taps per output pixel, where
    # anti-aliasing (not point sampling) decides the result.
    g = _gen(25)
    x = torch.rand(3, 3, 120, 200, generator=g)
    boxes = torch.tensor([[0, 0, 120, 200], [10, 20, 100, 150], [60, 3, 37, 190]])
    out = G.resized_crop(x, boxes, 12, interpolation)
    mode = InterpolationMode(interpolation)
    ref = torch.stack(
        [
            TF.resized_crop(x[b], *boxes[b].tolist(), [12, 12], mode, antialias=True)
            for b in range(3)
        ]
    )
    _close(out, ref, OP_TOL)


def test_resample_taps_are_a_partition_of_unity() -> None:
    start = torch.tensor([0, 3, 10])
    length = torch.tensor([50, 7, 1])
    for interp in ("bilinear", "bicubic"):
        index, weight = G.resample_taps(start, length, 60, 16, interp)
        torch.testing.assert_close(weight.sum(-1), torch.ones(3, 16))
        assert int(index.min()) >= 0 and int(index.max()) < 60
        # the taps of one output pixel are distinct (resampling_matrix scatters them)
        assert (index.sort(-1).values.diff(dim=-1) != 0).all()


@pytest.mark.parametrize(
    ("ours", "theirs", "low", "high"),
    [
        (P.adjust_brightness, TF.adjust_brightness, 0.0, 2.0),
        (P.adjust_contrast, TF.adjust_contrast, 0.0, 2.0),
        (P.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
        (P.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_colour_ops_match_torchvision(
    ours: Callable[[Tensor, Tensor], Tensor], theirs: Callable[..., Tensor], low: float, high: float
) -> None:
    x = _images(b=16)
    f = S.sample_uniform(16, low, high, generator=_gen(3))
    f[0], f[1] = low, high  # the extremes (factor 0, hue ±0.5)
    _close(ours(x, f), _per_sample(theirs, x, f), OP_TOL)


def test_hue_on_quantised_colours() -> None:
    # Many ties between channels (max shared by two channels) and grey pixels.
    x = (_images(b=16) * 4).round() / 4
    f = torch.linspace(-0.5, 0.5, 16)
    _close(P.adjust_hue(x, f), _per_sample(TF.adjust_hue, x, f), OP_TOL)


def test_grayscale_matches_torchvision() -> None:
    x = _images()
    _close(P.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), OP_TOL)
    mask = torch.arange(x.shape[0]) % 3 == 0
    ref = torch.stack(
        [TF.rgb_to_grayscale(x[b], 3) if mask[b] else x[b] for b in range(x.shape[0])]
    )
    _close(P.random_grayscale(x, mask), ref, OP_TOL)


@pytest.mark.parametrize("kernel_size", [3, 7, 23])
def test_gaussian_blur_matches_torchvision(kernel_size: int) -> None:
    x = _images()
    sigma = S.sample_uniform(x.shape[0], 0.1, 2.0, generator=_gen(4))
    ref = torch.stack(
        [
            TF.gaussian_blur(x[b], [kernel_size, kernel_size], [float(sigma[b])] * 2)
            for b in range(x.shape[0])
        ]
    )
    _close(P.gaussian_blur(x, sigma, kernel_size), ref, OP_TOL)
    mask = torch.arange(x.shape[0]) % 2 == 1
    out = P.gaussian_blur(x, sigma, kernel_size, mask)
    _close(out[mask], ref[mask], OP_TOL)
    assert torch.equal(out[~mask], x[~mask])  # impulse kernel: untouched


def test_solarize_and_normalize_match_torchvision() -> None:
    x = _images()
    mask = torch.arange(x.shape[0]) % 2 == 0
    ref = torch.stack([TF.solarize(x[b], 0.5) if mask[b] else x[b] for b in range(x.shape[0])])
    _close(P.solarize(x, mask, 0.5), ref, 0.0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    _close(P.normalize(x, mean, std), TF.normalize(x, list(mean), list(std)), OP_TOL)


def _torchvision_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """ColorJitter.transform per sample with the given fn_idx and factors."""
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for b in range(x.shape[0]):
        y = x[b]
        for op in order[b].tolist():
            y = fns[op](y, float(factors[b, op]))
        out.append(y)
    return torch.stack(out)


def test_color_jitter_per_sample_order_matches_torchvision() -> None:
    x = _images(b=48)
    factors, order = P.sample_jitter(48, 0.8, 0.8, 0.8, 0.2, generator=_gen(5))
    # every order the schedule distinguishes: hue at each of the 4 positions
    assert set((order == 3).int().argmax(1).tolist()) == {0, 1, 2, 3}
    _close(P.color_jitter(x, factors, order), _torchvision_jitter(x, factors, order), OP_TOL)


def test_color_jitter_inactive_ops_and_identity_samples() -> None:
    x = _images(b=24)
    factors, order = P.sample_jitter(24, 0.4, 0.0, 0.3, 0.0, p=0.5, generator=_gen(6))
    assert torch.all(factors[:, 1] == 1) and torch.all(factors[:, 3] == 0)
    out = P.color_jitter(x, factors, order, active=(True, False, True, False))
    _close(out, _torchvision_jitter(x, factors, order), OP_TOL)
    untouched = (factors == torch.tensor([1.0, 1.0, 1.0, 0.0])).all(1)
    assert untouched.any() and (~untouched).any()
    assert torch.equal(out[untouched], x[untouched])


def _torchvision_view(image: Tensor, spec: ViewSpec, p: A.ViewParams, b: int) -> Tensor:
    """One sample of a view re-run with torchvision functionals and the drawn params."""
    y = image.float() / 255 if image.dtype == torch.uint8 else image
    if y.shape[0] == 1:
        y = y.expand(3, -1, -1)
    mode = InterpolationMode(spec.interpolation)
    y = TF.resized_crop(y, *p.boxes[b].tolist(), [spec.size] * 2, mode, antialias=True)
    y = y.clamp(0, 1)
    if p.flip is not None and p.flip[b]:
        y = TF.horizontal_flip(y)
    gray = p.gray is not None and bool(p.gray[b])
    if gray and spec.grayscale_first:
        y = TF.rgb_to_grayscale(y, 3)
    if p.jitter_factors is not None and p.jitter_order is not None:
        y = _torchvision_jitter(y[None], p.jitter_factors[b : b + 1], p.jitter_order[b : b + 1])[0]
    if gray and not spec.grayscale_first:
        y = TF.rgb_to_grayscale(y, 3)
    if p.blur is not None and p.blur_sigma is not None and p.blur[b]:
        k = P.blur_kernel_size(spec.size, spec.blur_kernel_frac)
        y = TF.gaussian_blur(y, [k, k], [float(p.blur_sigma[b])] * 2)
    if p.solarize is not None and p.solarize[b]:
        y = TF.solarize(y, spec.solarize_threshold)
    if spec.normalize:
        y = TF.normalize(y, list(spec.mean), list(spec.std))
    return y


@pytest.mark.parametrize(
    "spec",
    [
        # SimCLR: bicubic, strong jitter, blur, no normalisation
        ViewSpec(size=32, interpolation="bicubic", brightness=0.8, contrast=0.8,
                 saturation=0.8, hue=0.2, blur_p=0.5, normalize=False),
        # BYOL view 2: solarize; MoCo v1 order: grayscale first, jitter always
        ViewSpec(size=24, blur_p=0.1, solarize_p=0.5, grayscale_p=0.5),
        ViewSpec(size=20, jitter_p=1.0, hue=0.4, grayscale_first=True, flip_p=0.5),
    ],
)  # fmt: skip
def test_pipeline_matches_torchvision_per_sample(spec: ViewSpec) -> None:
    images = (_images(b=16) * 255).round().to(torch.uint8)
    pipe = A.ViewPipeline([spec])
    gen = _gen(7)
    state = gen.get_state()
    params = pipe.sample(spec, images, gen)
    gen.set_state(state)
    (out,) = pipe(images, gen)
    ref = torch.stack([_torchvision_view(images[b], spec, params, b) for b in range(16)])
    _close(out, ref, PIPE_TOL)


# ============================================================================================
# Parameter distributions against torchvision's random transforms
# ============================================================================================


def _box_stats(boxes: Tensor, h: int, w: int) -> dict[str, Tensor]:
    b = boxes.double()
    return {
        "area": b[:, 2] * b[:, 3] / (h * w),
        "log_aspect": torch.log(b[:, 3] / b[:, 2]),
        "cy": (b[:, 0] + b[:, 2] / 2) / h,
        "cx": (b[:, 1] + b[:, 3] / 2) / w,
    }


@pytest.mark.parametrize(
    ("h", "w", "scale", "ratio"),
    [
        (64, 64, (0.08, 1.0), (3 / 4, 4 / 3)),  # SimCLR/BYOL
        (96, 72, (0.05, 0.4), (3 / 4, 4 / 3)),  # DINO local crops, portrait image
        (30, 100, (0.2, 1.0), (3 / 4, 4 / 3)),  # wide: ~20 % central fallbacks
    ],
)
def test_crop_boxes_match_random_resized_crop(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> None:
    ours = G.sample_crop_boxes(N_STAT, h, w, scale, ratio, generator=_gen(8))
    assert ours.dtype == torch.int64
    top, left, bh, bw = ours.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (bh >= 1).all() and (bw >= 1).all()
    assert (top + bh <= h).all() and (left + bw <= w).all()

    torch.manual_seed(8)
    img = torch.zeros(1, h, w)
    ref = torch.tensor([T1.RandomResizedCrop.get_params(img, scale, ratio) for _ in range(N_STAT)])
    mine, theirs = _box_stats(ours, h, w), _box_stats(ref, h, w)
    for key in mine:
        a, b = mine[key], theirs[key]
        # 4.5 standard errors of a difference of means, stds within 10 %, and the whole
        # distributions: two-sample Kolmogorov-Smirnov distance below its 1e-4 critical value
        se = math.sqrt((a.var() + b.var()).item() / N_STAT)
        assert abs(a.mean() - b.mean()).item() <= 4.5 * se + 1e-9, key
        assert abs(a.std() - b.std()).item() <= 0.1 * b.std().item() + 1e-9, key
        assert _ks_distance(a, b) <= KS_CRIT, key
    # how often the 10 tries all fail (central fallback) agrees too
    assert abs(_fallback_rate(ours, h, w) - _fallback_rate(ref, h, w)) <= _rate_tol(0.5)


def _ks_distance(a: Tensor, b: Tensor) -> float:
    """max |F_a(v) - F_b(v)| over all sample values v (empirical CDFs)."""
    a, b = a.sort().values, b.sort().values
    v = torch.cat([a, b])
    fa = torch.searchsorted(a, v, right=True).double() / a.numel()
    fb = torch.searchsorted(b, v, right=True).double() / b.numel()
    return (fa - fb).abs().max().item()


def _fallback_rate(boxes: Tensor, h: int, w: int) -> float:
    """Fraction of boxes that are the central crop of maximal size (the fallback)."""
    top, left, bh, bw = boxes.unbind(1)
    centred = (top == (h - bh) // 2) & (left == (w - bw) // 2)
    return (centred & ((bh == h) | (bw == w))).double().mean().item()


def _rate(mask: Tensor) -> float:
    return mask.double().mean().item()


def _rate_tol(p: float, n: int = N_STAT) -> float:
    return 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_view_param_rates() -> None:
    spec = ViewSpec(flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.2)
    images = torch.zeros(N_STAT, 3, 8, 8, dtype=torch.uint8)
    p = A.ViewPipeline([spec]).sample(spec, images, _gen(9))
    assert p.flip is not None and p.gray is not None
    assert p.blur is not None and p.blur_sigma is not None and p.solarize is not None
    assert p.jitter_factors is not None and p.jitter_order is not None
    for mask, prob in [(p.flip, 0.5), (p.gray, 0.2), (p.blur, 0.5), (p.solarize, 0.2)]:
        assert abs(_rate(mask) - prob) <= _rate_tol(prob)
    jittered = (p.jitter_factors != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)
    assert abs(_rate(jittered) - 0.8) <= _rate_tol(0.8)
    sig = p.blur_sigma
    assert sig.min() >= 0.1 and sig.max() < 2.0
    assert abs(sig.mean().item() - 1.05) <= 4.5 * (1.9 / math.sqrt(12)) / math.sqrt(N_STAT)
    # masks are independent of each other (not one draw reused)
    assert abs(_rate(p.flip & p.blur) - 0.25) <= _rate_tol(0.25)


def test_jitter_factors_match_color_jitter() -> None:
    strengths = (0.8, 0.4, 1.2, 0.2)  # saturation 1.2: the lower bound clips at 0
    factors, order = P.sample_jitter(N_STAT, *strengths, generator=_gen(10))
    torch.manual_seed(10)
    cj = v2.ColorJitter(*strengths)
    img = torch.zeros(3, 4, 4)
    draws = [cj.make_params([img]) for _ in range(N_STAT)]
    ref = torch.tensor(
        [
            [d["brightness_factor"], d["contrast_factor"], d["saturation_factor"], d["hue_factor"]]
            for d in draws
        ]
    )
    for k, s in enumerate(strengths):
        lo, hi = (-s, s) if k == 3 else (max(0.0, 1 - s), 1 + s)
        assert factors[:, k].min() >= lo and factors[:, k].max() <= hi
        se = (hi - lo) / math.sqrt(12 * N_STAT)
        assert abs(factors[:, k].mean() - ref[:, k].mean()).item() <= 4.5 * math.sqrt(2) * se
        assert abs(factors[:, k].std() - ref[:, k].std()).item() <= 0.05 * (hi - lo)
    # orders: uniform over the 24 permutations, like randperm(4)
    ours = Counter(tuple(o) for o in order.tolist())
    theirs = Counter(tuple(d["fn_idx"].tolist()) for d in draws)
    assert len(ours) == 24 and len(theirs) == 24
    expected = N_STAT / 24
    tol = 4.5 * math.sqrt(expected)
    assert all(abs(c - expected) <= tol for c in ours.values()), ours


def test_jitter_probability_and_identity() -> None:
    factors, _ = P.sample_jitter(N_STAT, 0.4, 0.4, 0.4, 0.1, p=0.3, generator=_gen(11))
    identity = (factors == torch.tensor([1.0, 1.0, 1.0, 0.0])).all(1)
    assert abs(_rate(~identity) - 0.3) <= _rate_tol(0.3)


def test_applied_rates_in_outputs() -> None:
    # A horizontal ramp: flipped outputs decrease left to right; grey outputs have equal
    # channels; solarized ones are inverted above the threshold.
    n = 2000
    ramp = torch.linspace(0, 1, 16).expand(n, 3, 16, 16).clone()
    ramp[:, 1:] *= 0.5  # colourful, so grayscale is visible
    images = (ramp * 255).round().to(torch.uint8)
    spec = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.3, jitter_p=0.0,
                    grayscale_p=0.4, normalize=False)  # fmt: skip
    (out,) = A.ViewPipeline([spec])(images, _gen(12))
    flipped = out[:, 0, 8, 0] > out[:, 0, 8, -1]
    grey = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert abs(_rate(flipped) - 0.3) <= _rate_tol(0.3, n)
    assert abs(_rate(grey) - 0.4) <= _rate_tol(0.4, n)


# ============================================================================================
# Pipeline contract
# ============================================================================================

SIMCLR = ViewSpec(count=2, size=32, interpolation="bicubic", brightness=0.8, contrast=0.8,
                  saturation=0.8, hue=0.2, blur_p=0.5, normalize=False)  # fmt: skip


def _uint8(b: int = 8, c: int = 3, h: int = 48, w: int = 40, seed: int = 0) -> Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=_gen(seed))


def test_parameters_vary_within_one_batch() -> None:
    spec = ViewSpec(size=32, blur_p=0.5, hue=0.2)
    images = _uint8(b=32)
    p = A.ViewPipeline([spec]).sample(spec, images, _gen(13))
    assert p.flip is not None and p.jitter_factors is not None and p.blur_sigma is not None
    assert len({tuple(b) for b in p.boxes.tolist()}) > 24
    assert 0 < int(p.flip.sum()) < 32
    applied = p.jitter_factors[:, 0] != 1
    for k in range(4):
        assert len(set(p.jitter_factors[applied, k].tolist())) == int(applied.sum())
    assert len(set(p.blur_sigma.tolist())) == 32
    # the same image everywhere still gives a different view per sample
    same = images[:1].expand(32, -1, -1, -1).contiguous()
    (out,) = A.ViewPipeline([spec])(same, _gen(13))
    flat = out.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 0


def test_multicrop_shapes_and_dtypes() -> None:
    globals_ = ViewSpec(count=2, size=32, scale=(0.4, 1.0), blur_p=1.0)
    locals_ = ViewSpec(count=4, size=16, scale=(0.05, 0.4), blur_p=0.5, solarize_p=0.2)
    pipe = A.ViewPipeline([globals_, locals_])
    views = pipe(_uint8(b=5), _gen(14))
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 4
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in views)
    assert all(torch.isfinite(v).all() for v in views)
    # views of one kind are different draws, not copies
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[2], views[3])


def test_unnormalised_values_stay_in_unit_range() -> None:
    (a, b) = A.ViewPipeline([SIMCLR])(_uint8(b=16), _gen(15))
    for v in (a, b):
        assert v.min() >= 0.0 and v.max() <= 1.0


def test_single_channel_input() -> None:
    spec = ViewSpec(size=16, hue=0.3, blur_p=0.5, normalize=False)
    gray = _uint8(b=6, c=1, h=20, w=20)
    (out,) = A.ViewPipeline([spec])(gray, _gen(16))
    assert out.shape == (6, 3, 16, 16)
    # a grey image stays grey through every op
    _close(out[:, 0], out[:, 1], OP_TOL)
    _close(out[:, 1], out[:, 2], OP_TOL)
    # and equals the same pipeline on the image repeated to RGB (luma weights sum to 0.9999)
    (rgb,) = A.ViewPipeline([spec])(gray.expand(-1, 3, -1, -1), _gen(16))
    _close(out, rgb, 1e-3)


def test_float_input_and_bad_input() -> None:
    x8 = _uint8(b=4)
    (a,) = A.ViewPipeline([SIMCLR.model_copy(update={"count": 1})])(x8, _gen(17))
    (b,) = A.ViewPipeline([SIMCLR.model_copy(update={"count": 1})])(x8.float() / 255, _gen(17))
    _close(a, b, OP_TOL)
    pipe = A.ViewPipeline([SIMCLR])
    with pytest.raises(ValueError):
        pipe(torch.zeros(4, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError):
        pipe(torch.zeros(4, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError):
        A.ViewPipeline([])


def test_reproducible_with_seeded_generator_and_resumable() -> None:
    pipe = A.ViewPipeline([SIMCLR, ViewSpec(count=2, size=16, solarize_p=0.3)])
    images = _uint8(b=6)
    first = pipe(images, _gen(18))
    again = pipe(images, _gen(18))
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    other = pipe(images, _gen(19))
    assert not torch.equal(first[0], other[0])
    # resume: a generator restored from a saved state continues the same stream
    g = _gen(20)
    pipe(images, g)
    state = g.get_state()
    nxt = pipe(images, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert all(torch.equal(x, y) for x, y in zip(nxt, pipe(images, g2), strict=True))
    # without a generator: torch's global RNG, seeded the usual way
    torch.manual_seed(3)
    a = pipe(images)
    torch.manual_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(a, pipe(images), strict=True))


def test_chunking_does_not_change_results() -> None:
    images = _uint8(b=10)
    whole = A.ViewPipeline([SIMCLR], chunk_bytes=1 << 40)(images, _gen(21))
    sliced = A.ViewPipeline([SIMCLR], chunk_bytes=1)(images, _gen(21))  # one sample a slice
    for x, y in zip(whole, sliced, strict=True):
        _close(x, y, 1e-6)


class _OpRecorder(TorchDispatchMode):
    """Records every aten op the pipeline dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _recorded_ops(b: int) -> list[str]:
    spec = ViewSpec(size=16, scale=(0.08, 1.0), hue=0.2, blur_p=0.5, solarize_p=0.2)
    pipe = A.ViewPipeline([spec], chunk_bytes=1 << 40)
    images = _uint8(b=b, h=24, w=24)
    with _OpRecorder() as rec:
        pipe(images, _gen(22))
    return rec.ops


def test_no_per_sample_loop() -> None:
    small, large = _recorded_ops(3), _recorded_ops(40)
    # the op sequence does not depend on the batch size: nothing loops over samples
    assert small == large
    # and nothing that needs the values on the host (tensor repeats, mask indexing)
    assert not {"aten.repeat_interleave", "aten.nonzero", "aten.masked_select"} & set(small)


def test_no_host_sync_runs_on_meta_tensors() -> None:
    # Meta tensors have shapes but no data: .item(), .tolist(), bool(tensor), mask
    # indexing and anything else that reads values on the host raises. The pipeline
    # running end to end on them proves it never waits for the device.
    specs = [
        ViewSpec(count=2, size=16, hue=0.2, blur_p=0.5, solarize_p=0.2),
        ViewSpec(count=3, size=8, interpolation="bicubic", grayscale_first=True),
    ]
    images = torch.empty(4, 3, 24, 20, dtype=torch.uint8, device="meta")
    views = A.ViewPipeline(specs)(images)
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    with pytest.raises(NotImplementedError):
        torch.empty(3, device="meta").tolist()  # the premise


def test_channels_last_input() -> None:
    images = _uint8(b=4)
    spec = SIMCLR.model_copy(update={"count": 1})
    (a,) = A.ViewPipeline([spec])(images, _gen(23))
    (b,) = A.ViewPipeline([spec])(images.contiguous(memory_format=torch.channels_last), _gen(23))
    assert torch.equal(a, b)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_cuda_matches_cpu_for_the_same_parameters() -> None:
    dev = torch.device("cuda")
    x = _images(b=16)
    boxes = G.sample_crop_boxes(16, 40, 52, generator=_gen(24))
    flip = torch.arange(16) % 2 == 0
    factors, order = P.sample_jitter(16, 0.8, 0.8, 0.8, 0.2, generator=_gen(24))
    sigma = S.sample_uniform(16, 0.1, 2.0, generator=_gen(24))
    mask = torch.arange(16) % 3 == 0

    def run(d: torch.device) -> Tensor:
        y = G.resized_crop(x.to(d), boxes.to(d), 24, "bicubic", flip.to(d)).clamp(0, 1)
        y = P.color_jitter(y, factors.to(d), order.to(d))
        y = P.random_grayscale(y, mask.to(d))
        y = P.gaussian_blur(y, sigma.to(d), 5, ~mask.to(d))
        return P.solarize(y, mask.to(d), 0.5).cpu()

    # TF32 matmuls (if a caller enabled them) would exceed OP_TOL; the default is off.
    _close(run(dev), run(torch.device("cpu")), 1e-4)


@cuda
def test_cuda_pipeline_never_synchronises() -> None:
    dev = torch.device("cuda")
    pipe = A.ViewPipeline([SIMCLR, ViewSpec(count=4, size=16, solarize_p=0.2)])
    images = _uint8(b=32).to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    pipe(images, gen)  # first call: builds the cached normalisation constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        views = pipe(images, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" and v.dtype == torch.float32 for v in views)
