"""Learning-rate, weight-decay and momentum schedules: pure functions of the step."""

from __future__ import annotations

import math
from collections.abc import Sequence


def warmup_cosine(step: int, total: int, warmup: int, final_fraction: float = 0.0) -> float:
    """Multiplier in [final_fraction, 1]: linear warm-up from ~0, then half a cosine."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_step(
    step: int,
    steps_per_epoch: int,
    warmup: int,
    milestones: Sequence[float],
    gamma: float,
    factors: Sequence[float] | None = None,
) -> float:
    """Linear warm-up, then multiply by ``gamma`` at each milestone epoch passed; with
    ``factors`` (one per milestone, relative to the base lr), the factor of the latest
    milestone passed instead (InvaSpread: ×0.1, ×0.05, ×0.01 at 120, 160, 200)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    epoch = step / max(1, steps_per_epoch)
    if factors is None:
        return gamma ** sum(1 for m in milestones if epoch >= m)
    passed = [(m, f) for m, f in zip(milestones, factors, strict=True) if epoch >= m]
    return max(passed)[1] if passed else 1.0


def warmup_constant(step: int, warmup: int) -> float:
    return (step + 1) / warmup if warmup > 0 and step < warmup else 1.0


def cosine_increase(step: int, total: int, start: float, end: float = 1.0) -> float:
    """From ``start`` to ``end`` along half a cosine (BYOL/MoCo v3/DINO momentum):
    ``end - (end - start) * (cos(pi * step / total) + 1) / 2``."""
    t = min(1.0, step / max(1, total))
    return end - (end - start) * (math.cos(math.pi * t) + 1) / 2


def cosine_between(step: int, total: int, start: float, end: float) -> float:
    """Half a cosine from ``start`` to ``end`` (DINO's weight-decay schedule)."""
    t = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def linear_warmup_value(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear from ``start`` to ``end`` over ``warmup_steps``, then ``end`` (DINO's τ_t)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
