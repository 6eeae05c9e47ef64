"""Timing helpers shared by the benchmarks.

Every benchmark compares variants measured *interleaved in one process*: round after round,
each variant runs a block of steps, and the reported rate is the median over rounds. On a
machine shared with other jobs (or a GPU whose clocks drift) a slowdown then hits every
variant alike, so the ratios stay meaningful even when the absolute numbers move.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Run as `python benchmarks/bench_x.py` from a checkout without installing: make the
# repository root importable (sslcli, and the benchmarks package itself).
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on (goes next to every result)."""
    import torchvision

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        usable = os.cpu_count() or 1
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


@dataclass
class Variant:
    """One thing to time: ``step()`` does one unit of work of ``items`` images."""

    name: str
    step: Callable[[], object]
    items: int
    blocks: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    before: Callable[[], object] | None = None
    """Untimed set-up before each block (e.g. start a fresh DataLoader, as an epoch does)."""
    after: Callable[[], object] | None = None
    """Untimed tear-down after each block (e.g. stop its workers so they stop competing)."""

    @property
    def rate(self) -> float:
        """Median images per second over the timed blocks."""
        return self.items / statistics.median(self.blocks) if self.blocks else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-block rates: how noisy the machine was."""
        if len(self.blocks) < 2:
            return 0.0
        rates = [self.items / b for b in self.blocks]
        return (max(rates) - min(rates)) / statistics.median(rates)


def interleaved(
    variants: Sequence[Variant],
    device: torch.device,
    *,
    steps: int,
    rounds: int,
    warmup: int,
    log: Callable[[str], None] | None = None,
) -> None:
    """Time ``steps`` calls of each variant per round, ``rounds`` times, interleaved.

    The order rotates every round so no variant always follows the same neighbour (caches,
    allocator state and CPU frequency carry over from one block to the next).
    """
    for v in variants:
        if v.before is not None:
            v.before()
        for _ in range(warmup):
            v.step()
        sync(device)
        if v.after is not None:
            v.after()
    for r in range(rounds):
        k = r % len(variants)
        for v in list(variants[k:]) + list(variants[:k]):
            if v.before is not None:
                v.before()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                v.step()
            sync(device)
            v.blocks.append((time.perf_counter() - t0) / steps)
            if v.after is not None:
                v.after()
        if log is not None:
            log(
                f"round {r + 1}/{rounds}: "
                + ", ".join(f"{v.name} {v.rate:.1f}/s" for v in variants)
            )


def paired_ratio(v: Variant, base: Variant) -> float:
    """Median over rounds of (v's rate / base's rate) within the same round.

    Blocks of one round run back to back, so a load spike from another job mostly hits
    both; the median of per-round ratios is steadier than the ratio of two medians.
    """
    ratios = [b / a for a, b in zip(v.blocks, base.blocks, strict=False)]
    return statistics.median(ratios) if ratios else float("nan")


def table(rows: list[list[str]], headers: list[str]) -> str:
    """A plain Markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"
