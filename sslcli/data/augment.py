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

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sslcli.data.crops import Crops
from sslcli.data.geometric import crop_taps, resample, sample_crop_boxes, to_float
from sslcli.data.photometric import (
    JitterBlend,
    JitterHue,
    blur_kernel_size,
    blur_kernels,
    blur_with_kernels,
    jitter_,
    jitter_schedule,
    random_grayscale_,
    sample_jitter,
    solarize_,
    solarize_threshold,
)
from sslcli.data.sampling import per_sample, sample_mask, sample_uniform
from sslcli.data.views import ViewSpec, expand

# Default bound on the float32 bytes of one view slice rendered at a time on the CPU (see
# ViewPipeline). Measured on a 2-core EPYC at 64 px: 4 MiB slices take half the CPU time of
# whole-batch tensors; much smaller ones lose to per-op dispatch overhead.
CPU_CHUNK_BYTES = 4 << 20


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
    jitter: list[JitterBlend | JitterHue] = field(default_factory=list)
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
        flip = None if p.flip is None else per_sample(p.flip)
        plan = _Plan(rows=None, cols=None, flip=flip)
    else:
        size = (spec.size, spec.size)
        rows, cols = crop_taps(p.boxes, in_hw, size, spec.interpolation, p.flip)
        plan = _Plan(rows=rows, cols=cols)
    if p.gray is not None:
        plan.gray = per_sample(p.gray.to(torch.float32))
    if p.jitter_factors is not None and p.jitter_order is not None:
        plan.jitter = jitter_schedule(p.jitter_factors, p.jitter_order, _jitter_active(spec))
    if p.blur is not None and p.blur_sigma is not None:
        k = blur_kernel_size(spec.size, spec.blur_kernel_frac)
        plan.blur = blur_kernels(p.blur_sigma, k, p.blur)
    if p.solarize is not None:
        plan.solarize = solarize_threshold(p.solarize, spec.solarize_threshold)
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
        x = resample(source, plan.rows, plan.cols)  # fresh: everything below is in place
        if static.bicubic:
            x = x.clamp_(0.0, 1.0)  # cubic overshoot; torchvision's uint8 path clamps too
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1).contiguous()
    if plan.gray is not None and static.gray_first:
        x = random_grayscale_(x, plan.gray)
    if plan.jitter:
        x = jitter_(x, plan.jitter, static.contrast, static.saturation)
    if plan.gray is not None and not static.gray_first:
        x = random_grayscale_(x, plan.gray)
    if plan.blur is not None:
        x = blur_with_kernels(x, plan.blur)
    if plan.solarize is not None:
        x = solarize_(x, plan.solarize)
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
        source = to_float(images)
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
            out.append(self._view(to_float(v), spec, generator, crop=False))
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
