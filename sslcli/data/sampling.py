"""Per-sample random draws for the batched augmentation ops.

Every number comes from an explicit ``torch.Generator`` (or the global RNG of the images'
device when it is ``None``), drawn on the generator's own device: the trainer keeps one
generator per process and saves its state in checkpoints, so resumed runs draw the very
same views.
"""

from __future__ import annotations

import torch
from torch import Tensor


def per_sample(v: Tensor) -> Tensor:
    """[B] → [B, 1, 1, 1], to broadcast a per-sample parameter over an image batch."""
    return v.reshape(-1, 1, 1, 1)


def uniform01(
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
    return uniform01((n,), generator, device) < p


def sample_uniform(
    n: int,
    low: float,
    high: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Float32 [n] from U[low, high), torchvision's ``torch.empty(1).uniform_(low, high)``."""
    return low + (high - low) * uniform01((n,), generator, device)
