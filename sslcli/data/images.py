"""The dataset classes: every one yields ``(uint8 [3, S, S], label, index)``.

:class:`ArrayImageDataset` serves a uint8 array store (digits, CIFAR, STL-10, IDX),
:class:`FileImageDataset` decodes image files lazily (in DataLoader workers), with the
unreadable-file rules of :mod:`sslcli.data.badfiles`, and :class:`LabelledSubset` keeps
the labelled rows of another dataset. :func:`sslcli.data.datasets.open_dataset` picks and
builds one from a data spec.
"""

from __future__ import annotations

import operator
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sslcli.data import formats
from sslcli.data.badfiles import BadFiles
from sslcli.data.decode import JPEG_EXTENSIONS, decode_pil, probe_image, to_square
from sslcli.errors import DataError

T = TypeVar("T")

# Binary datasets are resized once at open time when the result fits in this many bytes
# (CIFAR at 64 px: 614 MB, does not; MNIST at 32 px: 61 MB, does), else per item in the
# workers. Both paths run the same function, so the images are identical either way.
PRECOMPUTE_MAX_BYTES = 256 << 20
# Header checks cost ~0.1 ms per file: a second for 10k files is worth failing fast; for
# ImageNet-sized folders the decode-time fallback alone handles broken files.
PROBE_MAX_FILES = 10_000
# Upper bound for the optional decoded-image cache (``cache=True``).
CACHE_MAX_BYTES = 4 << 30

# --------------------------------------------------------------------------------------------
# Dataset classes
# --------------------------------------------------------------------------------------------


class ImageDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Base class: ``ds[i] -> (uint8 [3, S, S], label or -1, index)``.

    Attributes: ``name`` (a spec that reopens it, e.g. ``"cifar10:/data/cifar"``),
    ``split``, ``classes`` (None when unlabelled), ``load_size`` (S), ``labels`` (int64
    tensor, -1 for unlabelled rows; read it instead of decoding images) and ``in_memory``
    (True when an item costs only a memory copy, so DataLoader workers do not pay off).
    """

    name: str
    split: str
    classes: list[str] | None
    load_size: int
    labels: torch.Tensor
    in_memory: bool = False

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    def check_index(self, i: int) -> int:
        """``i`` as a position in ``0..len-1`` (negative counts from the end), or IndexError."""
        i = operator.index(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        return i

    def labelled_indices(self) -> torch.Tensor:
        """Indices of the rows with a label (all of them for a fully labelled split)."""
        return torch.nonzero(self.labels >= 0).flatten()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes) if self.classes else None}, load_size={self.load_size})"
        )


class ArrayImageDataset(ImageDataset):
    """Images from a uint8 array store (digits, CIFAR, STL-10, IDX)."""

    def __init__(
        self,
        name: str,
        split: str,
        store: formats.ArrayStore,
        labels: np.ndarray,
        classes: list[str] | None,
        load_size: int,
        *,
        precompute: bool | None = None,
    ) -> None:
        self.name, self.split, self.classes, self.load_size = name, split, classes, load_size
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        # Kept only when items are read from it one by one (see the end of __init__).
        self.store: formats.ArrayStore | None = store
        n, c, h, w = store.shape
        s = load_size
        if precompute is None:
            precompute = n * c * s * s <= PRECOMPUTE_MAX_BYTES
        # Grey images stay one channel in memory (a third of the bytes) and are replicated
        # to RGB per item.
        self._images: torch.Tensor | None = None
        if (h, w) == (s, s) and isinstance(store, formats.MemoryStore):
            self._images = _tensor(store.images)
        elif precompute:
            out = torch.empty((n, c, s, s), dtype=torch.uint8)
            step = max(1, (64 << 20) // max(1, c * (h * w + s * s)))  # ~64 MB per chunk
            for a in range(0, n, step):
                b = min(n, a + step)
                out[a:b] = to_square(_tensor(store.chunk(a, b)), s)
            self._images = out
        self.in_memory = self._images is not None
        if self.in_memory:
            # Everything is in _images now; dropping the store keeps a dataset pickled for
            # "spawn" workers from carrying the raw arrays a second time.
            self.store = None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = self.check_index(i)
        if self._images is not None:
            x = self._images[i]
        else:
            assert self.store is not None
            x = to_square(_tensor(self.store.get(i)), self.load_size)
        # Always a fresh tensor, never a view: a view would drag the whole array's storage
        # into shared memory when a worker sends it to the main process.
        x = x.repeat(3, 1, 1) if x.shape[0] == 1 else x.clone()
        return x, int(self.labels[i]), i

    @property
    def images(self) -> torch.Tensor | None:
        """The whole split as uint8 [N, C, S, S] (C = 1 for grey data) when it is held in
        memory, else None. Read-only: other holders (a device cache) index it directly."""
        return self._images

    @property
    def get_batch(self) -> BatchFn:
        """``get_batch(idx) -> (uint8 [B, 3, S, S], labels [B], idx)`` in one gather.

        Only in-memory datasets have it (the attribute is missing otherwise, so
        ``getattr(ds, "get_batch", None)`` tells callers whether the fast path exists):
        training and feature extraction then index the array directly instead of
        collating items one by one.
        """
        if self._images is None:
            raise AttributeError("get_batch: this dataset is not held in memory")
        return self._get_batch

    def _get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self._images is not None
        idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"index out of range for {n} images")
        idx = torch.where(idx < 0, idx + n, idx)
        x = self._images[idx]  # advanced indexing copies: never a view of the array
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1).contiguous()
        return x, self.labels[idx], idx


BatchFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without its warning for read-only arrays (gzip IDX data and
    memory maps are read-only; nothing here ever writes to them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class _PathTable:
    """Many paths in two numpy arrays instead of a list of ``str``.

    Touching a Python object updates its reference count, which un-shares the memory page
    it lives on in every forked DataLoader worker: a list of a million paths slowly gets
    copied into each worker. Two flat arrays are never written to, so they stay shared.
    """

    def __init__(self, paths: list[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._off = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._off[1:])

    def __len__(self) -> int:
        return len(self._off) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._buf[self._off[i] : self._off[i + 1]].tobytes())

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))


def _shm_free_bytes() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


class FileImageDataset(ImageDataset):
    """Image files decoded lazily (in DataLoader workers) with PIL.

    Unreadable files follow :mod:`sslcli.data.badfiles`: ``bad_files`` is this dataset's
    record, read through :meth:`is_bad`, :meth:`mark_bad` and :attr:`bad_count`. Header
    checks at open time drop files that are not images at all when the folder holds at
    most :data:`PROBE_MAX_FILES` (``probe``). :meth:`read_encoded` returns the encoded
    file for GPU decoding (``all_jpeg`` says whether that path applies); the decoded image
    must then go through :func:`sslcli.data.decode.to_square`.
    """

    def __init__(
        self,
        name: str,
        split: str,
        paths: list[str],
        labels: list[int] | np.ndarray,
        classes: list[str] | None,
        load_size: int,
        *,
        max_bad_fraction: float = 0.01,
        probe: bool | None = None,
        cache: bool = False,
    ) -> None:
        self.name, self.split, self.classes, self.load_size = name, split, classes, load_size
        labels_arr = np.asarray(labels, dtype=np.int64)
        self.bad_files = BadFiles(name, split, len(paths), max_bad_fraction)
        if probe is None:
            probe = len(paths) <= PROBE_MAX_FILES
        if probe:
            keep = []
            for k, p in enumerate(paths):
                reason = probe_image(p)
                if reason is None:
                    keep.append(k)
                else:
                    self.bad_files.drop_at_open(p, reason)
            self.bad_files.check()
            paths = [paths[k] for k in keep]
            labels_arr = labels_arr[keep]
        if not paths:
            raise DataError(f"no readable images in {name} ({split})")
        self._paths = _PathTable(paths)
        self.labels = torch.from_numpy(labels_arr)
        self.all_jpeg = all(os.path.splitext(p)[1].lower() in JPEG_EXTENSIONS for p in paths)
        self.bad_files.track(len(paths))
        self._cache: torch.Tensor | None = None
        self._cached: torch.Tensor | None = None
        if cache:
            self._init_cache()

    def _init_cache(self) -> None:
        n, s = len(self), self.load_size
        need = n * 3 * s * s
        free = _shm_free_bytes()
        if need > CACHE_MAX_BYTES or (free is not None and need > free // 2):
            warnings.warn(
                f"not caching {self.name}: {need / 2**20:.0f} MiB of decoded images exceed "
                f"the cache limit or half the free shared memory",
                stacklevel=3,
            )
            return
        # Shared, so images decoded by any worker are reused by all of them next epoch.
        self._cache = torch.empty((n, 3, s, s), dtype=torch.uint8).share_memory_()
        self._cached = torch.zeros(n, dtype=torch.bool).share_memory_()

    @property
    def decoded_cache(self) -> torch.Tensor | None:
        """The shared uint8 [N, 3, S, S] cache of decoded squares (``cache=True``), row j
        filled once file j has been read; None without a cache."""
        return self._cache

    @property
    def bad_at_open(self) -> list[str]:
        """Paths dropped by the header check when the dataset was opened."""
        return self.bad_files.at_open

    @property
    def bad_count(self) -> int:
        """Files found unreadable so far, at open time and by any reader."""
        return self.bad_files.count

    def is_bad(self, i: int) -> bool:
        return self.bad_files.is_bad(self.check_index(i))

    def mark_bad(self, i: int, reason: str) -> None:
        """Record file ``i`` as unreadable, as a worker would (warning, shared mask,
        ``max_bad_fraction`` check): for readers outside the workers (the GPU decoder)."""
        i = self.check_index(i)
        self.bad_files.mark(i, self._paths[i], reason, stacklevel=2)

    def path(self, i: int) -> str:
        return self._paths[self.check_index(i)]

    def read_bytes(self, i: int) -> bytes:
        """The encoded file ``i`` (for ``torchvision.io.decode_jpeg(..., device="cuda")``)."""
        with open(self.path(i), "rb") as f:
            return f.read()

    def read_encoded(self, i: int) -> tuple[bytes, int, int]:
        """``(encoded file, label, index)`` of file ``i``, or of the next file that can be
        read when it cannot (marked bad on the way; the content is checked by the decoder)."""
        data, j = self.bad_files.first_readable(
            self.check_index(i), self.read_bytes, self.path, errors=(OSError,)
        )
        return data, int(self.labels[j]), j

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = self.check_index(i)
        if self._cached is not None and self._cached[i] and not self.bad_files.is_bad(i):
            assert self._cache is not None
            return self._cache[i].clone(), int(self.labels[i]), i
        x, y, j = self.read(i, self._decode_square)
        if self._cache is not None and self._cached is not None:
            self._cache[j] = x
            self._cached[j] = True
        return x, y, j

    def _decode_square(self, img: Image.Image) -> torch.Tensor:
        img.load()  # the full decode first, as decode_image_file does
        return decode_pil(img, self.load_size)

    def read(self, i: int, decode: Callable[[Image.Image], T]) -> tuple[T, int, int]:
        """``(decode(opened image), label, index)`` of file ``i``, or of its substitute.

        The unreadable-file rules of :mod:`sslcli.data.badfiles`, for any decoding function
        (the square of :meth:`__getitem__`, the training crops of
        :class:`sslcli.data.crops.CropDataset`). ``decode`` gets the opened, not yet
        loaded image (so it may ``draft()``) and must load it fully; any exception it or
        PIL raises means "bad" (PIL raises many types for broken files).
        """

        def load(j: int) -> T:
            with Image.open(self._paths[j]) as img:
                return decode(img)

        x, j = self.bad_files.first_readable(self.check_index(i), load, self._paths.__getitem__)
        return x, int(self.labels[j]), j


class LabelledSubset(ImageDataset):
    """The labelled rows of another dataset, re-indexed ``0..n-1``."""

    def __init__(self, base: ImageDataset) -> None:
        self.base = base
        self.name, self.split, self.classes = base.name, base.split, base.classes
        self.load_size, self.in_memory = base.load_size, base.in_memory
        self.rows = base.labelled_indices()
        self.labels = base.labels[self.rows]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        i = self.check_index(i)
        x, y, _ = self.base[int(self.rows[i])]
        return x, y, i

    @property
    def get_batch(self) -> BatchFn:
        """The base dataset's fast path, re-indexed (missing when the base has none)."""
        base_get = getattr(self.base, "get_batch", None)
        if base_get is None:
            raise AttributeError("get_batch: the base dataset is not held in memory")

        def get(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            idx = torch.as_tensor(idx, dtype=torch.int64).flatten()
            x, y, _ = base_get(self.rows[idx])
            return x, y, idx

        return get
