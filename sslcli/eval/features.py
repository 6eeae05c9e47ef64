"""Deterministic feature extraction for evaluation (no augmentation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sslcli.data.views import IMAGENET_MEAN, IMAGENET_STD


def eval_transform(
    images: Tensor,
    size: int,
    normalize: bool = True,
    mean: tuple[float, float, float] | Tensor = IMAGENET_MEAN,
    std: tuple[float, float, float] | Tensor = IMAGENET_STD,
) -> Tensor:
    """uint8 [B, C, H, W] -> float [B, 3, size, size]: resize (if needed), [0,1], normalise.

    ``mean``/``std`` may be [1, 3, 1, 1] tensors already on the device (a per-step caller
    avoids a blocking host-to-device copy that way).
    """
    x = images.float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    if normalize:
        m = mean if isinstance(mean, Tensor) else torch.tensor(mean, device=x.device)
        s = std if isinstance(std, Tensor) else torch.tensor(std, device=x.device)
        x = (x - m.view(1, 3, 1, 1)) / s.view(1, 3, 1, 1)
    return x


def iter_batches(dataset: Dataset, batch_size: int, num_workers: int = 0):  # type: ignore[no-untyped-def]
    """(uint8 images, labels, indices) in dataset order; uses ``get_batch`` when offered."""
    n = len(dataset)  # type: ignore[arg-type]
    get_batch = getattr(dataset, "get_batch", None)
    if callable(get_batch):
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            yield get_batch(idx)
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    yield from loader


@torch.no_grad()
def iter_features(
    embed: Callable[[Tensor], Tensor],
    dataset: Dataset,
    size: int,
    device: torch.device,
    batch_size: int = 256,
    normalize: bool = True,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    num_workers: int = 0,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """``(features [B, D] float32 CPU, labels [B], indices [B])`` batch by batch, in dataset
    order. ``indices`` are what the dataset returned: a file dataset that replaces an
    unreadable image by the next readable one says so by returning the substitute's index."""
    for images, y, idx in iter_batches(dataset, batch_size, num_workers):
        x = eval_transform(images.to(device), size, normalize, mean, std)
        yield embed(x).float().cpu(), torch.as_tensor(y), torch.as_tensor(idx)


def extract(
    embed: Callable[[Tensor], Tensor],
    dataset: Dataset,
    size: int,
    device: torch.device,
    batch_size: int = 256,
    normalize: bool = True,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    num_workers: int = 0,
) -> tuple[Tensor, Tensor]:
    """Features [N, D] (float32, CPU) and labels [N] of a whole dataset."""
    feats, labels = [], []
    for f, y, _ in iter_features(
        embed, dataset, size, device, batch_size, normalize, mean, std, num_workers
    ):
        feats.append(f)
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
