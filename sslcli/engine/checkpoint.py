"""Checkpoints: one safetensors file per checkpoint, no pickle anywhere.

Tensors (model, optimiser state, RNG states) are safetensors entries; counters, optimiser
hyper-parameters and the resolved config travel as JSON in the file's metadata. One file
means one atomic rename: it is written under a temporary name in the same directory,
flushed to disk and renamed, so a crash or a full disk never leaves a half-written
checkpoint behind and the previous one stays usable.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from sslcli.errors import CheckpointError

LAST = "last.safetensors"
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
    directory.mkdir(parents=True, exist_ok=True)
    flat = {f"{g}/{k}": v for g, ts in groups.items() for k, v in ts.items()}
    final = directory / f"step-{step:08d}.safetensors"
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    link_tmp = directory / f".{LAST}.tmp-{os.getpid()}"
    try:
        save_file(_independent(flat), str(tmp), metadata={"sslcli": json.dumps(meta)})
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


def read_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, without reading its tensors."""
    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_raw = (f.metadata() or {}).get("sslcli")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
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
    groups: dict[str, dict[str, Tensor]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                g, _, name = k.partition("/")
                groups.setdefault(g, {})[name] = f.get_tensor(k)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    return groups, meta


def resolve(path: Path) -> Path:
    """A run directory, its checkpoints directory or a checkpoint file -> the file."""
    path = Path(path)
    if path.is_dir():
        for cand in (path / "checkpoints" / LAST, path / LAST):
            if cand.is_file():
                return cand
        raise CheckpointError(f"no checkpoint found in {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path
