"""How a dry run (``ssl train --dry-run``) differs from the run it describes.

Apart from :mod:`sslcli.engine.plan` so that the trainer can take a :class:`DryRun` without
importing the module that reads the trainer back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sslcli.data.images import ImageDataset


@dataclass
class DryRun:
    """How a dry run differs from the run it describes."""

    processes: int = 1
    """Plan for this many processes (GPUs): the per-process batch and memory follow."""
    images: int | None = None
    """Plan for a training set of this many images instead of opening the data."""
    note: str | None = None
    """Why the plan differs from the command (said in the output)."""

    def nominal_dataset(self, load_size: int) -> ImageDataset:
        assert self.images is not None
        return NominalDataset(self.images, load_size)


class NominalDataset(ImageDataset):
    """A stand-in of ``n`` unlabelled images for a dry run that does not open the data."""

    def __init__(self, n: int, load_size: int) -> None:
        self.name = f"nominal:{n}"
        self.split = "train"
        self.classes = None
        self.load_size = load_size
        self.labels = torch.full((n,), -1, dtype=torch.int64)
        self.in_memory = False

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        raise RuntimeError("a nominal dataset has no images (dry run)")
