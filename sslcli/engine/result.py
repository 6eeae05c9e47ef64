"""What :meth:`sslcli.engine.trainer.Trainer.fit` returns to ``sslcli.train``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    knn_trained: float | None = None
    knn_random: float | None = None
    images_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    """This process's rank (under torchrun, only rank 0's result carries the metrics)."""
