"""Datasets: digits, every directory format written in miniature, detection and errors."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sslcli.data.badfiles import UnreadableImageWarning
from sslcli.data.datasets import (
    available_splits,
    describe,
    digits_split_indices,
    open_dataset,
)
from sslcli.data.decode import to_square
from sslcli.data.images import FileImageDataset
from sslcli.errors import DataError, TooManyBadImagesError

# --------------------------------------------------------------------------------------------
# helpers that write miniature datasets
# --------------------------------------------------------------------------------------------


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save_image(path: Path, arr: np.ndarray) -> None:
    """uint8 HxW -> L, HxWx3 -> RGB, HxWx4 -> RGBA; format from the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _jpeg_bytes(h: int = 48, w: int = 64, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write_cifar10(root: Path, n: int = 4, batches: int = 2, **dump: object) -> np.ndarray:
    """CIFAR-10 python batches; returns the first training image as [3, 32, 32]."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    first = None
    for name in [f"data_batch_{k}" for k in range(1, batches + 1)] + ["test_batch"]:
        data = _rng(len(name)).integers(0, 256, (n, 3072), dtype=np.uint8)
        first = data[0] if first is None else first
        batch = {"batch_label": name, "data": data, "labels": [k % 10 for k in range(n)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, **dump)  # type: ignore[arg-type]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)
    assert first is not None
    return first.reshape(3, 32, 32)


def _write_idx(path: Path, arr: np.ndarray, magic_type: int = 0x08) -> None:
    head = bytes([0, 0, magic_type, arr.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in arr.shape
    )
    raw = head + arr.astype(np.uint8).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def _image_tree(root: Path, classes: dict[str, int], seed: int = 0) -> None:
    rng = _rng(seed)
    for c, count in classes.items():
        for k in range(count):
            h, w = int(rng.integers(10, 40)), int(rng.integers(10, 40))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = "png" if k % 2 else "jpg"
            _save_image(root / c / f"img{k}.{ext}", arr)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def test_digits_shapes_and_classes() -> None:
    train = open_dataset("digits", "train", 16)
    test = open_dataset("digits", "test", 16)
    assert (len(train), len(test)) == (1438, 359)
    assert train.classes == [str(k) for k in range(10)] and train.name == "digits"
    x, y, i = train[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    assert 0 <= y < 10 and i == 5
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey replicated
    assert int(x.max()) > 200  # 0..16 was scaled to 0..255
    assert train.in_memory
    assert available_splits("digits") == ["train", "test"]
    assert "digits" in describe("digits") and "1438" in describe("digits")


def test_digits_split_fixed_disjoint_stratified() -> None:
    from sklearn.datasets import load_digits

    tr, te = digits_split_indices("train"), digits_split_indices("test")
    assert not set(tr) & set(te) and len(tr) + len(te) == 1797
    # Pinned: the split must be the same on every machine, numpy and torch version.
    digest = hashlib.sha256(te.astype("<i8").tobytes()).hexdigest()
    assert digest == "3530be80b9605f4c4adc46d0ee3006a356c16968a8efcc58f24463bc820d5ef9"
    y = load_digits().target
    for c in range(10):
        n_c, t_c = int((y == c).sum()), int((y[te] == c).sum())
        assert abs(t_c - 0.2 * n_c) <= 0.5
    labels = open_dataset("digits", "test", 8).labels.numpy()
    assert np.array_equal(labels, y[te])


def test_digits_native_size_matches_source() -> None:
    from sklearn.datasets import load_digits

    x, _, _ = open_dataset("digits", "train", 8)[0]
    first = load_digits().images[digits_split_indices("train")[0]]
    assert np.array_equal(x[0].numpy(), np.round(first * 255 / 16).astype(np.uint8))


# --------------------------------------------------------------------------------------------
# binary formats
# --------------------------------------------------------------------------------------------


def test_cifar10_detected_and_read(tmp_path: Path) -> None:
    first = _write_cifar10(tmp_path)
    assert available_splits(str(tmp_path)) == ["train", "test"]
    train = open_dataset(str(tmp_path), "train", 32)
    assert train.name == f"cifar10:{tmp_path.resolve()}"
    assert len(train) == 8 and train.classes == [f"c{k}" for k in range(10)]
    x, y, _ = train[0]
    assert np.array_equal(x.numpy(), first) and y == 0
    assert len(open_dataset(str(tmp_path), "test", 32)) == 4
    # resized, and reopening by name works
    big = open_dataset(train.name, "train", 40)
    assert big[3][0].shape == (3, 40, 40) and big.labels.tolist() == train.labels.tolist()
    assert "cifar10" in describe(str(tmp_path)) and "train 8" in describe(str(tmp_path))


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """Writes every str and bytes as a Python 2 ``str`` (BINSTRING), as cPickle did when
    the official CIFAR files were made."""

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _py2_pickle(obj: object) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1 (which wrote the official files) named the module numpy.core
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.mark.parametrize("style", ["python2", "protocol2"])
def test_cifar10_python2_style_pickles(tmp_path: Path, style: str) -> None:
    d = tmp_path / "c"
    d.mkdir()
    data = _rng().integers(0, 256, (3, 3072), dtype=np.uint8)
    batch = {"data": data, "labels": [1, 2, 3], "filenames": ["x.png", "y.png", "z.png"]}
    if style == "python2":
        (d / "test_batch").write_bytes(_py2_pickle(batch))
        (d / "batches.meta").write_bytes(_py2_pickle({"label_names": list("abcdefghij")}))
    else:
        (d / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [1, 2, 3]}, 2))
    ds = open_dataset(f"cifar10:{d}", "test", 32)
    assert ds.labels.tolist() == [1, 2, 3] and ds.classes is not None and len(ds.classes) == 10
    assert np.array_equal(ds[2][0].numpy().reshape(-1), data[2])
    if style == "python2":
        assert ds.classes[1] == "b"
    assert available_splits(str(d)) == ["test"]
    with pytest.raises(DataError, match="no labelled train split"):
        open_dataset(str(d), "train", 32)


def test_cifar100(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for split, n in (("train", 6), ("test", 2)):
        data = _rng().integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": [99] * n, "coarse_labels": [0] * n}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"f{k}" for k in range(100)]}, f)
    ds = open_dataset(str(tmp_path), "train", 24)
    assert ds.name.startswith("cifar100:") and len(ds) == 6 and ds.classes is not None
    assert ds.classes[99] == "f99" and ds[0][1] == 99 and ds[0][0].shape == (3, 24, 24)
    assert len(open_dataset(str(tmp_path), "test", 24)) == 2


def test_cifar_corrupt_and_hostile_pickles(tmp_path: Path) -> None:
    _write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = batch.read_bytes()
    batch.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_batch_2") as err:
        open_dataset(str(tmp_path), "train", 32)
    assert "\n" not in str(err.value)

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.mkdir, (str(tmp_path / "pwned"),))

    batch.write_bytes(pickle.dumps({"data": Evil(), "labels": [0]}))
    with pytest.raises(DataError, match="refusing to load"):
        open_dataset(str(tmp_path), "train", 32)
    assert not (tmp_path / "pwned").exists()


def _write_stl10(root: Path) -> np.ndarray:
    d = root / "stl10_binary"
    d.mkdir()
    rng = _rng(1)
    # An asymmetric image catches a missing column-major transpose.
    imgs = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)
    imgs[0, :, :10, :] = 0
    for stem, n in (("train", 3), ("test", 2), ("unlabeled", 4)):
        block = imgs if stem == "train" else rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        (d / f"{stem}_X.bin").write_bytes(
            np.ascontiguousarray(block.transpose(0, 1, 3, 2)).tobytes()
        )
        if stem != "unlabeled":
            (d / f"{stem}_y.bin").write_bytes(bytes([1, 10, 2][:n]))
    (d / "class_names.txt").write_text("\n".join(f"s{k}" for k in range(10)) + "\n")
    return imgs


def test_stl10(tmp_path: Path) -> None:
    imgs = _write_stl10(tmp_path)
    train = open_dataset(str(tmp_path), "train", 96)
    assert len(train) == 7 and train.classes == [f"s{k}" for k in range(10)]
    assert train.labels.tolist() == [0, 9, 1, -1, -1, -1, -1]
    x, y, _ = train[0]
    assert np.array_equal(x.numpy(), imgs[0]) and y == 0
    assert train[5][1] == -1
    labelled = open_dataset(str(tmp_path), "train", 32, labelled_only=True)
    assert len(labelled) == 3 and labelled[2][0].shape == (3, 32, 32) and labelled[2][1] == 1
    assert available_splits(str(tmp_path)) == ["train", "test"]
    assert len(open_dataset(str(tmp_path), "test", 48)) == 2
    assert "4 unlabelled" in describe(f"stl10:{tmp_path}")
    # workers started with "spawn" get a pickled dataset: the memory map must survive it
    clone = pickle.loads(pickle.dumps(train))
    assert torch.equal(clone[1][0], train[1][0])


def test_stl10_wrong_size(tmp_path: Path) -> None:
    _write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="test_X.bin"):
        open_dataset(str(tmp_path), "test", 96)


@pytest.mark.parametrize("ext", ["", ".gz"])
def test_idx(tmp_path: Path, ext: str) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x = _rng().integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(raw / f"train-images-idx3-ubyte{ext}", x)
    _write_idx(raw / f"train-labels-idx1-ubyte{ext}", np.array([0, 1, 2, 3, 9]))
    _write_idx(raw / f"t10k-images-idx3-ubyte{ext}", x[:2])
    _write_idx(raw / f"t10k-labels-idx1-ubyte{ext}", np.array([4, 5]))
    train = open_dataset(str(tmp_path), "train", 28)
    assert train.name.startswith("idx:") and len(train) == 5 and train.classes is not None
    assert len(train.classes) == 10
    img, y, _ = train[1]
    assert y == 1 and img.shape == (3, 28, 28) and np.array_equal(img[1].numpy(), x[1])
    assert open_dataset(str(tmp_path), "test", 32)[1][0].shape == (3, 32, 32)
    assert available_splits(str(tmp_path)) == ["train", "test"]


def test_idx_corrupt(tmp_path: Path) -> None:
    x = np.zeros((2, 4, 4), dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte", x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1]))
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])  # truncated
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        open_dataset(str(tmp_path), "train", 8)
    raw = bytearray((tmp_path / "train-labels-idx1-ubyte").read_bytes())
    _write_idx(bad, x)
    raw[0] = 7  # wrong magic number
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(DataError, match="bad magic.*train-labels"):
        open_dataset(str(tmp_path), "train", 8)
    gz = tmp_path / "g"
    gz.mkdir()
    _write_idx(gz / "train-images-idx3-ubyte.gz", x)
    _write_idx(gz / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2]))
    with pytest.raises(DataError, match="3 labels for 2 images"):
        open_dataset(str(gz), "train", 8)


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------


def test_imagefolder_with_splits(tmp_path: Path) -> None:
    _image_tree(tmp_path / "train", {"cat": 3, "dog": 2, "emu": 2})
    _image_tree(tmp_path / "val", {"dog": 1, "emu": 2}, seed=1)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    assert available_splits(str(tmp_path)) == ["train", "test"]
    train = open_dataset(str(tmp_path), "train", 20)
    test = open_dataset(str(tmp_path), "test", 20)
    assert train.name.startswith("imagefolder:")
    assert train.classes == test.classes == ["cat", "dog", "emu"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [1, 2, 2]  # indices follow train's classes
    for k in range(len(train)):
        x, y, i = train[k]
        assert x.shape == (3, 20, 20) and x.dtype == torch.uint8 and (y, i) == (train.labels[k], k)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=4)))
    assert batch[0].shape == (4, 3, 20, 20)
    assert "train 7 files" in describe(str(tmp_path)) and "3 classes" in describe(str(tmp_path))


def test_imagefolder_without_splits_and_forcing(tmp_path: Path) -> None:
    _image_tree(tmp_path, {"a": 2, "b": 1})
    assert available_splits(str(tmp_path)) == ["train"]
    ds = open_dataset(str(tmp_path), "train", 12)
    assert ds.classes == ["a", "b"] and len(ds) == 3
    with pytest.raises(DataError, match="no labelled test split"):
        open_dataset(str(tmp_path), "test", 12)
    flat = open_dataset(f"folder:{tmp_path}", "train", 12)
    assert flat.classes is None and flat.labels.tolist() == [-1, -1, -1]
    assert flat.name == f"folder:{tmp_path.resolve()}"
    with pytest.raises(DataError, match="is not cifar10 data"):
        open_dataset(f"cifar10:{tmp_path}", "train", 12)


def test_flat_folder_mixed_modes_and_sizes(tmp_path: Path) -> None:
    rng = _rng(2)
    _save_image(tmp_path / "rgb.jpg", rng.integers(0, 256, (30, 41, 3), dtype=np.uint8))
    _save_image(tmp_path / "grey.png", rng.integers(0, 256, (50, 20), dtype=np.uint8))
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red where opaque
    rgba[8:, :, 3] = 255  # top half fully transparent
    _save_image(tmp_path / "alpha.png", rgba)
    _save_image(tmp_path / "tiny.bmp", rng.integers(0, 256, (3, 5, 3), dtype=np.uint8))
    Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).convert("P").save(
        tmp_path / "pal.gif"
    )
    # A greyscale JPEG one level down: folders are searched recursively.
    _save_image(tmp_path / "sub" / "deep.jpg", rng.integers(0, 256, (12, 12), dtype=np.uint8))
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    ds = open_dataset(str(tmp_path), "train", 24)
    assert ds.name.startswith("folder:") and ds.classes is None and len(ds) == 6
    names = [Path(ds.path(k)).name for k in range(len(ds))]  # type: ignore[attr-defined]
    assert names == ["alpha.png", "grey.png", "pal.gif", "rgb.jpg", "tiny.bmp", "deep.jpg"]
    for k in range(len(ds)):
        x, y, i = ds[k]
        assert x.shape == (3, 24, 24) and x.dtype == torch.uint8 and y == -1 and i == k
    alpha = ds[0][0]
    assert alpha[:, 0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert alpha[:, -1, 0].tolist() == [200, 0, 0]
    grey = ds[1][0]
    assert torch.equal(grey[0], grey[1])
    assert available_splits(str(tmp_path)) == ["train"]


def test_to_square_geometry() -> None:
    img = torch.zeros(3, 10, 30, dtype=torch.uint8)
    img[:, :, 10:20] = 255  # a centred white band exactly as wide as the crop
    assert torch.equal(to_square(img, 10), torch.full((3, 10, 10), 255, dtype=torch.uint8))
    wide = to_square(torch.cat([img, img], dim=1), 10)  # 20x30: shrink to 10x15, crop 10x10
    assert wide.shape == (3, 10, 10) and int(wide[:, :, 5].min()) == 255
    assert to_square(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), 8).shape == (2, 1, 8, 8)
    square = torch.zeros(3, 8, 8, dtype=torch.uint8)
    assert to_square(square, 8) is square


def test_read_bytes_and_cache(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / f"{k}.jpg").write_bytes(_jpeg_bytes(seed=k))
    ds = open_dataset(str(tmp_path), "train", 16, cache=True)
    assert isinstance(ds, FileImageDataset) and ds.all_jpeg
    with Image.open(io.BytesIO(ds.read_bytes(1))) as img:
        assert img.format == "JPEG" and img.size == (64, 48)
    first = ds[2][0]
    os.remove(ds.path(2))  # a second read must come from the cache
    assert torch.equal(ds[2][0], first)


# --------------------------------------------------------------------------------------------
# corrupt files and errors
# --------------------------------------------------------------------------------------------


def _jpeg_folder(root: Path, good: int, truncated: int = 0, garbage: int = 0) -> None:
    root.mkdir(exist_ok=True)
    for k in range(good):
        (root / f"good{k:02d}.jpg").write_bytes(_jpeg_bytes(seed=k))
    for k in range(truncated):
        raw = _jpeg_bytes(seed=100 + k)
        (root / f"trunc{k}.jpg").write_bytes(raw[: len(raw) // 2])
    for k in range(garbage):
        (root / f"junk{k}.jpg").write_text("<html>not a jpeg</html>")


def test_corrupt_jpeg_skipped_and_warned_once(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path, good=9, truncated=1, garbage=1)
    with pytest.warns(UnreadableImageWarning, match="junk0.jpg"):
        ds = open_dataset(str(tmp_path), "train", 16, max_bad_fraction=0.2)
    assert len(ds) == 10  # the garbage file was dropped by the header check
    bad = next(k for k in range(len(ds)) if "trunc0" in ds.path(k))  # type: ignore[attr-defined]
    with pytest.warns(UnreadableImageWarning, match="trunc0.jpg") as record:
        x, _, i = ds[bad]
    assert len(record) == 1
    assert x.shape == (3, 16, 16) and i == (bad + 1) % len(ds)  # the next readable image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second epoch warns no more
        assert ds[bad][2] == i
    assert ds.bad_count == 2  # type: ignore[attr-defined]


def test_too_many_corrupt_files(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path / "junk", good=3, garbage=2)
    with pytest.warns(UnreadableImageWarning), pytest.raises(DataError, match="2 of 5 images"):
        open_dataset(str(tmp_path / "junk"), "train", 16)
    # Truncated bodies pass the header check and are only found while decoding.
    _jpeg_folder(tmp_path / "trunc", good=3, truncated=2)
    ds = open_dataset(str(tmp_path / "trunc"), "train", 16, max_bad_fraction=0.25)
    with pytest.warns(UnreadableImageWarning), pytest.raises(TooManyBadImagesError):
        for k in range(len(ds)):
            ds[k]


def test_too_many_corrupt_files_in_workers(tmp_path: Path) -> None:
    _jpeg_folder(tmp_path, good=2, truncated=3)
    ds = open_dataset(str(tmp_path), "train", 16, max_bad_fraction=0.3)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(DataError) as err:
        list(loader)
    assert "\n" not in str(err.value) and "unreadable" in str(err.value)
    assert ds.bad_count >= 1  # type: ignore[attr-defined]  # the worker's finding is shared


def test_missing_path_and_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data path does not exist"):
        open_dataset(str(tmp_path / "nope"), "train", 32)
    with pytest.raises(DataError, match="data path does not exist"):
        available_splits(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown data layout") as err:
        describe(str(tmp_path))
    assert "CIFAR-10" in str(err.value) and "IDX" in str(err.value)
    with pytest.raises(DataError, match="unknown split"):
        open_dataset("digits", "val", 32)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="not a directory"):
        open_dataset(str(tmp_path / "readme.txt"), "train", 32)
