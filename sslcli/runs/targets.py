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

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sslcli.data.views import IMAGENET_MEAN, IMAGENET_STD
from sslcli.errors import TargetError, CheckpointError, SSLError

RUNS_DIR = Path("runs")
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"


TargetKind = Literal["run", "checkpoint", "export"]


@dataclass
class Target:
    """A rebuilt, evaluation-ready encoder and what is known about how it was trained."""

    kind: TargetKind
    path: Path
    """What the user named (resolved)."""
    weights: Path
    """The file the weights came from (checkpoint or model.safetensors)."""
    run_dir: Path | None
    """The run the weights belong to (eval events are appended to its metrics.jsonl)."""
    method_name: str | None
    """The method's registry name (None for an export of unknown origin)."""
    step: int | None
    image_size: int
    normalize: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    candidates: dict[str, nn.Module]
    """Encoders by name (``export_candidates()``; {"model": timm model} for exports)."""
    method: nn.Module | None = None
    """The whole rebuilt method (None for exports)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved run config (``config.json`` of the run), {} when unknown."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Checkpoint metadata, or the export's config.json."""
    _fingerprint: str | None = None

    # -- what gets evaluated ----------------------------------------------------------------
    @property
    def default_which(self) -> str:
        return next(iter(self.candidates))

    def check_which(self, which: str | None) -> None:
        if which is not None and which not in self.candidates:
            raise TargetError(
                f"--which {which!r}: {self.describe()} has the encoders "
                f"{', '.join(self.candidates)}"
            )

    def embedder(self, which: str | None = None) -> Callable[[Tensor], Tensor]:
        """The features kNN / linear use: ``method.embed`` unless an encoder is named."""
        self.check_which(which)
        if which is None and self.method is not None:
            return self.method.embed  # type: ignore[no-any-return]
        return self.candidates[which or self.default_which]

    def eval_module(self) -> nn.Module:
        """The module whose train/eval mode and device matter for :meth:`embedder`."""
        return self.method if self.method is not None else self.candidates[self.default_which]

    def to(self, device: torch.device) -> Target:
        self.eval_module().to(device)
        for m in self.candidates.values():
            m.to(device)
        return self

    # -- identity ------------------------------------------------------------------------------
    @property
    def dataset(self) -> str | None:
        """The dataset the encoder was trained on (the default ``--data``)."""
        ds = self.config.get("data", {}).get("dataset")
        return ds if isinstance(ds, str) else None

    @property
    def load_size(self) -> int:
        ls = self.config.get("data", {}).get("load_size")
        return int(ls) if ls else self.image_size

    def fingerprint(self) -> str:
        """SHA-256 of the weights file: the model part of feature-cache keys."""
        if self._fingerprint is None:
            self._fingerprint = file_sha256(self.weights)
        return self._fingerprint

    def describe(self) -> str:
        what = {"run": "run", "checkpoint": "checkpoint", "export": "exported model"}[self.kind]
        step = f", step {self.step}" if self.step is not None else ""
        name = f" ({self.method_name}{step})" if self.method_name else ""
        return f"{what} {self.path}{name}"


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Finding the target
# ---------------------------------------------------------------------------------------------


def latest_run(root: Path = RUNS_DIR) -> Path:
    """The run under ``root`` with the most recent checkpoint (what a bare command uses)."""
    if not root.is_dir():
        raise TargetError(
            f"no TARGET given and no {root}/ directory here: name a run directory, a "
            "checkpoint or an exported directory"
        )
    best: tuple[float, Path] | None = None
    for d in root.iterdir():
        last = d / "checkpoints" / "last.safetensors"
        if d.is_dir() and last.is_file():
            t = last.stat().st_mtime
            if best is None or t > best[0]:
                best = (t, d)
    if best is None:
        raise TargetError(f"no TARGET given and no run under {root}/ has a checkpoint")
    return best[1]


def is_export_dir(path: Path) -> bool:
    cfg = path / EXPORT_CONFIG
    if not (path.is_dir() and cfg.is_file() and (path / EXPORT_WEIGHTS).is_file()):
        return False
    try:
        return "architecture" in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file lies in, if it is in one."""
    for cand in (checkpoint.parent.parent, checkpoint.parent):
        if (cand / "config.json").is_file() and (cand / "checkpoints").is_dir():
            return cand
    return None


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


# ---------------------------------------------------------------------------------------------
# Checkpoints and runs
# ---------------------------------------------------------------------------------------------


def strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys without wrapper names: a leading ``module.`` (DistributedDataParallel) and any
    ``_orig_mod`` segment (torch.compile wraps a submodule, e.g. ``backbone._orig_mod.``)."""
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        k = ".".join(p for p in k.split(".") if p != "_orig_mod")
        out[k] = v
    return out


def load_checkpoint_target(path: Path) -> Target:
    from sslcli.runs import checkpoint as ckpt

    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        raise TargetError(f"run {path} has no checkpoint yet (no checkpoints/ directory)")
    try:
        # A run directory whose last.safetensors is damaged falls back to the newest step
        # file that verifies (and says so); a named file must verify itself.
        file, groups, meta = ckpt.find_resumable(path, _note)
    except ckpt.CorruptCheckpoint:
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


def rebuild_method(
    meta: dict[str, Any], state: dict[str, Tensor], *, source: Path | str = "checkpoint"
) -> Any:
    """The plugin class, config and backbone of a checkpoint, with its weights loaded."""
    method = build_from_meta(meta, source=source)
    name = method.name
    state = strip_prefixes(state)
    own = method.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        # A few names of each kind: a whole list of keys is not a one-line error.
        parts = [
            f"{len(keys)} {what} keys (e.g. {', '.join(keys[:2])})"
            for what, keys in (
                ("missing", missing), ("unexpected", unexpected), ("reshaped", shapes)
            )
            if keys
        ]  # fmt: skip
        raise TargetError(
            f"{source}: weights do not fit method {name!r} as installed now: "
            f"{'; '.join(parts)} — was it trained with another sslcli version?"
        )
    method.load_state_dict(state, strict=True)
    return method


def build_from_meta(meta: dict[str, Any], *, source: Path | str = "checkpoint") -> Any:
    """A fresh method as a checkpoint's (or heads file's) metadata describes it: the
    registered plugin class, the resolved options, the backbone spec as trained."""
    from sslcli import config as cfg
    from sslcli import registry
    from sslcli.backbones import BackboneSpec, spec_from_meta

    config = meta.get("config")
    bmeta = meta.get("backbone")
    if not isinstance(config, dict) or not isinstance(bmeta, dict):
        raise TargetError(f"{source}: checkpoint metadata lacks the run config or backbone")
    name = cfg.method_name_of(config)
    if not name:
        raise TargetError(f"{source}: checkpoint does not say which method trained it")
    method_cls = registry.load_for_run(name, meta.get("plugin"), source=str(source))
    _, mcfg = cfg.resolve(method_cls, [config])
    # The spec exactly as trained (not re-derived from the alias), so a changed alias table
    # or default cannot silently rebuild a different network; validated as user input is
    # (the metadata is a file's word: no hub names, no file-opening arguments).
    spec: BackboneSpec = spec_from_meta(bmeta, str(source))
    from sslcli.contract import build_method

    # A plugin whose __init__ fails is named in one line, as in training.
    method = build_method(method_cls, mcfg, spec.build(), int(meta.get("dataset_size") or 0))
    return method


# ---------------------------------------------------------------------------------------------
# Exported directories
# ---------------------------------------------------------------------------------------------


def _note(msg: str) -> None:
    import sys

    print(f"note: {msg}", file=sys.stderr)


def check_export_config(cfg: Any, path: Path) -> dict[str, Any]:
    """An export's config.json, validated as user input is (one line per problem): the
    architecture through :func:`sslcli.backbones.resolve_name`, ``model_args`` through the
    allow-list, file names inside the directory, field types through pydantic."""
    from pydantic import BaseModel, ConfigDict, ValidationError

    from sslcli.backbones import check_kwargs, resolve_name
    from sslcli.config import format_validation_error
    from sslcli.errors import BackboneError

    class _Loose(BaseModel):
        model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    class Pretrained(_Loose):
        input_size: tuple[int, int, int] = (3, 224, 224)
        mean: tuple[float, ...] = IMAGENET_MEAN
        std: tuple[float, ...] = IMAGENET_STD

    class Companion(_Loose):
        which: str
        file: str
        architecture: str
        model_args: dict[str, Any] = {}

    class Paired(_Loose):
        which: str
        companion: Companion
        color_space: str

    class Extra(_Loose):
        method: str | None = None
        step: int | None = None
        dataset: str | None = None
        load_size: int | None = None
        paired_views: Paired | None = None

    class ExportConfig(_Loose):
        architecture: str
        model_args: dict[str, Any] = {}
        pretrained_cfg: Pretrained = Pretrained()
        sslcli: Extra = Extra()

    if not isinstance(cfg, dict):
        raise TargetError(f"{path / EXPORT_CONFIG}: not a JSON object")
    try:
        model = ExportConfig(**cfg)
    except ValidationError as e:
        raise TargetError(
            f"{path / EXPORT_CONFIG}: {'; '.join(format_validation_error(e))}"
        ) from e
    try:
        resolve_name(model.architecture)
        check_kwargs(model.model_args, f"{path / EXPORT_CONFIG}: model_args")
        pair = model.sslcli.paired_views
        if pair is not None:
            resolve_name(pair.companion.architecture)
            check_kwargs(pair.companion.model_args, f"{path / EXPORT_CONFIG}: companion")
    except BackboneError as e:
        raise TargetError(f"cannot load exported model {path}: {e}") from e
    if pair is not None:
        name = pair.companion.file
        inside = Path(name).name == name and name not in ("", ".", "..")
        if not inside or (path / name).resolve().parent != path.resolve():
            raise TargetError(
                f"cannot load exported model {path}: its companion weight file {name!r} "
                "is not a file of the directory"
            )
    return cfg


def load_export(path: Path) -> Target:
    from safetensors import SafetensorError

    from sslcli.runs.export import load_timm

    try:
        cfg = json.loads((path / EXPORT_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TargetError(f"cannot load exported model {path}: {e}") from e
    cfg = check_export_config(cfg, path)
    try:
        model = load_timm(path)
    except (
        OSError, RuntimeError, KeyError, ValueError, TypeError, AssertionError, SafetensorError
    ) as e:  # fmt: skip
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TargetError(f"cannot load exported model {path}: {first}") from e
    model.eval()
    pc = cfg.get("pretrained_cfg", {})
    extra = cfg.get("sslcli", {})
    size = int(pc.get("input_size", [3, 224, 224])[-1])
    mean = tuple(pc.get("mean", IMAGENET_MEAN))
    std = tuple(pc.get("std", IMAGENET_STD))
    normalize = not (all(m == 0 for m in mean) and all(s == 1 for s in std))
    in_chans = int((cfg.get("model_args") or {}).get("in_chans", 3))
    if in_chans != 3 and not extra.get("paired_views"):
        raise TargetError(
            f"cannot evaluate exported model {path}: it takes {in_chans}-channel inputs and "
            "sslcli evaluates RGB images (a CMC run exported now writes both colour-view "
            "encoders, which take RGB together)"
        )
    if len(mean) != 3 or len(std) != 3:
        # A single colour-view encoder (CMC's L: 1 channel) records its own statistics;
        # sslcli feeds exports RGB, and such methods train on un-normalised pixels.
        if normalize:
            raise TargetError(
                f"cannot evaluate exported model {path}: its mean/std are for "
                f"{len(mean)} input channel(s) and sslcli evaluates RGB images"
            )
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    run_cfg: dict[str, Any] = {}
    if extra.get("dataset"):
        run_cfg = {"data": {"dataset": extra["dataset"], "load_size": extra.get("load_size")}}
    return Target(
        kind="export",
        path=path,
        weights=path / EXPORT_WEIGHTS,
        run_dir=None,
        method_name=extra.get("method"),
        step=extra.get("step"),
        image_size=size,
        normalize=normalize,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        candidates={"model": model},
        method=None,
        config=run_cfg,
        meta=cfg,
    )


def load_heads(directory: str | Path) -> Any:
    """The method of an ``ssl export --with-heads`` directory, rebuilt from the description
    in ``heads.safetensors`` (method, package and version, resolved options, backbone) with
    its heads and the exported encoder loaded, in eval mode.

    The heads (projectors, predictors, prototypes: the modules outside the encoders) are
    checked against the recorded structure (every submodule's class, every tensor's name
    and shape) and loaded strictly; the exported encoder (``model.safetensors``) is loaded
    into the candidate it was exported from. Other encoders (a momentum teacher's backbone)
    and training state (queues, memory banks) keep their fresh values: they are not in an
    export. ``method.projector(method.embed(x))`` then gives the trained run's projection.
    """
    import json

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from sslcli.runs.export import EXPORT_WEIGHTS, HEADS_WEIGHTS, head_state, heads_structure

    d = Path(directory)
    file = d / HEADS_WEIGHTS
    if not file.is_file():
        raise TargetError(f"{d}: no {HEADS_WEIGHTS} (export the run with --with-heads)")
    try:
        with safe_open(str(file), "pt") as f:
            raw = (f.metadata() or {}).get("sslcli", "{}")
        desc = json.loads(raw)
        heads = load_file(str(file))
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise TargetError(f"{file}: unreadable ({e})") from e
    if not isinstance(desc, dict) or not isinstance(desc.get("heads"), dict):
        raise TargetError(
            f"{file} does not describe its heads (written by an older sslcli); export the "
            "run again with --with-heads"
        )
    method = build_from_meta(desc, source=file)
    own = head_state(method)
    rebuilt = heads_structure(method, own)
    for top, want in desc["heads"].items():
        got = rebuilt.get(top)
        if got != want:
            what = "is missing" if got is None else "differs in structure"
            raise TargetError(
                f"{file}: head {top!r} {what} in method {method.name!r} as installed now "
                f"(recorded: {want.get('class')}); was it exported by another version of "
                f"{desc.get('plugin', {}).get('package', 'its package')}?"
            )
    extra = sorted(set(own) - set(heads))
    if extra:
        raise TargetError(f"{file}: lacks head tensors the method has (e.g. {extra[0]})")
    with torch.no_grad():
        result = method.load_state_dict(heads, strict=False)
    if result.unexpected_keys:
        raise TargetError(f"{file}: holds tensors the method lacks ({result.unexpected_keys[0]})")
    which = desc.get("which")
    cands = method.export_candidates()
    if which in cands and (d / EXPORT_WEIGHTS).is_file():
        cands[which].load_state_dict(load_file(str(d / EXPORT_WEIGHTS)), strict=True)
    method.eval()
    return method
