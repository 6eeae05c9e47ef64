"""Rebuild a trained encoder from whatever the user points at.

A *target* is one of:

* a run directory (``runs/simclr-20250101-120000``): its ``checkpoints/last.safetensors``;
* a checkpoint file (``.../checkpoints/step-00000100.safetensors``) or a ``checkpoints/``
  directory;
* an exported directory (``ssl export``'s ``model.safetensors`` + timm ``config.json``).

Checkpoints rebuild the whole method (plugin class, resolved config, backbone spec,
``load_state_dict``), so evaluation uses ``method.embed`` exactly as training's kNN does and
export can choose among ``method.export_candidates()``. Exported directories rebuild the
plain timm model from its ``config.json`` (see :func:`sslcli.load_timm`).

Nothing here unpickles: checkpoints and exports are safetensors + JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sslcli.errors import CheckpointError, CorruptCheckpoint, TargetError
from sslcli.runs import checkpoint as ckpt
from sslcli.runs.export import load_export
from sslcli.runs.layout import EXPORT_WEIGHTS, is_export_dir, latest_run, run_dir_of
from sslcli.runs.rebuild import Target, TargetKind, rebuild_method


def load_target(target: str | Path | None, *, device: torch.device | None = None) -> Target:
    """Rebuild ``target`` (None: the most recent run under ./runs) on ``device`` (CPU)."""
    path = latest_run() if target is None else Path(target)
    if not path.exists():
        raise TargetError(
            f"target not found: {path} (give a run directory, a checkpoint file or an "
            "exported directory)"
        )
    path = path.resolve()
    if is_export_dir(path):
        t = load_export(path)
    elif path.is_file() and path.name == EXPORT_WEIGHTS and is_export_dir(path.parent):
        t = load_export(path.parent)
    else:
        t = load_checkpoint_target(path)
    return t.to(device) if device is not None else t


def load_checkpoint_target(path: Path) -> Target:
    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        raise TargetError(f"run {path} has no checkpoint yet (no checkpoints/ directory)")
    try:
        # A run directory whose last.safetensors is damaged falls back to the newest step
        # file that verifies (and says so); a named file must verify itself.
        file, groups, meta = ckpt.find_resumable(path, _note)
    except CorruptCheckpoint:
        raise
    except CheckpointError as e:
        if "corrupt" in str(e) or "unusable" in str(e):
            raise
        raise TargetError(
            f"{e} (expected a run directory, a checkpoint file or an exported directory)"
        ) from e
    method = rebuild_method(meta, groups.get("model", {}), source=file)
    run_dir = run_dir_of(file)
    kind: TargetKind = "run" if path.is_dir() and run_dir == path else "checkpoint"
    view = method.views()[0]
    cands = dict(method.export_candidates())
    if not cands:
        raise TargetError(f"{file}: method {method.name!r} exports no encoder")
    method.eval()
    return Target(
        kind=kind,
        path=path,
        weights=file,
        run_dir=run_dir,
        method_name=method.name,
        step=meta.get("step"),
        image_size=int(method.backbone.sslcli_spec.image_size),
        normalize=view.normalize,
        mean=tuple(view.mean),  # type: ignore[arg-type]
        std=tuple(view.std),  # type: ignore[arg-type]
        candidates=cands,
        method=method,
        config=meta.get("config", {}),
        meta=meta,
    )


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)
