"""Frozen features, extracted once and reused: the linear probe's sweeps and every later
``ssl eval`` on the same checkpoint and data cost no encoder pass.

A cache entry is keyed by everything that decides the features: the weights (SHA-256 of
the checkpoint or exported file), which encoder, the dataset (spec, split, size, labels),
the transform (image size, load size, normalisation) and the numeric set-up (device type,
autocast dtype). The key's JSON is stored in the file's metadata and compared on read, so
a changed input is a miss, never a stale hit. Entries live in ``<run>/eval-cache/`` for
runs and checkpoints inside a run, else in ``$SSLCLI_CACHE_DIR`` (default
``~/.cache/sslcli/features``). Files are safetensors written to a temporary name and
renamed, so an interrupted write leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslcli.data.images import ImageDataset
from sslcli.eval.features import extract
from sslcli.runs.rebuild import Target
from sslcli.runtime import autocast, eval_mode

CACHE_SUBDIR = "eval-cache"
FORMAT = 1


def default_cache_dir(target: Target) -> Path:
    if target.run_dir is not None:
        return target.run_dir / CACHE_SUBDIR
    env = os.environ.get("SSLCLI_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "sslcli" / "features"


def dataset_identity(dataset: ImageDataset) -> dict[str, Any]:
    labels = dataset.labels.to(torch.int64).contiguous().numpy().tobytes()
    return {
        "name": dataset.name,
        "split": dataset.split,
        "size": len(dataset),
        "load_size": dataset.load_size,
        "type": type(dataset).__name__,
        "labels_sha256": hashlib.sha256(labels).hexdigest(),
    }


def feature_key(
    target: Target,
    which: str | None,
    dataset: ImageDataset,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "weights_sha256": target.fingerprint(),
        "which": which,
        "data": dataset_identity(dataset),
        "image_size": target.image_size,
        "normalize": target.normalize,
        "mean": list(target.mean),
        "std": list(target.std),
        "device": device.type,
        "dtype": str(dtype) if dtype is not None else "float32",
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


@dataclass
class CachedFeatures:
    features: Tensor
    labels: Tensor
    status: str
    """"hit", "miss" (computed and stored) or "off" (caching disabled)."""
    path: Path | None


def read_entry(path: Path, key: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("sslcli_cache", "null"))
            if stored != key:
                return None
            return f.get_tensor("features"), f.get_tensor("labels")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError):
        return None  # an unreadable entry is recomputed and overwritten


def write_entry(path: Path, key: dict[str, Any], features: Tensor, labels: Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(
            {"features": features.contiguous(), "labels": labels.contiguous()},
            str(tmp),
            metadata={"sslcli_cache": json.dumps(key)},
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def features(
    target: Target,
    dataset: ImageDataset,
    *,
    which: str | None = None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> CachedFeatures:
    """Features [N, D] (float32, CPU) and labels [N] of ``dataset`` under ``target``'s
    evaluation transform, from the cache when possible."""
    key = feature_key(target, which, dataset, device, dtype)
    path: Path | None = None
    if use_cache:
        path = (cache_dir or default_cache_dir(target)) / f"features-{key_digest(key)}.safetensors"
        hit = read_entry(path, key)
        if hit is not None:
            return CachedFeatures(hit[0], hit[1], "hit", path)
    embed = target.embedder(which)
    with eval_mode(target.eval_module()), autocast(device, dtype):
        feats, labels = extract(
            embed, dataset, target.image_size, device, batch_size=batch_size,
            normalize=target.normalize, mean=target.mean, std=target.std,
            num_workers=num_workers,
        )  # fmt: skip
    feats, labels = feats.float().contiguous(), labels.long().contiguous()
    if path is not None:
        from safetensors import SafetensorError

        try:
            write_entry(path, key, feats, labels)
        except (OSError, SafetensorError):
            # A read-only run directory (or a full disk: safetensors reports it as a
            # SafetensorError) still evaluates; it just cannot remember.
            return CachedFeatures(feats, labels, "off", None)
        return CachedFeatures(feats, labels, "miss", path)
    return CachedFeatures(feats, labels, "off", None)
