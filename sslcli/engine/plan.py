"""``ssl train --dry-run``: what a run would build and do, and how much memory it needs.

The trainer's own set-up resolves everything (:class:`sslcli.engine.trainer.Trainer` with
``dry_run=DryRun(...)``); this module only reads the result — the built model, the
optimiser's parameter groups, the trainer's schedule functions — and estimates the peak
memory of one process. Nothing here decides a value a real run would decide differently.

The memory estimate is :mod:`sslcli.engine.memory`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sslcli.config import flatten_dotted
from sslcli.engine.dryrun import DryRun
from sslcli.engine.memory import estimate_memory
from sslcli.engine.schedule import Schedule

if TYPE_CHECKING:
    from sslcli.engine.trainer import Trainer

IMAGENET_TRAIN_IMAGES = 1_281_167
"""ImageNet-1k's training split: what a dry run of a recipe plans for when no data is named
and the default data set cannot hold one batch."""

# -- the timm calls ------------------------------------------------------------------------------
@contextlib.contextmanager
def record_create_model() -> Iterator[list[dict[str, Any]]]:
    """Every ``timm.create_model`` call made inside, with its real arguments."""
    import timm

    calls: list[dict[str, Any]] = []
    original = timm.create_model

    def recording(model_name: str, *args: Any, **kwargs: Any) -> nn.Module:
        calls.append({"model_name": model_name, **({"args": list(args)} if args else {}),
                      "kwargs": dict(kwargs)})  # fmt: skip
        return original(model_name, *args, **kwargs)

    timm.create_model = recording  # type: ignore[assignment]
    try:
        yield calls
    finally:
        timm.create_model = original  # type: ignore[assignment]


# -- description ---------------------------------------------------------------------------------
def describe(
    tr: Trainer,
    *,
    sources: dict[str, str],
    timm_calls: list[dict[str, Any]],
    memory: bool = True,
) -> dict[str, Any]:
    """The dry run's report as one JSON-able dict."""
    run = tr.run
    flat = flatten_dotted(run.to_json_dict())
    settings = [
        {"key": k, "value": v, "from": sources.get(k, "default")} for k, v in sorted(flat.items())
    ]
    report: dict[str, Any] = {
        "method": {"name": run.method, "class": type(tr.method).__name__,
                   "options": dict(run.method_options)},  # fmt: skip
        "settings": settings,
        "data": _data(tr),
        "views": [v.model_dump(mode="json") for v in tr.method.views()],
        "backbone": _backbone(tr, timm_calls),
        "parameters": _parameters(tr.method),
        "optimizer": _optimizer(tr),
        "lr": _lr(tr),
        "schedule": _schedule(tr),
        "trainer": _trainer(tr),
    }
    if memory:
        report["memory"] = estimate_memory(tr)
    return report


def _data(tr: Trainer) -> dict[str, Any]:
    run, plan = tr.run, tr.dry_run or DryRun()
    n, spe = len(tr.dataset), tr.steps_per_epoch
    return {
        "dataset": run.data.dataset if plan.images is None else None,
        "opened": tr.dataset.name if plan.images is None else None,
        "images": n,
        "classes": len(tr.dataset.classes) if tr.dataset.classes else None,
        "image_size": run.data.image_size,
        "load_size": tr.load_size,
        "num_workers": tr.batches.num_workers,
        "steps_per_epoch": spe,
        "images_dropped_per_epoch": n - spe * tr.global_batch,
        "note": plan.note,
    }


def _lr(tr: Trainer) -> dict[str, Any]:
    o = tr.run.optim
    return {
        "base": o.lr,
        "scaling": o.lr_scaling,
        "global_batch": tr.global_batch,
        "scaled": tr.base_lr,
        "rule": {"linear": f"{o.lr:g} x {tr.global_batch}/256",
                 "sqrt": f"{o.lr:g} x sqrt({tr.global_batch})",
                 "none": f"{o.lr:g} (not scaled)"}[o.lr_scaling],
    }  # fmt: skip


def _schedule(tr: Trainer) -> dict[str, Any]:
    sch, s = tr.schedule, tr.run.schedule
    spe, total = sch.steps_per_epoch, sch.total_steps
    milestones = sch.milestone_epochs() if s.kind == "step" else []
    return {
        "kind": s.kind,
        "epochs": tr.run.trainer.epochs,
        "steps_per_epoch": spe,
        "total_steps": total,
        "stop_step": sch.stop_step,
        "warmup_steps": sch.warmup_steps,
        "warmup_epochs": sch.warmup_steps / spe,
        "warmup_epochs_set": s.warmup_epochs,
        "milestones_epochs": milestones,
        "milestones_steps": [round(m * spe) for m in milestones],
        "gamma": s.gamma if s.kind == "step" else None,
        "lr_peak": sch.base_lr * max(sch.lr_factor(st) for st in _probe_steps(sch)),
        "lr_first_step": sch.base_lr * sch.lr_factor(0),
        "lr_last_step": sch.base_lr * sch.lr_factor(max(0, total - 1)),
        "weight_decay_end": s.weight_decay_end,
    }


def _trainer(tr: Trainer) -> dict[str, Any]:
    t, plan = tr.run.trainer, tr.dry_run or DryRun()
    return {
        "device": str(tr.device),
        "precision": "bf16 autocast" if tr.dtype == torch.bfloat16 else "fp32",
        "processes": plan.processes,
        "global_batch": tr.global_batch,
        "batch_per_process": tr.local_batch,
        "sync_bn": bool(t.sync_bn and plan.processes > 1),
        "channels_last": tr.channels_last,
        "compile": t.compile,
        "grad_checkpointing": t.grad_checkpointing,
        "max_steps": t.max_steps,
        "run_dir": str(tr.run_dir),
        "resume_from_step": (tr.resume_meta or {}).get("step"),
    }


def _probe_steps(sch: Schedule) -> list[int]:
    """Steps at which the lr factor can peak: around the end of warm-up, and the start."""
    w = sch.warmup_steps
    return sorted({0, max(0, w - 1), min(w, max(0, sch.total_steps - 1))})


def sources_of(layers: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """``{dotted key: the layer that set it last}`` over named layers, lowest first."""
    out: dict[str, str] = {}
    for name, layer in layers:
        m = layer.get("method")
        if isinstance(m, str):  # "method = NAME" names the method only
            layer = {k: v for k, v in layer.items() if k != "method"}
        for k in flatten_dotted(layer):
            out[k] = name
    out.pop("method.name", None)
    return out


def _backbone(tr: Trainer, calls: list[dict[str, Any]]) -> dict[str, Any]:
    spec = tr.backbone_spec
    model = tr.method.backbone
    info: dict[str, Any] = {
        "name": tr.run.backbone.name,
        "timm_name": spec.timm_name,
        "create_model_calls": calls,
        "small_stem": spec.small_stem,
        "type": type(model).__name__,
    }
    info.update(architecture_facts(model))
    return info


def architecture_facts(model: nn.Module) -> dict[str, Any]:
    """What the built encoder really is (read from the module, not from its arguments)."""
    facts: dict[str, Any] = {}
    width = getattr(model, "num_features", None)
    if width:
        facts["features"] = int(width)
    blocks = getattr(model, "blocks", None)
    patch = getattr(model, "patch_embed", None)
    if patch is not None and blocks is not None:
        attn = getattr(blocks[0], "attn", None) if len(blocks) else None
        facts["embed_dim"] = int(getattr(model, "embed_dim", 0) or 0)
        facts["depth"] = len(blocks)
        if attn is not None and hasattr(attn, "num_heads"):
            facts["num_heads"] = int(attn.num_heads)
        facts["patch_size"] = list(getattr(patch, "patch_size", ()))
        facts["img_size"] = list(getattr(patch, "img_size", ()) or ())
        facts["dynamic_img_size"] = bool(getattr(model, "dynamic_img_size", False))
        proj = getattr(patch, "proj", None)
        if isinstance(proj, nn.Module):
            facts["patch_projection_trainable"] = any(
                p.requires_grad for p in proj.parameters()
            )
        pos = getattr(model, "pos_embed", None)
        if isinstance(pos, nn.Parameter):
            facts["pos_embed_trainable"] = pos.requires_grad
    # Residual blocks whose last BN can start at 0 (timm's zero_init_last): read the γ.
    last = []
    for m in model.modules():
        if callable(getattr(m, "zero_init_last", None)):
            bn = getattr(m, "bn3", None) or getattr(m, "bn2", None)
            w = getattr(bn, "weight", None)
            if isinstance(w, Tensor):
                last.append(bool((w == 0).all()))
    if last:
        facts["residual_blocks"] = len(last)
        facts["last_bn_gamma_zero"] = all(last) if all(last) or not any(last) else "mixed"
    facts["grad_checkpointing"] = bool(getattr(model, "grad_checkpointing", False))
    return facts


def _parameters(method: nn.Module) -> dict[str, Any]:
    by_part: dict[str, dict[str, int]] = {}
    frozen_names: list[str] = []
    seen: set[int] = set()
    for name, p in method.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        part = name.split(".", 1)[0]
        row = by_part.setdefault(part, {"total": 0, "trainable": 0, "frozen": 0})
        row["total"] += p.numel()
        row["trainable" if p.requires_grad else "frozen"] += p.numel()
        if not p.requires_grad:
            frozen_names.append(name)
    frozen = []
    for part, row in by_part.items():
        names = [f for f in frozen_names if f.split(".", 1)[0] == part]
        if not names:
            continue
        if row["trainable"] == 0:
            frozen.append({"name": f"{part}.*", "tensors": len(names), "params": row["frozen"]})
        else:
            params = dict(method.named_parameters())
            frozen.extend({"name": f, "tensors": 1, "params": params[f].numel()} for f in names)
    return {
        "total": sum(r["total"] for r in by_part.values()),
        "trainable": sum(r["trainable"] for r in by_part.values()),
        "frozen": sum(r["frozen"] for r in by_part.values()),
        "by_part": by_part,
        "frozen_tensors": frozen,
    }


def _optimizer(tr: Trainer) -> dict[str, Any]:
    o = tr.run.optim
    names = {id(p): n for n, p in tr.method.named_parameters()}
    groups = []
    for i, g in enumerate(tr.optimizer.param_groups):
        params = g["params"]
        groups.append(
            {
                "name": g.get("name", f"group{i}"),
                "tensors": len(params),
                "params": sum(p.numel() for p in params),
                "lr": g["base_lr"],
                "weight_decay": g["weight_decay"],
                "fixed_lr": bool(g.get("fixed_lr", False)),
                **({"lars_exclude": bool(g.get("lars_exclude"))} if o.name == "lars" else {}),
                "first": names.get(id(params[0])) if params else None,
            }
        )
    hyper: dict[str, Any] = {"name": o.name}
    if o.name in ("sgd", "lars"):
        hyper["momentum"] = o.momentum
    if o.name == "sgd":
        hyper["nesterov"] = o.nesterov
    if o.name == "lars":
        hyper["eta"] = o.lars_eta
    if o.name == "adamw":
        hyper["betas"] = list(o.betas)
    hyper["grad_clip"] = o.grad_clip
    if o.grad_clip:
        hyper["grad_clip_mode"] = o.grad_clip_mode
    return {**hyper, "groups": groups}
