"""``ssl embed``: the embedding of every image of a dataset, streamed to a file.

The encoder and transform are exactly those of ``ssl eval`` (:mod:`sslcli.runs.targets`'s target,
``method.embed`` unless ``which`` names an encoder, the run's un-augmented eval transform
and autocast set-up), so a row equals the feature ``ssl eval`` computes for that image.

Memory does not grow with the data set: features are computed a batch at a time and
written into a temporary memory-mapped ``N x D`` float32 file next to the output (``N``
is the split's size, an upper bound: unreadable images are skipped). The optional
neighbours are computed from that map in blocks (:func:`sslcli.eval.neighbors.nearest`)
into two more maps, and the output is then written from the maps
(:mod:`sslcli.eval.embeddings`, which holds the formats) — only the index (one path or
number per row) is held in memory.

A corrupt image is skipped and named, as in training: the dataset warns about it and
replaces it by the next readable image; that substitute's index gives the skip away, so
the row is dropped instead of embedding one image twice.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sslcli.data.datasets import SPLITS, open_dataset
from sslcli.data.images import FileImageDataset, ImageDataset
from sslcli.errors import DataError, EmbedError
from sslcli.eval.embeddings import (
    DTYPES,
    FORMAT_VERSION,
    Embeddings,
    format_of,
    load_embeddings,
    write,
)
from sslcli.eval.features import iter_features
from sslcli.eval.neighbors import nearest
from sslcli.runs.rebuild import Target
from sslcli.runs.targets import load_target
from sslcli.runtime import autocast, eval_mode, pick_device, pick_dtype


def _quiet(msg: str) -> None:
    pass


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
