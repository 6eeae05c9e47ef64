"""Readers for the binary dataset formats: CIFAR python batches, STL-10 and IDX files.

Each reader returns an :class:`ArraySplit`: an :class:`ArrayStore` of uint8 images shaped
``[N, C, H, W]`` (C is 1 or 3) plus int64 labels. Stores are either in memory (CIFAR, gzip
IDX) or memory-mapped and opened lazily in every process that touches them (STL-10's
2.7 GB unlabelled split, plain IDX), so a DataLoader worker never receives a pickled copy
of the whole file.

Every malformed file — truncated, wrong magic number, sizes that do not add up, a pickle
that refers to anything but numpy arrays — raises a one-line :class:`DataError` that names
the file.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sslcli.errors import DataError

# --------------------------------------------------------------------------------------------
# Array stores
# --------------------------------------------------------------------------------------------


class ArrayStore:
    """Random access to ``N`` uint8 images ``[C, H, W]`` without assuming where they live."""

    shape: tuple[int, int, int, int]  # N, C, H, W as yielded by get()

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        n, c, h, w = self.shape
        return n * c * h * w

    def get(self, i: int) -> np.ndarray:
        """Image ``i`` as a contiguous uint8 array ``[C, H, W]`` (a copy, safe to keep)."""
        raise NotImplementedError

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Images ``start:stop`` as a contiguous uint8 array ``[n, C, H, W]``."""
        raise NotImplementedError


class MemoryStore(ArrayStore):
    """Images already in memory as one ``[N, C, H, W]`` uint8 array."""

    def __init__(self, images: np.ndarray) -> None:
        assert images.dtype == np.uint8 and images.ndim == 4
        self.images = images
        self.shape = tuple(images.shape)  # type: ignore[assignment]

    def get(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(self.images[i]).copy()

    def chunk(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self.images[start:stop])


class MemmapStore(ArrayStore):
    """Images in a raw uint8 file, mapped on first access in each process.

    ``transpose_hw`` handles STL-10, whose images are stored column-major.
    """

    def __init__(
        self, path: Path, offset: int, disk_shape: tuple[int, int, int, int], transpose_hw: bool
    ) -> None:
        self.path = path
        self.offset = offset
        self.disk_shape = disk_shape
        self.transpose_hw = transpose_hw
        n, c, a, b = disk_shape
        self.shape = (n, c, b, a) if transpose_hw else disk_shape
        self._mm: np.memmap | None = None

    def _map(self) -> np.memmap:
        if self._mm is None:
            self._mm = np.memmap(
                self.path, dtype=np.uint8, mode="r", offset=self.offset, shape=self.disk_shape
            )
        return self._mm

    def __getstate__(self) -> dict[str, Any]:
        # Pickling a memmap copies the whole file into the pickle; workers started with
        # "spawn" re-map the file instead.
        state = dict(self.__dict__)
        state["_mm"] = None
        return state

    def chunk(self, start: int, stop: int) -> np.ndarray:
        block = np.asarray(self._map()[start:stop])
        if self.transpose_hw:
            block = block.transpose(0, 1, 3, 2)
        return np.ascontiguousarray(block)

    def get(self, i: int) -> np.ndarray:
        return self.chunk(i, i + 1)[0]


class ConcatStore(ArrayStore):
    """Several stores of equal image shape, one after the other."""

    def __init__(self, parts: Sequence[ArrayStore]) -> None:
        shapes = {p.shape[1:] for p in parts}
        assert len(shapes) == 1, shapes
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *self.parts[0].shape[1:])  # type: ignore[assignment]

    def _locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def get(self, i: int) -> np.ndarray:
        k, j = self._locate(i)
        return self.parts[k].get(j)

    def chunk(self, start: int, stop: int) -> np.ndarray:
        out = []
        for k, part in enumerate(self.parts):
            lo, hi = int(self.starts[k]), int(self.starts[k + 1])
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out.append(part.chunk(a - lo, b - lo))
        return np.concatenate(out) if len(out) != 1 else out[0]


@dataclass
class ArraySplit:
    """One split of a binary dataset."""

    store: ArrayStore
    labels: np.ndarray  # int64 [N], -1 where unlabelled
    classes: list[str] | None
    files: list[Path]  # where it came from, for describe() and error messages


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python batches
# --------------------------------------------------------------------------------------------

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR pickle may name, looked up from numpy itself.

    numpy 2 moved ``numpy.core`` to ``numpy._core``; asking numpy which functions its own
    pickles use (instead of importing by name) works on both and avoids the deprecated
    import. Both spellings are accepted because the official files were written by numpy 1.
    """
    arr = np.zeros(1, dtype=np.uint8)
    reconstruct = arr.__reduce__()[0]
    frombuffer = arr.__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2.
        ("_codecs", "encode"): __import__("codecs").encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and nothing else.

    A pickle can call any importable function while loading; a downloaded "CIFAR" file
    could therefore run code. Only the handful of numpy constructors an array needs are
    resolvable here, so a hostile file fails with an error instead.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def load_restricted_pickle(path: Path) -> Any:
    """Load a pickle that may contain only builtins containers and numpy arrays."""
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official files were written by Python 2, whose str
            # (keys, file names, raw array data) must arrive as bytes.
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception as e:  # EOFError, UnpicklingError, ValueError... all mean "bad file"
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"corrupt or not a CIFAR python batch: {path} ({detail})") from None


def _str_keys(d: Any, path: Path) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise DataError(f"corrupt CIFAR batch {path}: expected a dict, got {type(d).__name__}")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


def _names(values: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch file -> (uint8 ``[N, 3, 32, 32]``, int64 ``[N]``)."""
    d = _str_keys(load_restricted_pickle(path), path)
    if "data" not in d or label_key not in d:
        raise DataError(f"corrupt CIFAR batch {path}: needs keys 'data' and '{label_key}'")
    data, labels = d["data"], np.asarray(d[label_key])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        raise DataError(f"corrupt CIFAR batch {path}: 'data' is not a uint8 array")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"corrupt CIFAR batch {path}: 'data' has shape {data.shape}, not (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise DataError(f"corrupt CIFAR batch {path}: {len(labels)} labels for {len(data)} images")
    # Rows are the red, green then blue 32x32 planes, each row-major: a plain reshape.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar_meta(path: Path, key: str) -> list[str] | None:
    if not path.is_file():
        return None
    d = _str_keys(load_restricted_pickle(path), path)
    return _names(d[key]) if key in d else None


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(
            f"corrupt labels in {path}: values {labels.min()}..{labels.max()} "
            f"for {n_classes} classes"
        )


def read_cifar(root: Path, variant: str, split: str) -> ArraySplit:
    """CIFAR-10 (``data_batch_*`` / ``test_batch``) or CIFAR-100 (``train`` / ``test``)."""
    if variant == "cifar10":
        files = cifar10_batches(root, split)
        classes = read_cifar_meta(root / "batches.meta", "label_names") or CIFAR10_CLASSES
        label_key = "labels"
    else:
        files = [root / split] if (root / split).is_file() else []
        classes = read_cifar_meta(root / "meta", "fine_label_names") or [str(k) for k in range(100)]
        label_key = "fine_labels"
    if not files:
        raise DataError(f"{variant} at {root} has no {split} split")
    parts = [read_cifar_batch(f, label_key) for f in files]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts])
    for f, (_, y) in zip(files, parts, strict=True):
        _check_labels(y, len(classes), f)
    return ArraySplit(MemoryStore(images), labels, classes, files)


def cifar10_batches(root: Path, split: str) -> list[Path]:
    if split == "test":
        return [root / "test_batch"] if (root / "test_batch").is_file() else []
    found = [p for p in root.glob("data_batch_*") if p.is_file() and p.name[11:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[11:]))


# --------------------------------------------------------------------------------------------
# STL-10 binaries
# --------------------------------------------------------------------------------------------

STL10_CLASSES = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
]  # fmt: skip
_STL_SIDE = 96
_STL_BYTES = 3 * _STL_SIDE * _STL_SIDE


def _stl_images(path: Path) -> MemmapStore:
    size = path.stat().st_size
    if size == 0 or size % _STL_BYTES:
        raise DataError(
            f"corrupt STL-10 file {path}: {size} bytes is not a multiple of one "
            f"96x96x3 image ({_STL_BYTES} bytes)"
        )
    n = size // _STL_BYTES
    # Each image is three planes stored column-major (Fortran order): on disk the axes
    # are [N, C, W, H], hence the transpose when reading.
    return MemmapStore(path, 0, (n, 3, _STL_SIDE, _STL_SIDE), transpose_hw=True)


def _stl_labels(path: Path, n: int, n_classes: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"STL-10 labels missing: {path}")
    y = np.fromfile(path, dtype=np.uint8).astype(np.int64)
    if len(y) != n:
        raise DataError(f"corrupt STL-10 labels {path}: {len(y)} labels for {n} images")
    y -= 1  # stored 1..10
    _check_labels(y, n_classes, path)
    return y


def stl10_classes(root: Path) -> list[str]:
    names_file = root / "class_names.txt"
    if names_file.is_file():
        names = [s.strip() for s in names_file.read_text(errors="replace").splitlines()]
        names = [s for s in names if s]
        if names:
            return names
    return list(STL10_CLASSES)


def read_stl10(root: Path, split: str) -> ArraySplit:
    """STL-10. ``train`` = the 5,000 labelled images then the 100,000 unlabelled ones
    (label -1), so that self-supervised training sees all of them and the labelled ones
    keep indices ``0..4999``; ``test`` = the 8,000 labelled test images."""
    classes = stl10_classes(root)
    parts: list[ArrayStore] = []
    labels: list[np.ndarray] = []
    files: list[Path] = []
    names = [("train", True), ("unlabeled", False)] if split == "train" else [("test", True)]
    for stem, labelled in names:
        x = root / f"{stem}_X.bin"
        if not x.is_file():
            continue
        store = _stl_images(x)
        parts.append(store)
        files.append(x)
        if labelled:
            labels.append(_stl_labels(root / f"{stem}_y.bin", len(store), len(classes)))
            files.append(root / f"{stem}_y.bin")
        else:
            labels.append(np.full(len(store), -1, dtype=np.int64))
    if not parts:
        raise DataError(f"stl10 at {root} has no {split} split")
    store_all = parts[0] if len(parts) == 1 else ConcatStore(parts)
    return ArraySplit(store_all, np.concatenate(labels), classes, files)


# --------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, KMNIST...)
# --------------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def _idx_header(head: bytes, path: Path) -> tuple[list[int], int]:
    """Parse magic + dimensions; return (dims, header length)."""
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"not an IDX file (bad magic number): {path}")
    if head[2] != _IDX_UBYTE:
        raise DataError(f"unsupported IDX element type 0x{head[2]:02x} (only uint8): {path}")
    ndim = head[3]
    end = 4 + 4 * ndim
    if ndim == 0 or len(head) < end:
        raise DataError(f"corrupt IDX header: {path}")
    dims = [int.from_bytes(head[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    return dims, end


def _read_idx_raw(path: Path) -> tuple[list[int], np.ndarray | MemmapStore]:
    """Dimensions and data; gzip files are decompressed to memory, plain ones mapped."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                buf = f.read()
            dims, start = _idx_header(buf[:64], path)
            body = np.frombuffer(buf, dtype=np.uint8, offset=start)
        else:
            with open(path, "rb") as f:
                head = f.read(64)
            dims, start = _idx_header(head, path)
            body_len = path.stat().st_size - start
            body = None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    expected = int(np.prod(dims))
    got = len(body) if body is not None else body_len
    if got != expected:
        raise DataError(
            f"corrupt IDX file {path}: header says {'x'.join(map(str, dims))} "
            f"({expected} bytes) but it holds {got}"
        )
    if body is not None:
        return dims, body.reshape(dims)
    if len(dims) != 3:
        return dims, np.fromfile(path, dtype=np.uint8, offset=start).reshape(dims)
    n, h, w = dims
    return dims, MemmapStore(path, start, (n, 1, h, w), transpose_hw=False)


def idx_file(root: Path, prefix: str, kind: str) -> Path | None:
    """``train-images-idx3-ubyte[.gz]`` and the ``train-images.idx3-ubyte`` variant."""
    ndim = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            p = root / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}"
            if p.is_file():
                return p
    return None


def read_idx(root: Path, split: str) -> ArraySplit:
    prefix = "train" if split == "train" else "t10k"
    x_path, y_path = idx_file(root, prefix, "images"), idx_file(root, prefix, "labels")
    if x_path is None or y_path is None:
        raise DataError(f"idx at {root} has no {split} split (needs {prefix}-images and -labels)")
    dims, x = _read_idx_raw(x_path)
    if len(dims) != 3:
        raise DataError(f"IDX images must be 3-d (N, H, W), got {len(dims)}-d: {x_path}")
    if dims[1] == 0 or dims[2] == 0:
        raise DataError(f"IDX images of {dims[1]}x{dims[2]} pixels hold nothing: {x_path}")
    store = x if isinstance(x, MemmapStore) else MemoryStore(np.asarray(x)[:, None])
    ydims, y = _read_idx_raw(y_path)
    if len(ydims) != 1 or isinstance(y, MemmapStore):
        raise DataError(f"IDX labels must be 1-d, got {len(ydims)}-d: {y_path}")
    if ydims[0] != len(store):
        raise DataError(f"{y_path} has {ydims[0]} labels for {len(store)} images in {x_path}")
    labels = np.asarray(y).astype(np.int64)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    # Class names come from the training labels so train and test agree on them.
    train_y = idx_file(root, "train", "labels")
    if train_y is not None and train_y != y_path:
        tdims, ty = _read_idx_raw(train_y)
        if len(tdims) == 1 and not isinstance(ty, MemmapStore) and len(ty):
            n_classes = max(n_classes, int(np.asarray(ty).max()) + 1)
    return ArraySplit(store, labels, [str(k) for k in range(n_classes)], [x_path, y_path])
