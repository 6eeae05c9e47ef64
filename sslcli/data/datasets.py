"""Datasets: every source of images yields ``(uint8 [3, S, S], label, index)``.

``S`` is the ``load_size`` given to :func:`open_dataset`: every image is converted to RGB,
its shorter side resized to ``S`` (upsampled when smaller) and centre-cropped, so any
batch collates. That is the evaluation geometry. Training on image files cuts every view
from the original image instead (:class:`sslcli.data.crops.CropDataset` over
:meth:`sslcli.data.images.FileImageDataset.read`); in-memory arrays are cropped from
the stored image, on the device, in batches (:mod:`sslcli.data.augment`).

Specs accepted by :func:`open_dataset`, :func:`available_splits` and :func:`describe`:

``digits``
    scikit-learn's embedded 1,797 8x8 handwritten digits (works offline). Fixed split:
    stratified per class with ``numpy.random.RandomState(0)``, round(20 %) of each class to
    ``test`` (359 images), the rest to ``train`` (1,438). Legacy RandomState streams are
    frozen by numpy, so the split is the same on every machine and version.
``DIR``
    a directory whose format is detected, in this order: CIFAR-10 python batches, CIFAR-100
    python pickles, STL-10 binaries, MNIST-style IDX files, an ImageFolder tree (class
    subfolders; ``train/`` + ``val/`` or ``test/`` subfolders become the splits, ``val``
    preferred), a folder of images (unlabelled, searched recursively).
``FORMAT:DIR``
    skip detection; FORMAT is one of :data:`FORMATS`.

Split rules worth knowing:

* STL-10 ``train`` = the 5,000 labelled training images (indices 0..4999) followed by the
  100,000 unlabelled ones (label -1). Evaluate on ``labelled_only=True`` or
  :meth:`ImageDataset.labelled_indices`.
* ``test`` is reported by :func:`available_splits` only when it exists *and* is labelled,
  because its only use is evaluation.
* ImageFolder class indices come from ``train/``'s sorted class folders for both splits.

Corrupt image files (lazily decoded formats; the rules live in
:mod:`sslcli.data.badfiles`): when a folder holds at most
:data:`~sslcli.data.images.PROBE_MAX_FILES` images, every file's header is checked at open
time, so files that are not images at all are dropped (with a warning) before training
starts. A file whose body turns out to be broken when a worker decodes it is warned about
once, recorded in a bad-file mask that lives in shared memory (so all DataLoader workers
and the main process see it), and replaced by the next readable image — the returned
index is the substitute's, so image, label and index always agree. When more than
``max_bad_fraction`` of the files are bad, :class:`~sslcli.errors.TooManyBadImagesError`
(a :class:`DataError`) is raised, at open time or from whichever worker crosses the limit.
Broken binary files (CIFAR, STL-10, IDX) raise a one-line :class:`DataError` naming the
file when opened.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sslcli.data import formats
from sslcli.data.decode import IMAGE_EXTENSIONS, is_image_file
from sslcli.data.images import ArrayImageDataset, FileImageDataset, ImageDataset, LabelledSubset
from sslcli.errors import DataError

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
FORMATS: tuple[str, ...] = ("imagefolder", "folder", "cifar10", "cifar100", "stl10", "idx")

DIGITS_SEED = 0
DIGITS_TEST_FRACTION = 0.2


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, embedded)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); scale to 0..255.
    x = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return x[:, None], np.asarray(d.target, dtype=np.int64)


def digits_split_indices(split: str) -> np.ndarray:
    """Sorted indices of the fixed, stratified digits split (see module docstring)."""
    _, y = _digits_arrays()
    rng = np.random.RandomState(DIGITS_SEED)
    test: list[np.ndarray] = []
    for c in range(10):
        members = np.flatnonzero(y == c)
        k = int(np.floor(DIGITS_TEST_FRACTION * len(members) + 0.5))
        test.append(members[rng.permutation(len(members))[:k]])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)


def _open_digits(split: str, load_size: int) -> ArrayImageDataset:
    x, y = _digits_arrays()
    idx = digits_split_indices(split)
    store = formats.MemoryStore(np.ascontiguousarray(x[idx]))
    classes = [str(k) for k in range(10)]
    # Always resized once here (1,797 tiny images): per-item resizing would redo it every
    # epoch for no memory saving worth having.
    return ArrayImageDataset("digits", split, store, y[idx], classes, load_size, precompute=True)


# --------------------------------------------------------------------------------------------
# Spec parsing and format detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    fmt: str  # "digits" or one of FORMATS
    root: Path | None  # the directory the user named (resolved); None for digits
    data_dir: Path | None  # where the files are (root or a known subfolder)

    @property
    def name(self) -> str:
        return "digits" if self.root is None else f"{self.fmt}:{self.root}"


def _parse(spec: str) -> tuple[str | None, str]:
    s = spec.strip()
    if s.lower() == "digits":
        return "digits", ""
    head, sep, rest = s.partition(":")
    # Only a known format name counts as a prefix, so "C:\\data" stays a path.
    if sep and head.lower() in FORMATS:
        if not rest:
            raise DataError(f"missing directory after '{head}:' in data spec {spec!r}")
        return head.lower(), rest
    return None, s


def _dirs(root: Path, *subdirs: str) -> list[Path]:
    return [root / s for s in ("", *subdirs) if (root / s).is_dir()]


def _find_cifar10(root: Path) -> Path | None:
    for d in _dirs(root, "cifar-10-batches-py"):
        if formats.cifar10_batches(d, "train") or (d / "test_batch").is_file():
            return d
    return None


def _find_cifar100(root: Path) -> Path | None:
    for d in _dirs(root, "cifar-100-python"):
        if (d / "train").is_file() or (d / "test").is_file():
            return d
    return None


def _find_stl10(root: Path) -> Path | None:
    for d in _dirs(root, "stl10_binary"):
        if any((d / f"{s}_X.bin").is_file() for s in ("train", "test", "unlabeled")):
            return d
    return None


def _find_idx(root: Path) -> Path | None:
    # torchvision keeps the files in <root>/<Name>/raw; also accept <root>/raw.
    candidates = _dirs(root, "raw")
    if root.is_dir():
        candidates += sorted(p / "raw" for p in root.iterdir() if (p / "raw").is_dir())
    for d in candidates:
        if formats.idx_file(d, "train", "images") or formats.idx_file(d, "t10k", "images"):
            return d
    return None


def _scan_images(d: Path) -> Iterator[str]:
    """Image files below ``d``, recursively, in a deterministic (sorted) order."""
    # Symlinked folders are followed (datasets are often assembled from links), so guard
    # against a link pointing back up the tree, which would otherwise recurse forever.
    seen = {os.path.realpath(d)}
    for dirpath, dirnames, filenames in os.walk(d, followlinks=True):
        kept = []
        for n in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, n))
            if not n.startswith(".") and real not in seen:
                seen.add(real)
                kept.append(n)
        dirnames[:] = kept
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            # Regular files only: opening a FIFO (or a device) named x.jpg blocks forever.
            if is_image_file(f) and os.path.isfile(path):
                yield path


def _has_image(d: Path) -> bool:
    """Whether any image lies below ``d``; stops at the first one.

    Detection asks this of every class folder, so unlike os.walk it must not list a
    1,300-file ImageNet class completely just to find its first JPEG.
    """
    stack = [str(d)]
    seen = {os.path.realpath(d)}  # symlink loops, as in _scan_images
    while stack:
        subdirs = []
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        real = os.path.realpath(entry.path)
                        if real not in seen:
                            seen.add(real)
                            subdirs.append(entry.path)
                    elif is_image_file(entry.name) and entry.is_file():
                        return True
        except OSError:
            continue
        stack.extend(subdirs)
    return False


def _class_dirs(d: Path) -> list[Path]:
    """Visible subfolders of ``d`` that hold at least one image (at any depth)."""
    if not d.is_dir():
        return []
    subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [p for p in subs if _has_image(p)]


def _top_level_images(d: Path) -> bool:
    return any(p.is_file() and is_image_file(p.name) for p in d.iterdir())


def _split_dirs(root: Path) -> dict[str, Path] | None:
    """``train/`` + ``val/`` or ``test/`` holding class folders -> {"train": .., "test": ..}."""
    train = root / "train"
    if not _class_dirs(train):
        return None
    out = {"train": train}
    for name in ("val", "test"):  # ImageNet calls it val; val wins when both exist
        if _class_dirs(root / name):
            out["test"] = root / name
            break
    if "test" not in out and not any((root / n).is_dir() for n in ("val", "test")):
        # A lone train/ is still a split layout, unless the tree's classes really are
        # called "train" and something else.
        others = [p for p in _class_dirs(root) if p.name != "train"]
        if others:
            return None
    return out


def _find_imagefolder(root: Path) -> Path | None:
    if _split_dirs(root) is not None:
        return root
    if _class_dirs(root) and not _top_level_images(root):
        return root
    return None


def _find_folder(root: Path) -> Path | None:
    return root if _has_image(root) else None


_FINDERS = {
    "cifar10": _find_cifar10,
    "cifar100": _find_cifar100,
    "stl10": _find_stl10,
    "idx": _find_idx,
    "imagefolder": _find_imagefolder,
    "folder": _find_folder,
}
_LOOKED_FOR = {
    "cifar10": "CIFAR-10 python batches (data_batch_1..5, test_batch)",
    "cifar100": "CIFAR-100 python pickles (train, test, meta)",
    "stl10": "STL-10 binaries (train_X.bin, test_X.bin, unlabeled_X.bin)",
    "idx": "IDX files (train-images-idx3-ubyte[.gz], t10k-...)",
    "imagefolder": "class subfolders of images (optionally under train/ and val/ or test/)",
    "folder": f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))})",
}


def _resolve(spec: str) -> _Source:
    fmt, path_text = _parse(spec)
    if fmt == "digits":
        return _Source("digits", None, None)
    path = Path(path_text).expanduser()
    if not path.exists():
        raise DataError(f"data path does not exist: {path}")
    if not path.is_dir():
        raise DataError(f"data path is not a directory: {path}")
    root = path.resolve()
    if fmt is not None:
        data_dir = _FINDERS[fmt](root)
        if data_dir is None:
            raise DataError(f"{root} is not {fmt} data: expected {_LOOKED_FOR[fmt]}")
        return _Source(fmt, root, data_dir)
    # Folder layouts go last: a CIFAR or IDX directory might also hold stray images.
    for name, finder in _FINDERS.items():
        data_dir = finder(root)
        if data_dir is not None:
            return _Source(name, root, data_dir)
    raise DataError(
        f"unknown data layout in {root}: looked for "
        + "; ".join(_LOOKED_FOR.values())
        + f". Name the format with FORMAT:DIR ({', '.join(FORMATS)}) if it is one of these"
    )


# --------------------------------------------------------------------------------------------
# Per-format split discovery and loading
# --------------------------------------------------------------------------------------------


def _splits(src: _Source) -> list[str]:
    d = src.data_dir
    if src.fmt == "digits":
        return ["train", "test"]
    assert d is not None
    found: list[str] = []
    if src.fmt == "cifar10":
        found += ["train"] if formats.cifar10_batches(d, "train") else []
        found += ["test"] if (d / "test_batch").is_file() else []
    elif src.fmt == "cifar100":
        found += [s for s in SPLITS if (d / s).is_file()]
    elif src.fmt == "stl10":
        if (d / "train_X.bin").is_file() or (d / "unlabeled_X.bin").is_file():
            found.append("train")
        if (d / "test_X.bin").is_file() and (d / "test_y.bin").is_file():
            found.append("test")
    elif src.fmt == "idx":
        for split, prefix in (("train", "train"), ("test", "t10k")):
            if formats.idx_file(d, prefix, "images") and formats.idx_file(d, prefix, "labels"):
                found.append(split)
    elif src.fmt == "imagefolder":
        found = list(_split_dirs(d) or {"train": d})
    else:  # folder: unlabelled, so no evaluation split
        found = ["train"]
    return found


def _list_files(src: _Source, split: str) -> tuple[list[str], list[int], list[str] | None]:
    """(paths, labels, classes) of an image-file split."""
    d = src.data_dir
    assert d is not None
    if src.fmt == "folder":
        paths = list(_scan_images(d))
        return paths, [-1] * len(paths), None
    layout = _split_dirs(d)
    split_dir = (layout or {"train": d}).get(split)
    if split_dir is None:
        raise DataError(f"{src.name} has no {split} split (no val/ or test/ next to train/)")
    train_dir = (layout or {"train": d})["train"]
    classes = [p.name for p in _class_dirs(train_dir)]
    index = {c: k for k, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for class_dir in _class_dirs(split_dir):
        if class_dir.name not in index:
            raise DataError(
                f"class folder {class_dir} has no counterpart in {train_dir}; "
                f"both splits must use the same class names"
            )
        files = list(_scan_images(class_dir))
        paths += files
        labels += [index[class_dir.name]] * len(files)
    return paths, labels, classes


def _read_array_split(src: _Source, split: str) -> formats.ArraySplit:
    d = src.data_dir
    assert d is not None
    if src.fmt in ("cifar10", "cifar100"):
        return _cached_cifar(src.fmt, d, split, _mtimes(d))
    if src.fmt == "stl10":
        return formats.read_stl10(d, split)
    return formats.read_idx(d, split)


def _mtimes(d: Path) -> tuple[float, ...]:
    return tuple(p.stat().st_mtime for p in sorted(d.iterdir()) if p.is_file())


@functools.lru_cache(maxsize=2)
def _cached_cifar(fmt: str, d: Path, split: str, mtimes: tuple[float, ...]) -> formats.ArraySplit:
    # describe() followed by open_dataset() would otherwise unpickle 180 MB twice; the
    # modification times in the key drop the entry when the files change.
    return formats.read_cifar(d, fmt, split)


def _check_split(src: _Source, split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use 'train' or 'test'")
    if split not in _splits(src):
        hint = {
            "imagefolder": " (looked for val/ or test/ with class folders next to train/)",
            "folder": " (a flat folder is unlabelled: it has only a train split)",
        }.get(src.fmt, "")
        raise DataError(f"{src.name} has no labelled {split} split{hint}")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def open_dataset(
    spec: str,
    split: Split,
    load_size: int,
    *,
    max_bad_fraction: float = 0.01,
    labelled_only: bool = False,
    cache: bool = False,
) -> ImageDataset:
    """Open one split of a dataset; items are ``(uint8 [3, load_size, load_size], label, i)``.

    ``labelled_only`` drops rows with label -1 (STL-10's unlabelled images) and re-indexes;
    ``cache`` keeps decoded images of a file dataset in shared memory after first use
    (skipped with a warning when they would not fit).
    """
    if load_size < 1:
        raise DataError(f"load_size must be a positive number of pixels, got {load_size}")
    if not 0 <= max_bad_fraction <= 1:
        raise DataError(f"max_bad_fraction must be within 0..1, got {max_bad_fraction}")
    src = _resolve(spec)
    _check_split(src, split)
    ds: ImageDataset
    if src.fmt == "digits":
        ds = _open_digits(split, load_size)
    elif src.fmt in ("imagefolder", "folder"):
        paths, labels, classes = _list_files(src, split)
        if not paths:
            raise DataError(f"no image files in {src.name} ({split})")
        ds = FileImageDataset(
            src.name, split, paths, labels, classes, load_size,
            max_bad_fraction=max_bad_fraction, cache=cache,
        )  # fmt: skip
    else:
        a = _read_array_split(src, split)
        ds = ArrayImageDataset(src.name, split, a.store, a.labels, a.classes, load_size)
    if labelled_only and not bool((ds.labels >= 0).all()):
        if not bool((ds.labels >= 0).any()):
            raise DataError(f"{src.name} ({split}) has no labelled images")
        ds = LabelledSubset(ds)
    return ds


def available_splits(spec: str) -> list[str]:
    """Which of ``"train"``/``"test"`` exist; ``"test"`` only when it is labelled."""
    return _splits(_resolve(spec))


def describe(spec: str) -> str:
    """One line for logs: format, path, split sizes, classes, native image size."""
    src = _resolve(spec)
    if src.fmt == "digits":
        n_test = len(digits_split_indices("test"))
        n_train = len(digits_split_indices("train"))
        return (
            f"digits (scikit-learn, embedded): train {n_train}, test {n_test}, 10 classes, 8x8 grey"
        )
    parts: list[str] = []
    n_classes: int | None = None
    native = ""
    for split in _splits(src):
        if src.fmt in ("imagefolder", "folder"):
            paths, labels, classes = _list_files(src, split)
            parts.append(f"{split} {len(paths)} files")
        else:
            a = _read_array_split(src, split)
            unlabelled = int((a.labels < 0).sum())
            extra = f" ({unlabelled} unlabelled)" if unlabelled else ""
            parts.append(f"{split} {len(a.labels)}{extra}")
            classes = a.classes
            _, c, h, w = a.store.shape
            native = f", {h}x{w} {'RGB' if c == 3 else 'grey'}"
        n_classes = len(classes) if classes else n_classes
    labels_text = f"{n_classes} classes" if n_classes else "unlabelled"
    return f"{src.fmt} at {src.data_dir}: {', '.join(parts)}, {labels_text}{native}"


__all__ = [
    "FORMATS",
    "available_splits",
    "describe",
    "digits_split_indices",
    "open_dataset",
]
