"""Exact resume: what a checkpoint holds of a run, and whether a run may continue from it.

A checkpoint holds the model and method buffers, the optimiser state, every process's RNG
states (Python, NumPy, torch CPU and CUDA, the augmentation generator) and the per-step
values not yet averaged into a log line; everything else that shapes the rest of a run is
a pure function of the global step (:mod:`sslcli.engine.schedule`,
:mod:`sslcli.engine.batches`). On CPU, N steps + resume + N steps give the bit-identical
weights and log of 2N steps in one go. The file format itself is
:mod:`sslcli.runs.checkpoint`.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sslcli import registry
from sslcli.backbones import BackboneSpec
from sslcli.config import RunConfig, flatten_dotted
from sslcli.data.images import ImageDataset
from sslcli.errors import CheckpointError, ConfigError
from sslcli.method import Method, resume_safe_options
from sslcli.nn import dist
from sslcli.optim import match_param_layout
from sslcli.runs import checkpoint as ckpt
from sslcli.runtime import rng_state, seed_everything, set_rng_state

# Fields whose change makes a checkpoint's tensors meaningless for the new run. The data
# path may change (a dataset copied to a node's local disk); its format and size may not
# (memory banks hold one row per image), which is checked once the dataset is open.
ARCH_FIELDS = ("backbone", "method", "data.image_size")
# Fields that fix how steps map onto epochs and samples; a resume must keep them.
POSITION_FIELDS = ("trainer.batch_size",)
CHECKPOINT_FORMAT = 2
# Backbone constructor arguments that only set the initial weights: a checkpoint's weights
# replace them, so they may differ on resume.
INIT_ONLY_ARGS = ("zero_init_last", "weight_init")

Groups = dict[str, dict[str, Tensor]]


def config_diff(old: dict[str, Any], new: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """Dotted names under ``fields`` whose values differ between two resolved configs."""
    fo, fn = flatten_dotted(old), flatten_dotted(new)
    keys = sorted(set(fo) | set(fn))
    return [
        k
        for k in keys
        if any(k == f or k.startswith(f + ".") for f in fields) and fo.get(k) != fn.get(k)
    ]


def architecture_diff(
    old: dict[str, Any], new: dict[str, Any], resume_safe: frozenset[str] = frozenset()
) -> list[str]:
    """Dotted names of architecture fields that differ between two resolved configs;
    ``resume_safe``: method options marked safe to change (``method.NAME`` left out)."""
    return [
        k
        for k in config_diff(old, new, ARCH_FIELDS)
        if not (k.startswith("method.") and k.split(".")[1] in resume_safe)
    ]


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint file lies in."""
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


# -- may this run continue from that checkpoint? ---------------------------------------------------
def check_resumable(
    path: Path,
    meta: dict[str, Any],
    run: RunConfig,
    method_cls: type[Method],
    say: Callable[[str], None],
) -> None:
    """Refuse a config whose architecture or batch differs from the checkpoint's; say
    which method options (marked safe to change) do."""
    old, new = meta.get("config", {}), run.to_json_dict()
    safe = resume_safe_options(method_cls.Config)
    arch = architecture_diff(old, new, safe)
    fo, fn = flatten_dotted(old), flatten_dotted(new)
    if arch:
        what = ", ".join(f"{k} ({fo.get(k)!r} -> {fn.get(k)!r})" for k in arch)
        raise ConfigError([f"cannot resume {path}: the architecture differs in {what}"])
    pos = config_diff(old, new, POSITION_FIELDS)
    if pos:
        raise ConfigError(
            [f"cannot resume {path}: {', '.join(pos)} differs "
             f"({fo.get(pos[0])} -> {fn.get(pos[0])}); the step "
             "would no longer map to the same epoch and samples"]
        )  # fmt: skip
    changed = [k for k in config_diff(old, new, ("method",)) if k not in arch]
    if changed:
        say("resuming with changed options (marked safe to change): " + ", ".join(
            f"{k} {fo.get(k)!r} -> {fn.get(k)!r}" for k in changed))  # fmt: skip


def check_same_data(
    path: Path, meta: dict[str, Any], dataset: ImageDataset, data_name: str
) -> None:
    """Refuse data of another size or format than the checkpoint's (memory banks hold one
    row per image)."""
    n = len(dataset)
    saved = meta.get("dataset_size")
    if saved is not None and int(saved) != n:
        raise ConfigError(
            [f"cannot resume {path}: it was trained on {saved} images, "
             f"{data_name} now has {n}"]
        )  # fmt: skip
    old_fmt = str(meta.get("dataset", "")).partition(":")[0]
    new_fmt = dataset.name.partition(":")[0]
    if old_fmt and old_fmt != new_fmt:
        raise ConfigError(
            [f"cannot resume {path}: it was trained on {old_fmt} data, "
             f"{data_name} is {new_fmt}"]
        )  # fmt: skip


def check_same_backbone(path: Path, meta: dict[str, Any], spec: BackboneSpec) -> None:
    """Refuse a checkpoint whose backbone was built with other constructor arguments
    than the one built now (e.g. the 12 heads a newer sslcli gives MoCo v3's ViT-S):
    the parameter shapes can be the same, so loading would not notice."""
    saved = meta.get("backbone")
    if not isinstance(saved, dict):
        return
    old = {k: v for k, v in dict(saved.get("kwargs") or {}).items() if k not in INIT_ONLY_ARGS}
    new = {k: v for k, v in spec.kwargs.items() if k not in INIT_ONLY_ARGS}
    # Through JSON, as the checkpoint stored them (tuples become lists).
    new = json.loads(json.dumps(new))
    diff = [
        f"{k} ({old.get(k, 'unset')!r} -> {new.get(k, 'unset')!r})"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    if saved.get("timm_name", spec.timm_name) != spec.timm_name:
        diff.insert(0, f"model ({saved['timm_name']!r} -> {spec.timm_name!r})")
    if diff:
        raise ConfigError(
            [f"cannot resume {path}: this sslcli builds its backbone with "
             f"other arguments: {', '.join(diff)}; continue it with the sslcli version "
             "that started it"]
        )  # fmt: skip


def check_format(path: Path, meta: dict[str, Any]) -> None:
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {meta.get('format')}; this sslcli reads "
            f"format {CHECKPOINT_FORMAT}"
        )


# -- writing -----------------------------------------------------------------------------------
def rank_state(
    aug_gen: torch.Generator, pending: dict[str, list[Tensor]], device: torch.device
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This process's RNG states and unlogged per-step values."""
    tensors, meta = rng_state(aug_gen)
    out = {f"rng.{k}": v.detach().cpu() for k, v in tensors.items()}
    for k, vals in pending.items():
        out[f"log.{k}"] = torch.stack([v.detach().float().cpu() for v in vals])
    return out, {"rng": meta, "aug_device": device.type}


def backbone_record(spec: BackboneSpec) -> dict[str, Any]:
    return {
        "timm_name": spec.timm_name,
        "alias": spec.alias,
        "image_size": spec.image_size,
        "small_stem": spec.small_stem,
        "kwargs": spec.kwargs,
    }


def save_checkpoint(
    run_dir: Path,
    *,
    step: int,
    steps_per_epoch: int,
    counters: dict[str, Any],
    run: RunConfig,
    method_cls: type[Method],
    spec: BackboneSpec,
    dataset: ImageDataset,
    modules: dict[str, nn.Module],
    optimizer: Optimizer,
    own_state: tuple[dict[str, Tensor], dict[str, Any]],
) -> Path | None:
    """Write the checkpoint of ``step`` (rank 0 writes; every process takes part).

    ``counters``: ``nonfinite``, ``knn_random``, ``images_seen``; ``modules``: the
    state-dict groups (``model``, and ``probe`` when there is one); ``own_state``:
    :func:`rank_state` of this process.
    """
    gathered = dist.all_gather_object(own_state)
    if not dist.is_main():
        return None
    per_rank: dict[str, Tensor] = {}
    for r, (tensors, _) in enumerate(gathered):
        per_rank.update({f"r{r}.{k}": v for k, v in tensors.items()})
    opt_tensors, opt_meta = ckpt.flatten_optimizer(optimizer.state_dict())
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "epoch": step // steps_per_epoch,
        "batch_in_epoch": step % steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "world_size": dist.world_size(),
        "nonfinite": counters["nonfinite"],
        "knn_random": counters["knn_random"],
        "dataset": dataset.name,
        "dataset_size": len(dataset),
        "images_seen": counters["images_seen"],
        "config": run.to_json_dict(),
        "plugin": registry.info_of(method_cls).record(),
        "backbone": backbone_record(spec),
        "optimizer": opt_meta,
        "ranks": [m for _, m in gathered],
    }
    groups = {"model": modules["model"].state_dict(), "optim": opt_tensors, "state": per_rank}
    groups.update({k: m.state_dict() for k, m in modules.items() if k != "model"})
    return ckpt.save(
        run_dir / "checkpoints", step, groups, meta, keep=run.trainer.keep_checkpoints
    )


# -- reading -----------------------------------------------------------------------------------
def restore(
    path: Path,
    loaded: tuple[Groups, dict[str, Any]] | None,
    *,
    run: RunConfig,
    method_cls: type[Method],
    method: nn.Module,
    optimizer: Optimizer,
    probe: nn.Module | None,
    device: torch.device,
    aug_gen: torch.Generator,
    say: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, list[Tensor]]]:
    """Load the checkpoint at ``path`` (``loaded``: already read and verified) into the
    model, optimiser, probe and this process's RNGs, after checking it fits ``run``.
    Returns its meta and this process's unlogged per-step values."""
    groups, meta = ckpt.load(path) if loaded is None else loaded
    check_format(path, meta)
    check_resumable(path, meta, run, method_cls, say)
    load_model_state(method, path, groups.get("model", {}))
    load_optimizer_state(optimizer, path, groups, meta)
    pending = load_rank_state(
        groups.get("state", {}), meta, seed=run.trainer.seed, device=device, aug_gen=aug_gen
    )
    if probe is not None:
        if "probe" in groups:
            probe.load_state_dict(groups["probe"])
        else:
            say(f"{path} has no online probe: the probe starts from scratch")
    return meta, pending


def load_model_state(method: nn.Module, path: Path, state: dict[str, Tensor]) -> None:
    own = method.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if shapes:
            k = shapes[0]
            parts.append(f"shape of {k} {tuple(state[k].shape)} != {tuple(own[k].shape)}")
        raise CheckpointError(f"cannot resume {path}: state mismatch ({'; '.join(parts)})")
    method.load_state_dict(state, strict=True)


def load_optimizer_state(
    optimizer: Optimizer, path: Path, groups: Groups, meta: dict[str, Any]
) -> None:
    """The checkpoint gives the optimiser's state (momenta, Adam moments); the current
    config gives its hyper-parameters, so a resume may change lr or weight decay."""
    current = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict(
            ckpt.unflatten_optimizer(groups.get("optim", {}), meta["optimizer"])
        )
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"cannot resume {path}: its optimiser state does not fit this run ({e})"
        ) from e
    for g, cur in zip(optimizer.param_groups, current, strict=True):
        g.update(cur)
    match_param_layout(optimizer)


def load_rank_state(
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    *,
    seed: int,
    device: torch.device,
    aug_gen: torch.Generator,
) -> dict[str, list[Tensor]]:
    """Restore this process's RNG states; returns its unlogged per-step values."""
    r = dist.rank()
    saved_world = int(meta.get("world_size", 1))
    ranks = meta.get("ranks", [])
    prefix = f"r{r}."
    mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if saved_world != dist.world_size() and dist.is_main():
        warnings.warn(
            f"resuming a {saved_world}-process run on {dist.world_size()} processes: "
            "processes without a saved state get fresh random streams, so the run "
            "continues correctly but not bit-identically",
            stacklevel=2,
        )
    if r >= len(ranks):
        seed_everything(seed + r + 1_000_003 * int(meta["step"]))
        return {}
    rng_t = {k[4:]: v for k, v in mine.items() if k.startswith("rng.")}
    aug_same_device = ranks[r].get("aug_device") == device.type
    set_rng_state(rng_t, ranks[r]["rng"], aug_gen if aug_same_device else None)
    if not aug_same_device:
        warnings.warn(
            f"the checkpoint's augmentation generator was on {ranks[r].get('aug_device')}, "
            f"this run's is on {device.type}: it is reseeded",
            stacklevel=2,
        )
    return {k[4:]: list(v.to(device).unbind(0)) for k, v in mine.items() if k.startswith("log.")}
