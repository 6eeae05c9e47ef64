"""``ssl embed``: the embedding of every image of a dataset, streamed to a file.

The encoder and transform are exactly those of ``ssl eval`` (:mod:`sslcli.runs.targets`'s target,
``method.embed`` unless ``which`` names an encoder, the run's un-augmented eval transform
and autocast set-up), so a row equals the feature ``ssl eval`` computes for that image.

Memory does not grow with the data set: features are computed a batch at a time and
written into a temporary memory-mapped ``N x D`` float32 file next to the output (``N``
is the split's size, an upper bound: unreadable images are skipped). The optional
neighbours are computed from that map in blocks (:func:`sslcli.eval.neighbors.nearest`)
into two more maps, and the output is then written from the maps chunk by chunk
(cast to float16 on the way when asked) — only the index (one path or number per row) is
held in memory. Formats, by the output's extension:

``.safetensors``
    tensors ``embeddings`` [N, D], ``labels`` [N] (labelled data), ``neighbors`` [N, K]
    and ``similarities`` [N, K] (with ``--neighbors``); metadata ``sslcli_index`` (a JSON
    list: each row's path relative to the data root, or its row number in array data)
    and ``sslcli_embed`` (JSON: target, encoder, data, transform, classes, skipped files).
``.npz``
    arrays of the same names, plus ``paths`` or ``rows`` (the index), ``classes`` and
    ``meta`` (the JSON above as a string); stored uncompressed, readable with
    ``numpy.load(..., allow_pickle=False)``.
``.parquet``
    one row per image: ``path`` or ``row``, ``label``, ``embedding`` (fixed-size list),
    ``neighbors``, ``similarities``; the JSON in the schema metadata. Needs pyarrow.

A corrupt image is skipped and named, as in training: the dataset warns about it and
replaces it by the next readable image; that substitute's index gives the skip away, so
the row is dropped instead of embedding one image twice.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sslcli.data.datasets import SPLITS, open_dataset
from sslcli.data.images import FileImageDataset, ImageDataset
from sslcli.errors import DataError, EmbedError
from sslcli.eval.features import iter_features
from sslcli.eval.neighbors import nearest
from sslcli.runs.targets import Target, load_target
from sslcli.runtime import autocast, eval_mode, pick_device, pick_dtype

FORMATS: dict[str, str] = {".safetensors": "safetensors", ".npz": "npz", ".parquet": "parquet"}
DTYPES: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
FORMAT_VERSION = 1
CHUNK_BYTES = 16 << 20
"""Bytes of rows read from the memory maps per write (bounded memory whatever N is)."""


@dataclass
class Embeddings:
    """One row per embedded image, as arrays (what :func:`sslcli.embed` returns)."""

    embeddings: np.ndarray
    """[N, D] float32 or float16 (memory-mapped when read from a .safetensors file)."""
    index: list[str] | np.ndarray
    """Each row's path relative to the data root, or its row number (int64) in array data."""
    labels: np.ndarray | None
    """[N] int64 class indices (-1: unlabelled row); None when the data has no labels."""
    classes: list[str] | None
    neighbors: np.ndarray | None = None
    """[N, K] int64: the rows of each row's K nearest other images, most similar first."""
    similarities: np.ndarray | None = None
    """[N, K] float32 cosine similarities of those neighbours."""
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    """The file written or read, if any."""

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def skipped(self) -> list[str]:
        """Unreadable images left out (paths relative to the data root)."""
        return list(self.meta.get("skipped", []))


def _quiet(msg: str) -> None:
    pass


def format_of(path: str | Path) -> str:
    """The file format a path's extension names (one-line error for anything else)."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise EmbedError(
            f"--out {path}: unknown embeddings format; the extension must be one of "
            f"{', '.join(FORMATS)}"
        )
    if fmt == "parquet":
        _pyarrow()
    return fmt


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise EmbedError(
            ".parquet needs pyarrow, which is not installed (pip install pyarrow); "
            "or write .safetensors or .npz"
        ) from e
    return pyarrow


# ---------------------------------------------------------------------------------------------
# Computing
# ---------------------------------------------------------------------------------------------


def embed(
    target: str | Path | Target | None = None,
    *,
    data: str | None = None,
    out: str | Path | None = None,
    split: str = "train",
    which: str | None = None,
    normalize: bool = False,
    dtype: str = "float32",
    neighbors: int = 0,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    max_bad_fraction: float | None = None,
    say: Callable[[str], None] = _quiet,
    progress: Callable[[int, int], None] | None = None,
) -> Embeddings:
    """Embed every image of ``data``'s ``split`` (default: the data ``target`` trained on).

    With ``out``, the file is written (streaming; format by extension) and its contents are
    returned as arrays (memory-mapped for .safetensors). Without, the arrays are returned
    in memory. ``neighbors=K`` adds each image's K nearest other images (cosine).
    ``progress(done, total)`` is called after every batch. ``max_bad_fraction`` (default:
    the run's ``data.max_bad_fraction``) bounds the unreadable images skipped.
    """
    fmt = format_of(out) if out is not None else None
    if dtype not in DTYPES:
        raise EmbedError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if neighbors < 0:
        raise EmbedError(f"--neighbors must be >= 0, got {neighbors}")
    if batch_size < 1:
        raise EmbedError(f"--batch-size must be >= 1, got {batch_size}")
    if split not in SPLITS:
        raise EmbedError(f"--split {split!r}: use one of {', '.join(SPLITS)}")
    dev = pick_device(device)
    amp = pick_dtype("auto", dev)
    t = target if isinstance(target, Target) else load_target(target)
    if target is None:
        say(f"target: {t.path} (the most recent run under ./runs)")
    t.check_which(which)
    t.to(dev)
    own = t.dataset
    if data is None:
        if own is None:
            raise EmbedError(f"{t.describe()} does not record its training data: give --data")
        data = own
        say(f"data: {data} (the data {t.method_name or 'the encoder'} was trained on)")
    # As ssl eval: the run's own data decoded at its load_size, other data at the input size.
    load_size = t.load_size if data == own else t.image_size
    max_bad = max_bad_fraction
    if max_bad is None:
        max_bad = float(t.config.get("data", {}).get("max_bad_fraction") or 0.01)
    ds = open_dataset(data, split, load_size, max_bad_fraction=max_bad)  # type: ignore[arg-type]
    if neighbors >= len(ds):
        # Checked before the encoder runs over the whole split only to fail at the end.
        raise EmbedError(
            f"--neighbors {neighbors}: {ds.name} ({split}) has only {len(ds)} images, so at "
            f"most {len(ds) - 1} neighbours each"
        )
    root, index_of = _indexer(ds)
    skipped = [index_of(p) for p in getattr(ds, "bad_at_open", [])]

    out_path = Path(out) if out is not None else None
    work_dir = out_path.parent if out_path is not None else None
    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".ssl-embed-", dir=work_dir) as tmp:
        emb, labels, rows, n = _stream(
            t, ds, Path(tmp), which=which, normalize=normalize, device=dev, amp=amp,
            batch_size=batch_size, num_workers=num_workers, skipped=skipped,
            index_of=index_of, progress=progress,
        )  # fmt: skip
        if skipped:
            shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            say(f"skipped {len(skipped)} unreadable image(s): {shown}")
        nb_idx = nb_sim = None
        if neighbors:
            say(f"neighbours: the {neighbors} nearest of each of {n} images (cosine, blocked)")
            nb_idx = np.lib.format.open_memmap(
                Path(tmp) / "nb_idx.npy", mode="w+", dtype=np.int64, shape=(n, neighbors)
            )
            nb_sim = np.lib.format.open_memmap(
                Path(tmp) / "nb_sim.npy", mode="w+", dtype=np.float32, shape=(n, neighbors)
            )
            nearest(emb[:n], emb[:n], neighbors, exclude_self=True, device=dev,
                    out=(nb_idx, nb_sim))  # fmt: skip
        is_files = isinstance(ds, FileImageDataset)
        index: list[str] | np.ndarray = (
            [index_of(ds.path(int(r))) for r in rows] if is_files else np.asarray(rows, np.int64)
        )
        meta = {
            "format": FORMAT_VERSION,
            "target": str(t.path),
            "kind": t.kind,
            "checkpoint": str(t.weights),
            "step": t.step,
            "method": t.method_name,
            "which": which or (None if t.method is not None else t.default_which),
            "data": data,
            "data_root": str(root) if root is not None else None,
            "split": split,
            "image_size": t.image_size,
            "load_size": load_size,
            "normalize": normalize,
            "dtype": dtype,
            "rows": n,
            "dim": int(emb.shape[1]),
            "index": "path" if is_files else "row",
            "neighbors": neighbors,
            "classes": ds.classes,
            "skipped": skipped,
        }
        lab = labels[:n] if ds.classes is not None else None
        res = Embeddings(
            embeddings=emb[:n], index=index, labels=lab, classes=ds.classes,
            neighbors=nb_idx, similarities=nb_sim, meta=meta,
        )  # fmt: skip
        if out_path is None:
            return _in_memory(res, DTYPES[dtype])
        write(res, out_path, fmt)
    return load_embeddings(out_path)


def _indexer(ds: ImageDataset) -> tuple[Path | None, Callable[[str], str]]:
    """The data root and ``absolute path -> path relative to it`` (files), else identity."""
    if not isinstance(ds, FileImageDataset):
        return None, str
    # A file dataset's name is "FORMAT:ROOT" with the root the user named, resolved.
    root = Path(ds.name.partition(":")[2])

    def rel(p: str) -> str:
        try:
            return Path(p).relative_to(root).as_posix()
        except ValueError:
            return p

    return root, rel


def _stream(
    t: Target,
    ds: ImageDataset,
    tmp: Path,
    *,
    which: str | None,
    normalize: bool,
    device: torch.device,
    amp: torch.dtype | None,
    batch_size: int,
    num_workers: int,
    skipped: list[str],
    index_of: Callable[[str], str],
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Features of ``ds`` into a memory map, batch by batch: (map, labels, rows, rows kept)."""
    total = len(ds)
    labels = np.empty(total, dtype=np.int64)
    rows = np.empty(total, dtype=np.int64)
    emb: np.ndarray | None = None
    n = pos = 0
    embedder = t.embedder(which)
    with eval_mode(t.eval_module()), autocast(device, amp):
        batches: Iterator[Any] = iter_features(
            embedder, ds, t.image_size, device, batch_size=batch_size,
            normalize=t.normalize, mean=t.mean, std=t.std, num_workers=num_workers,
        )  # fmt: skip
        for f, y, idx in batches:
            b = int(idx.shape[0])
            want = torch.arange(pos, pos + b)
            keep = idx.long() == want
            if not bool(keep.all()):
                # The dataset replaced these unreadable files by later images; drop the rows.
                for r in want[~keep].tolist():
                    skipped.append(index_of(ds.path(r)) if hasattr(ds, "path") else str(r))
                f, y, idx = f[keep], y[keep], idx[keep]
            pos += b
            if normalize:
                f = F.normalize(f, dim=1)
            if emb is None:
                emb = np.lib.format.open_memmap(
                    tmp / "embeddings.npy", mode="w+", dtype=np.float32,
                    shape=(total, int(f.shape[1])),
                )  # fmt: skip
            k = int(f.shape[0])
            emb[n : n + k] = f.numpy()
            labels[n : n + k] = y.numpy()
            rows[n : n + k] = idx.numpy()
            n += k
            if progress is not None:
                progress(pos, total)
    if emb is None or n == 0:
        raise DataError(f"no readable images in {ds.name} ({ds.split})")
    return emb, labels, rows[:n], n


def _in_memory(res: Embeddings, dtype: np.dtype[Any]) -> Embeddings:
    """Copies of the (temporary) maps, in the requested dtype."""
    res.embeddings = np.array(res.embeddings, dtype=dtype)
    if res.labels is not None:
        res.labels = np.array(res.labels)
    if res.neighbors is not None and res.similarities is not None:
        res.neighbors, res.similarities = np.array(res.neighbors), np.array(res.similarities)
    return res


# ---------------------------------------------------------------------------------------------
# Writing (chunked, from memory maps) and reading
# ---------------------------------------------------------------------------------------------


def _columns(res: Embeddings) -> list[tuple[str, np.ndarray, np.dtype[Any]]]:
    """(name, source array, dtype on disk) of every tensor, in file order."""
    cols = [("embeddings", res.embeddings, DTYPES[res.meta["dtype"]])]
    if res.labels is not None:
        cols.append(("labels", res.labels, np.dtype("<i8")))
    if res.neighbors is not None and res.similarities is not None:
        cols.append(("neighbors", res.neighbors, np.dtype("<i8")))
        cols.append(("similarities", res.similarities, np.dtype("<f4")))
    return cols


def _chunks(a: np.ndarray, dtype: np.dtype[Any]) -> Iterator[bytes]:
    row_bytes = max(1, int(np.prod(a.shape[1:], dtype=np.int64)) * a.dtype.itemsize)
    step = max(1, CHUNK_BYTES // row_bytes)
    for s in range(0, a.shape[0], step):
        yield np.ascontiguousarray(a[s : s + step], dtype=dtype).tobytes()


def write(res: Embeddings, path: Path, fmt: str | None = None) -> Path:
    """Write ``res`` to ``path`` (format by extension) via a temporary name and a rename."""
    fmt = fmt or format_of(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        {"safetensors": _write_safetensors, "npz": _write_npz, "parquet": _write_parquet}[fmt](
            res, tmp
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_ST_DTYPES = {"<f4": "F32", "<f2": "F16", "<i8": "I64"}
_NP_DTYPES = {v: np.dtype(k) for k, v in _ST_DTYPES.items()}


def _write_safetensors(res: Embeddings, path: Path) -> None:
    # The format is an 8-byte little-endian header length, a JSON header (names, dtypes,
    # shapes, byte ranges, string metadata) and the raw little-endian tensors; writing it
    # here lets the tensors stream from the maps instead of being gathered in memory.
    cols = _columns(res)
    header: dict[str, Any] = {
        "__metadata__": {
            "sslcli_embed": json.dumps(res.meta),
            "sslcli_index": json.dumps(_index_list(res.index)),
        }
    }
    offset = 0
    for name, a, dt in cols:
        nbytes = int(np.prod(a.shape, dtype=np.int64)) * dt.itemsize
        header[name] = {
            "dtype": _ST_DTYPES[dt.str],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, a, dt in cols:
            for chunk in _chunks(a, dt):
                f.write(chunk)


def _index_list(index: list[str] | np.ndarray) -> list[Any]:
    return index if isinstance(index, list) else [int(i) for i in index]


def _write_npz(res: Embeddings, path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, a, dt in _columns(res):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fp:
                np.lib.format.write_array_header_2_0(
                    fp, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False,
                         "shape": tuple(a.shape)},  # fmt: skip
                )
                for chunk in _chunks(a, dt):
                    fp.write(chunk)
        small: dict[str, np.ndarray] = {"meta": np.asarray(json.dumps(res.meta))}
        if isinstance(res.index, list):
            small["paths"] = np.asarray(res.index, dtype=np.str_)
        else:
            small["rows"] = np.asarray(res.index, dtype=np.int64)
        small["classes"] = np.asarray(res.classes or [], dtype=np.str_)
        for name, arr in small.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as fp:
                np.lib.format.write_array(fp, arr, allow_pickle=False)


def _write_parquet(res: Embeddings, path: Path) -> None:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    cols = _columns(res)
    n = len(res)
    files = isinstance(res.index, list)
    fields = [pa.field("path", pa.string()) if files else pa.field("row", pa.int64())]
    arrow_type = {"<f4": pa.float32(), "<f2": pa.float16(), "<i8": pa.int64()}
    for name, a, dt in cols:
        if a.ndim == 1:
            fields.append(pa.field("label", arrow_type[dt.str]))
        else:
            col = "embedding" if name == "embeddings" else name
            fields.append(pa.field(col, pa.list_(arrow_type[dt.str], int(a.shape[1]))))
    schema = pa.schema(fields, metadata={"sslcli_embed": json.dumps(res.meta)})
    row_bytes = sum(int(np.prod(a.shape[1:], dtype=np.int64)) * 8 for _, a, _ in cols) or 1
    step = max(1, CHUNK_BYTES // row_bytes)
    with pq.ParquetWriter(str(path), schema) as w:
        for s in range(0, n, step):
            e = min(n, s + step)
            arrays = [
                pa.array(res.index[s:e], type=pa.string())
                if files
                else pa.array(np.asarray(res.index[s:e], dtype=np.int64))
            ]
            for _, a, dt in cols:
                block = np.ascontiguousarray(a[s:e], dtype=dt)
                if block.ndim == 1:
                    arrays.append(pa.array(block))
                else:
                    arrays.append(
                        pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)),
                                                          int(block.shape[1]))
                    )  # fmt: skip
            w.write_table(pa.Table.from_arrays(arrays, schema=schema))


def load_embeddings(path: str | Path) -> Embeddings:
    """Read a file ``ssl embed`` wrote (any of its formats) back into arrays."""
    p = Path(path)
    if not p.is_file():
        raise EmbedError(f"embeddings file not found: {p}")
    fmt = format_of(p)
    try:
        if fmt == "safetensors":
            return _read_safetensors(p)
        if fmt == "npz":
            return _read_npz(p)
        return _read_parquet(p)
    except (KeyError, ValueError, OSError, json.JSONDecodeError, zipfile.BadZipFile) as e:
        raise EmbedError(f"{p} is not an embeddings file written by ssl embed ({e})") from e


def _read_safetensors(p: Path) -> Embeddings:
    with open(p, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    md = header.pop("__metadata__", {})
    meta = json.loads(md["sslcli_embed"])
    base = 8 + hlen

    def arr(name: str) -> np.ndarray | None:
        h = header.get(name)
        if h is None:
            return None
        a, b = h["data_offsets"]
        if b == a:
            return np.empty(h["shape"], dtype=_NP_DTYPES[h["dtype"]])
        # Memory-mapped: reading back a large file costs no memory until rows are touched.
        return np.memmap(p, dtype=_NP_DTYPES[h["dtype"]], mode="r", offset=base + a,
                         shape=tuple(h["shape"]))  # fmt: skip

    index = json.loads(md["sslcli_index"])
    emb = arr("embeddings")
    assert emb is not None
    return Embeddings(
        embeddings=emb,
        index=index if meta.get("index") == "path" else np.asarray(index, dtype=np.int64),
        labels=arr("labels"), classes=meta.get("classes"), neighbors=arr("neighbors"),
        similarities=arr("similarities"), meta=meta, path=p,
    )  # fmt: skip


def _read_npz(p: Path) -> Embeddings:
    with np.load(p, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        get = {k: z[k] for k in z.files}
    index = [str(s) for s in get["paths"]] if "paths" in get else get["rows"]
    return Embeddings(
        embeddings=get["embeddings"], index=index, labels=get.get("labels"),
        classes=meta.get("classes"), neighbors=get.get("neighbors"),
        similarities=get.get("similarities"), meta=meta, path=p,
    )  # fmt: skip


def _read_parquet(p: Path) -> Embeddings:
    _pyarrow()
    import pyarrow.parquet as pq

    table = pq.read_table(str(p))
    meta = json.loads((table.schema.metadata or {})[b"sslcli_embed"])
    names = table.column_names

    def matrix(col: str, dt: np.dtype[Any]) -> np.ndarray | None:
        if col not in names:
            return None
        c = table.column(col).combine_chunks()
        width = c.type.list_size
        return np.asarray(c.flatten().to_numpy(zero_copy_only=False), dtype=dt).reshape(-1, width)

    emb = matrix("embedding", DTYPES[meta["dtype"]])
    assert emb is not None
    index: list[str] | np.ndarray = (
        [str(s) for s in table.column("path").to_pylist()]
        if "path" in names
        else table.column("row").to_numpy()
    )
    labels = table.column("label").to_numpy() if "label" in names else None
    return Embeddings(
        embeddings=emb, index=index, labels=labels, classes=meta.get("classes"),
        neighbors=matrix("neighbors", np.dtype(np.int64)),
        similarities=matrix("similarities", np.dtype(np.float32)), meta=meta, path=p,
    )  # fmt: skip
