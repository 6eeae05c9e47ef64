"""Small datasets decoded once into one uint8 tensor, on the CPU or the training device.

:class:`CachedDataset` serves them by indexing through ``get_batch``, the hook the trainer
already uses for in-memory data: no workers, no per-item Python, and no host-to-device
copy when the cache lives on the GPU.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sslcli.data.images import CACHE_MAX_BYTES, ArrayImageDataset, FileImageDataset, ImageDataset
from sslcli.errors import DataError


class CachedDataset(ImageDataset):
    """Every image of ``base`` decoded once into one uint8 tensor, served by indexing.

    Reuses what :mod:`sslcli.data.images` already holds instead of copying it: an
    in-memory array dataset (digits, CIFAR, small IDX) is indexed directly (on the CPU that
    is what its own ``get_batch`` does, so :func:`maybe_cache` leaves it alone), and a file
    dataset opened with ``cache=True`` is filled through its own shared-memory cache. Other
    datasets are decoded once through their own ``__getitem__`` (so corrupt-file rules,
    substitutes and warnings are the dataset's), in DataLoader workers when asked.

    ``device`` puts the cache on the training device: a CIFAR-10 training set at 32 px is
    150 MB, a trivial share of a GPU, and then a batch costs one gather kernel and no
    host-to-device copy at all.

    Items and ``get_batch`` rows follow ``base``: ``(uint8 [3, S, S], label, index)`` where
    ``index`` is the row actually served (a corrupt file's substitute, as in ``base``).
    """

    def __init__(
        self,
        base: ImageDataset,
        *,
        max_bytes: int = CACHE_MAX_BYTES,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
        chunk: int = 256,
    ) -> None:
        self.base = base
        self.name, self.split, self.classes = base.name, base.split, base.classes
        self.load_size = base.load_size
        self.in_memory = True
        self.device = torch.device(device)
        n, s = len(base), base.load_size
        images = _array_images(base)
        channels = int(images.shape[1]) if images is not None else 3
        self.nbytes = n * channels * s * s
        if self.nbytes > max_bytes:
            raise DataError(
                f"cannot cache {base.name} ({base.split}): {self.nbytes / 2**20:.0f} MiB of "
                f"decoded images exceed the {max_bytes / 2**20:.0f} MiB limit"
            )
        # source[i] = the row served for item i (i itself unless the file was unreadable).
        source = torch.arange(n)
        if images is None:
            images, source = _decode_all(base, num_workers, chunk)
        self._images = images.to(self.device)
        self._source = source.to(self.device)
        self._labels = base.labels.to(self.device)
        self.labels = base.labels

    @property
    def images(self) -> Tensor:
        """The cached split, uint8 [N, C, S, S] on the cache's device (C = 1 for grey data)."""
        return self._images

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        i = self.check_index(i)
        x, y, j = self.get_batch(torch.tensor([i]))
        return x[0], int(y[0]), int(j[0])

    def get_batch(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(uint8 [B, 3, S, S], labels [B], index [B])`` on the cache's device.

        ``idx`` is best already on that device (the trainer moves an epoch's order there
        once); a host index is pinned and copied without blocking, on the current stream,
        instead of a pageable copy that would wait for the device.
        """
        rows = self._source[index_on(idx, self.device)]
        x = self._images[rows]  # advanced indexing: a fresh tensor, never a view
        if x.shape[1] == 1:  # grey arrays stay one channel in memory, as in the dataset
            x = x.expand(-1, 3, -1, -1).contiguous()
        return x, self._labels[rows], rows


def index_on(idx: Tensor, device: torch.device) -> Tensor:
    """``idx`` on ``device``: as is when it is there already; from the host, through pinned
    memory with a non-blocking copy on the current stream (the caching host allocator keeps
    the pinned buffer until that stream has read it)."""
    idx = torch.as_tensor(idx)
    here = idx.device
    if here.type == device.type and (device.index is None or here.index == device.index):
        return idx
    if device.type == "cuda" and idx.device.type == "cpu":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def _array_images(base: ImageDataset) -> Tensor | None:
    """The decoded array an in-memory dataset already holds, or None."""
    return base.images if isinstance(base, ArrayImageDataset) else None


def _decode_all(base: ImageDataset, num_workers: int, chunk: int) -> tuple[Tensor, Tensor]:
    n, s = len(base), base.load_size
    shared = base.decoded_cache if isinstance(base, FileImageDataset) else None
    # A file dataset opened with cache=True fills its shared cache row j as its workers
    # decode; reading that tensor afterwards avoids holding every image twice.
    images = shared if shared is not None else torch.empty((n, 3, s, s), dtype=torch.uint8)
    source = torch.empty(n, dtype=torch.int64)
    loader = DataLoader(base, batch_size=chunk, shuffle=False, num_workers=num_workers)
    start = 0
    for x, _, j in loader:
        b = x.shape[0]
        images[j] = x
        source[start : start + b] = j
        start += b
    return images, source


def maybe_cache(
    ds: ImageDataset,
    *,
    max_bytes: int = CACHE_MAX_BYTES,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
) -> ImageDataset:
    """``CachedDataset(ds, ...)`` when it fits in ``max_bytes``, else ``ds`` with a warning.

    A dataset that already serves batches from host memory (``get_batch``, e.g. an
    in-memory array dataset) is returned as it is when ``device`` is the CPU: a cache
    would only copy it.
    """
    if torch.device(device).type == "cpu" and callable(getattr(ds, "get_batch", None)):
        return ds
    try:
        return CachedDataset(ds, max_bytes=max_bytes, device=device, num_workers=num_workers)
    except DataError as e:
        warnings.warn(f"{e}; reading images per batch instead", stacklevel=2)
        return ds


__all__ = ["CachedDataset", "index_on", "maybe_cache"]
