"""``heads.safetensors`` (``ssl export --with-heads``): the method's modules outside its
encoders (projectors, predictors, prototypes), written and read here.

The file's ``sslcli`` metadata describes the method (registry name, package and version,
resolved options, backbone) and every head's module structure, so :func:`load_heads`
rebuilds the method as installed now and refuses heads that no longer fit it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslcli.errors import TargetError
from sslcli.fsutil import atomic_write_safetensors
from sslcli.runs.layout import EXPORT_WEIGHTS, HEADS_WEIGHTS
from sslcli.runs.rebuild import Target, build_from_meta, strip_prefixes


def head_state(method: nn.Module) -> dict[str, Tensor]:
    """Parameters (and normalisation statistics) of every module outside the encoders.

    Encoders are the timm models sslcli built (they carry ``sslcli_spec``); what remains
    are projection/prediction heads, prototypes and the like. Buffers are kept only where
    they belong to a layer with parameters or to a normalisation layer, so queues, memory
    banks and centres (training state, not network) stay out.
    """
    from torch.nn.modules.batchnorm import _NormBase

    out: dict[str, Tensor] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        if hasattr(mod, "sslcli_spec"):
            return
        own_params = dict(mod.named_parameters(recurse=False))
        for n, p in own_params.items():
            if p is not None:
                out[prefix + n] = p
        if own_params or isinstance(mod, _NormBase):
            for n, b in mod.named_buffers(recurse=False):
                if b is not None and n not in mod._non_persistent_buffers_set:
                    out[prefix + n] = b
        for n, child in mod.named_children():
            walk(child, f"{prefix}{n}.")

    for n, child in method.named_children():
        walk(child, f"{n}.")
    return {k: v.detach().cpu().contiguous().clone() for k, v in strip_prefixes(out).items()}


def _qualname(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def heads_structure(method: nn.Module, heads: dict[str, Tensor]) -> dict[str, Any]:
    """Each head's module structure: its class, every submodule's class (encoders inside
    it left out) and every tensor's shape and dtype; ``heads`` as :func:`head_state`."""
    structure: dict[str, Any] = {}
    for key, v in heads.items():
        top = key.split(".")[0]
        entry = structure.setdefault(top, {"class": "", "modules": {}, "tensors": {}})
        entry["tensors"][key[len(top) + 1 :]] = {"shape": list(v.shape), "dtype": str(v.dtype)}
    for top, entry in structure.items():
        mod = getattr(method, top)
        entry["class"] = _qualname(mod)
        entry["modules"] = {
            n: _qualname(m)
            for n, m in mod.named_modules()
            if n and not any(hasattr(a, "sslcli_spec") for a in [*_ancestors(mod, n), m])
        }
    return structure


def heads_description(t: Any, which: str, heads: dict[str, Tensor]) -> dict[str, Any]:
    """What ``heads.safetensors`` carries besides the tensors (its ``sslcli`` metadata):
    enough to rebuild the heads with :func:`sslcli.load_heads` — the method, the package
    and version that registered it, the run's resolved config (the method's options
    included), the backbone as built, the data set size, the exported encoder, and each
    head's module structure (:func:`heads_structure`) to check the rebuild by."""
    from sslcli import registry

    return {
        "method": t.method_name,
        "step": t.step,
        "which": which,
        "plugin": registry.info_of(type(t.method)).record(),
        "config": t.config,
        "backbone": t.meta.get("backbone"),
        "dataset_size": t.meta.get("dataset_size"),
        "heads": heads_structure(t.method, heads),
    }


def _ancestors(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules strictly between ``root`` and the submodule at ``path``."""
    out, cur = [], root
    for part in path.split(".")[:-1]:
        cur = getattr(cur, part)
        out.append(cur)
    return out


def write_heads(t: Target, which: str, path: Path) -> Path | None:
    """Write ``t``'s heads to ``path`` (None, nothing written, when it has none)."""
    if t.method is None:
        raise TargetError("--with-heads needs a run or checkpoint (it has the heads)")
    heads = head_state(t.method)
    if not heads:
        return None
    meta = {"sslcli": json.dumps(heads_description(t, which, heads))}
    atomic_write_safetensors(heads, path, meta)
    return path


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
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

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
