"""What a run's weights rebuild into: a :class:`Target` (the method or the plain timm
model, with how it was trained) and the method itself from a checkpoint's metadata.

The readers of the two formats (:mod:`sslcli.runs.checkpoint`, :mod:`sslcli.runs.export`)
and the dispatcher over what the user names (:mod:`sslcli.runs.targets`) build on this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sslcli.errors import TargetError

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
