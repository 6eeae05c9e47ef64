"""Checkpoints: one safetensors file per checkpoint, no pickle anywhere.

Tensors (model, optimiser state, RNG states) are safetensors entries; counters, optimiser
hyper-parameters and the resolved config travel as JSON in the file's metadata. One file
means one atomic rename: it is written under a temporary name in the same directory,
flushed to disk and renamed, so a crash or a full disk never leaves a half-written
checkpoint behind and the previous one stays usable.

Every checkpoint carries a SHA-256 of its metadata and tensor bytes (metadata key
``sslcli_sha256``), verified on every load: a file damaged after it was written (a bad
disk, a bit flip, a partial copy) is refused instead of silently training or evaluating
wrong weights, and resuming a run directory falls back to the newest checkpoint that
verifies (:func:`find_resumable`). A model whose weights are not all finite is never
written (:class:`NonFiniteCheckpoint`), so ``last.safetensors`` is always usable.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from sslcli.errors import CheckpointError, CorruptCheckpoint, NonFiniteCheckpoint

LAST = "last.safetensors"
CHECKSUM_KEY = "sslcli_sha256"
_STEP_RE = re.compile(r"^step-(\d+)\.safetensors$")
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able metadata."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        idx, _, k = key.partition(".")
        state.setdefault(int(idx), {})[k] = v
    for idx, st in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def _independent(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors sharing storage; copy the second and later sharers."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and key in seen:
            v = v.clone()
        seen.add(key)
        out[k] = v
    return out


def checksum(flat: dict[str, Tensor], meta_json: str) -> str:
    """SHA-256 over the metadata and every tensor's name, dtype, shape and bytes, in name
    order: what a checkpoint holds, independent of how safetensors lays it out."""
    h = hashlib.sha256(meta_json.encode())
    for k in sorted(flat):
        v = flat[k].detach().cpu().contiguous()
        h.update(f"\0{k}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        if v.numel():
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _nonfinite(tensors: dict[str, Tensor]) -> list[str]:
    return [
        k
        for k, v in tensors.items()
        if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())
    ]


def save(
    directory: Path,
    step: int,
    groups: dict[str, dict[str, Tensor]],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step-<step>.safetensors`` and point ``last.safetensors`` at it, atomically.

    ``groups`` maps a prefix ("model", "optim", "rng") to its tensors. On failure the
    temporary file is removed and a :class:`CheckpointError` names the checkpoint that is
    still intact. safetensors reports I/O failures (a full disk) as ``SafetensorError``,
    not ``OSError``; both are caught.
    """
    bad = _nonfinite(groups.get("model", {}))
    if bad:
        prev = directory / LAST
        kept = (
            f"the last good checkpoint is {prev} (step {_step_of(prev)})"
            if prev.is_file()
            else "no checkpoint was written"
        )
        raise NonFiniteCheckpoint(
            f"the weights are not finite at step {step} ({len(bad)} tensors, e.g. "
            f"{bad[0].partition('/')[2]}): not saved; {kept}; try a lower learning rate "
            "(--set optim.lr=...) or --precision fp32"
        )
    flat = _independent({f"{g}/{k}": v for g, ts in groups.items() for k, v in ts.items()})
    final = directory / f"step-{step:08d}.safetensors"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    link_tmp = directory / f".{LAST}.tmp-{os.getpid()}"
    meta_json = json.dumps(meta)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            flat,
            str(tmp),
            metadata={"sslcli": meta_json, CHECKSUM_KEY: checksum(flat, meta_json)},
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        # "last" is a hard link made under a temporary name and renamed over the old one,
        # so readers always see a complete file.
        if link_tmp.exists():
            link_tmp.unlink()
        try:
            os.link(final, link_tmp)
        except OSError:
            shutil.copyfile(final, link_tmp)
        os.replace(link_tmp, directory / LAST)
        _fsync_dir(directory)
    except (OSError, SafetensorError) as e:
        for p in (tmp, link_tmp):
            try:
                p.unlink()
            except OSError:
                pass
        prev = directory / LAST
        kept = (
            f"the previous checkpoint {prev} (step {_step_of(prev)}) is intact"
            if prev.is_file()
            else "no earlier checkpoint exists"
        )
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise CheckpointError(
            f"could not write checkpoint at step {step} in {directory}: {reason}; {kept}"
        ) from e
    _prune(directory, keep)
    return final


def _step_of(path: Path) -> str:
    try:
        return str(read_meta(path).get("step", "?"))
    except CheckpointError:
        return "?"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(directory: Path, keep: int) -> None:
    """Keep the ``keep`` most recent step files (``last`` is a separate link) and remove
    temporary files a killed process left behind."""
    steps = sorted(p for p in directory.iterdir() if _STEP_RE.match(p.name))
    stale = [p for p in directory.iterdir() if _TMP_RE.match(p.name) and not _ours(p)]
    for old in steps[:-keep] + stale:
        try:
            old.unlink()
        except OSError:
            pass


def _ours(path: Path) -> bool:
    return path.name.endswith(f".tmp-{os.getpid()}")


def _read_raw(path: Path) -> tuple[str | None, str | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return md.get("sslcli"), md.get(CHECKSUM_KEY)


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without reading its tensors."""
    path = resolve(path)
    meta_raw, _ = _read_raw(path)
    if meta_raw is None:
        raise CheckpointError(f"{path} is not an sslcli checkpoint (no sslcli metadata)")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has unreadable sslcli metadata: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has unreadable sslcli metadata")
    return meta


def load(path: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Read a checkpoint written by :func:`save` (safetensors + JSON: never unpickles)."""
    path = resolve(path)
    meta = read_meta(path)
    meta_raw, expected = _read_raw(path)
    flat: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                flat[k] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    # (Checkpoints written before checksums existed have none and load unverified.)
    if expected is not None and checksum(flat, meta_raw or "") != expected:
        raise CorruptCheckpoint(
            f"checkpoint {path} is corrupt: its contents do not match the checksum written "
            "with it"
        )
    groups: dict[str, dict[str, Tensor]] = {}
    for k, v in flat.items():
        g, _, name = k.partition("/")
        groups.setdefault(g, {})[name] = v
    return groups, meta


def candidates(directory: Path) -> list[Path]:
    """A run's (or a checkpoints directory's) checkpoints, newest first: ``last``, then the
    step files by step."""
    directory = Path(directory)
    ck = directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory
    steps = sorted((p for p in ck.iterdir() if _STEP_RE.match(p.name)), reverse=True)
    last = ck / LAST
    return ([last] if last.is_file() else []) + steps


def find_resumable(
    path: Path, say: Callable[[str], None] | None = None
) -> tuple[Path, dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The newest checkpoint of ``path`` that reads and verifies, with its contents.

    A file is taken as named (an error if it does not verify). For a run directory, a
    missing or damaged ``last.safetensors`` falls back to the newest intact step file, and
    ``say`` is told which one and why.
    """
    path = Path(path)
    if not path.is_dir():
        file = resolve(path)
        groups, meta = load(file)
        return file, groups, meta
    cands = candidates(path)
    if not cands:
        raise CheckpointError(f"no checkpoint found in {path}")
    problems: list[str] = []
    if not (cands[0].name == LAST):
        problems.append(f"{LAST} is missing")
    for cand in cands:
        try:
            groups, meta = load(cand)
        except CheckpointError as e:
            problems.append(f"{cand.name} is unusable ({e})")
            continue
        if problems and say is not None:
            say(f"using {cand} (step {meta.get('step', '?')}) because {'; '.join(problems)}")
        return cand, groups, meta
    raise CheckpointError(f"no intact checkpoint in {path}: {'; '.join(problems)}")


def resolve(path: Path) -> Path:
    """A run directory, its checkpoints directory or a checkpoint file -> the file."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / "checkpoints" / LAST, path / LAST):
            if cand.is_file():
                return cand
        steps = [p for p in candidates(path) if p.name != LAST] if _has_ckpt_dir(path) else []
        if steps:
            # last.safetensors deleted (by hand, or a copy that skipped it): the newest
            # step file is the run's latest state.
            return steps[0]
        raise CheckpointError(f"no checkpoint found in {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _has_ckpt_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or any(_STEP_RE.match(p.name) for p in path.iterdir())
