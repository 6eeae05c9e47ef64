"""``ssl train --dry-run``: what a run would build and do, and how much memory it needs.

The trainer's own set-up resolves everything (:class:`sslcli.engine.trainer.Trainer` with
``dry_run=DryRun(...)``); this module only reads the result — the built model, the
optimiser's parameter groups, the trainer's schedule functions — and estimates the peak
memory of one process. Nothing here decides a value a real run would decide differently.

Memory estimate (per process, i.e. per GPU under torchrun):

- weights and buffers, gradients (one per trainable parameter) and the optimiser state
  (SGD with momentum and LARS: one tensor per trainable parameter; AdamW: two), counted
  exactly from the built model;
- the views of one per-process batch as float tensors;
- saved activations: the tensors autograd keeps for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks`` during real forward passes of the method's
  ``training_step`` (all its views, both encoders where there are two, in the run's
  precision) on 2 and 4 images at views shrunk to about 32 px, and on 2 images at about
  64 px (the full sizes when the views are that small already). A linear fit separates what is
  independent of the batch (queues, prototypes), what grows per image (head activations)
  and what grows per image and per pixel (convnets) or token (ViTs); the fit is then
  evaluated at the per-process batch and the full view sizes. With
  ``trainer.grad_checkpointing`` the blocks' inputs and one block's recomputation are
  added to what stays saved.

Not counted: the CUDA context and cuDNN workspaces (~0.5-1 GiB), allocator fragmentation,
the transient buffers of a single operation, similarity matrices grown by negatives
gathered from other processes (a few hundred MiB at most for the built-in recipes).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sslcli.config import flatten_dotted
from sslcli.data.views import expand
from sslcli.engine.dryrun import DryRun

if TYPE_CHECKING:
    from sslcli.engine.trainer import Trainer

IMAGENET_TRAIN_IMAGES = 1_281_167
"""ImageNet-1k's training split: what a dry run of a recipe plans for when no data is named
and the default data set cannot hold one batch."""

GIB = 2**30

ACCUMULATION_NOTE = (
    "A contrastive batch cannot be emulated by gradient accumulation: the other images "
    "of the batch are the negatives (SimCLR, MoCo v3, InvaSpread, CPC, SwAV's and DINO's "
    "batch-wide statistics) and BatchNorm statistics are per batch, so k small steps "
    "optimise a different loss than one large step. Use more GPUs (the batch is split "
    "over processes with negatives gathered across them), trainer.grad_checkpointing=true "
    "(ViTs and ResNets), or a smaller batch with the learning rate scaled accordingly."
)


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
    plan = tr.dry_run or DryRun()
    t, o, s = run.trainer, run.optim, run.schedule
    spe, total = tr.steps_per_epoch, tr.total_steps
    n = len(tr.dataset)
    flat = flatten_dotted(run.to_json_dict())
    settings = [
        {"key": k, "value": v, "from": sources.get(k, "default")} for k, v in sorted(flat.items())
    ]
    report: dict[str, Any] = {
        "method": {"name": run.method, "class": type(tr.method).__name__,
                   "options": dict(run.method_options)},  # fmt: skip
        "settings": settings,
        "data": {
            "dataset": run.data.dataset if plan.images is None else None,
            "opened": tr.dataset.name if plan.images is None else None,
            "images": n,
            "classes": len(tr.dataset.classes) if tr.dataset.classes else None,
            "image_size": run.data.image_size,
            "load_size": tr.load_size,
            "num_workers": tr._num_workers(),
            "steps_per_epoch": spe,
            "images_dropped_per_epoch": n - spe * tr.global_batch,
            "note": plan.note,
        },
        "views": [v.model_dump(mode="json") for v in tr.method.views()],
        "backbone": _backbone(tr, timm_calls),
        "parameters": _parameters(tr.method),
        "optimizer": _optimizer(tr),
        "lr": {
            "base": o.lr,
            "scaling": o.lr_scaling,
            "global_batch": tr.global_batch,
            "scaled": tr.base_lr,
            "rule": {"linear": f"{o.lr:g} x {tr.global_batch}/256",
                     "sqrt": f"{o.lr:g} x sqrt({tr.global_batch})",
                     "none": f"{o.lr:g} (not scaled)"}[o.lr_scaling],
        },  # fmt: skip
        "schedule": {
            "kind": s.kind,
            "epochs": t.epochs,
            "steps_per_epoch": spe,
            "total_steps": total,
            "stop_step": tr.stop_step,
            "warmup_steps": tr.warmup_steps,
            "warmup_epochs": tr.warmup_steps / spe,
            "warmup_epochs_set": s.warmup_epochs,
            "milestones_epochs": tr.milestone_epochs() if s.kind == "step" else [],
            "milestones_steps": [round(m * spe) for m in tr.milestone_epochs()]
            if s.kind == "step"
            else [],
            "gamma": s.gamma if s.kind == "step" else None,
            "lr_peak": tr.base_lr * max(tr.lr_factor(st) for st in _probe_steps(tr)),
            "lr_first_step": tr.base_lr * tr.lr_factor(0),
            "lr_last_step": tr.base_lr * tr.lr_factor(max(0, total - 1)),
            "weight_decay_end": s.weight_decay_end,
        },
        "trainer": {
            "device": str(tr.device),
            "precision": "bf16 autocast" if tr.dtype == torch.bfloat16 else "fp32",
            "processes": plan.processes,
            "global_batch": tr.global_batch,
            "batch_per_process": tr.local_batch,
            "sync_bn": bool(t.sync_bn and plan.processes > 1),
            "channels_last": tr._channels_last(),
            "compile": t.compile,
            "grad_checkpointing": t.grad_checkpointing,
            "max_steps": t.max_steps,
            "run_dir": str(tr.run_dir),
            "resume_from_step": (tr._resume_meta or {}).get("step"),
        },
    }
    if memory:
        report["memory"] = estimate_memory(tr)
    return report


def _probe_steps(tr: Trainer) -> list[int]:
    """Steps at which the lr factor can peak: around the end of warm-up, and the start."""
    w = tr.warmup_steps
    return sorted({0, max(0, w - 1), min(w, max(0, tr.total_steps - 1))})


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


# -- memory ----------------------------------------------------------------------------------------
def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_factor(name: str, momentum: float) -> int:
    """Tensors of optimiser state per trainable parameter."""
    if name == "adamw":
        return 2
    if name == "lars":
        return 1
    return 1 if momentum > 0 else 0


def estimate_memory(tr: Trainer) -> dict[str, Any]:
    """Peak memory of one process (bytes), by part; see the module docstring."""
    method = tr.method
    params = {id(p): p for p in method.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    weights = _bytes(params) + _bytes(method.buffers())
    grads = _bytes(trainable)
    opt = optimizer_state_factor(tr.run.optim.name, tr.run.optim.momentum) * grads
    views = expand(method.views())
    b = tr.local_batch
    view_bytes = b * sum(3 * v.size * v.size for v in views) * 4
    fit = activation_fit(tr)
    acts = fit["constant"] + b * (fit["per_image"] + fit["per_unit"] * fit["units_full"])
    acts += fit.get("checkpoint_extra_per_image", 0.0) * b
    total = weights + grads + opt + view_bytes + acts
    out: dict[str, Any] = {
        "per_process_batch": b,
        "weights_and_buffers": weights,
        "gradients": grads,
        "optimizer_state": opt,
        "views": view_bytes,
        "activations": int(acts),
        "total": int(total),
        "total_gib": round(total / GIB, 2),
        "method": fit["how"],
        "device": str(tr.device),
        "precision": "bf16 autocast" if tr.dtype == torch.bfloat16 else "fp32",
    }
    if tr.device.type == "cuda":
        props = torch.cuda.get_device_properties(tr.device)
        out["device_memory"] = int(props.total_memory)
        out["device_name"] = props.name
        out["exceeds_device"] = total > props.total_memory
    else:
        out["device_memory"] = None
        out["exceeds_device"] = None
    return out


def _saved_bytes(tr: Trainer, batch: int, sizes: list[int]) -> int:
    """Bytes autograd keeps for backward in one ``training_step`` of ``batch`` images with
    the views at ``sizes`` (parameters and buffers excluded; each storage counted once)."""
    from sslcli.method import Batch, StepInfo
    from sslcli.runtime import autocast

    method, dev = tr.method, tr.device
    own = {t.untyped_storage().data_ptr() for t in [*method.parameters(), *method.buffers()]}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in own and key not in seen:
            seen[key] = st.nbytes()
        return t

    gen = torch.Generator(device="cpu").manual_seed(0)
    views = [torch.randn(batch, 3, s, s, generator=gen).to(dev) for s in sizes]
    if tr._channels_last():
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    n = max(1, len(tr.dataset))
    data = Batch(
        views=views,
        index=torch.arange(batch, device=dev) % n,
        labels=torch.zeros(batch, dtype=torch.int64, device=dev),
    )
    info = StepInfo(0, 0, tr.total_steps, tr.steps_per_epoch)
    rng = torch.random.get_rng_state()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, _identity), autocast(dev, tr.dtype):
            out = method(data, info)
        del out
    finally:
        torch.random.set_rng_state(rng)
    return sum(seen.values())


def _identity(t: Tensor) -> Tensor:
    return t


def _units(tr: Trainer, size: int) -> float:
    """What a view's activations grow with: tokens for ViTs, pixels otherwise."""
    patch = getattr(tr.method.backbone, "patch_embed", None)
    ps = getattr(patch, "patch_size", None)
    if ps and getattr(tr.method.backbone, "blocks", None) is not None:
        prefix = int(getattr(tr.method.backbone, "num_prefix_tokens", 1))
        return (size // ps[0]) * (size // ps[1]) + prefix
    return float(size * size)


def _small_sizes(tr: Trainer, full: list[int], target: int) -> list[int]:
    patch = getattr(tr.method.backbone, "patch_embed", None)
    ps = getattr(patch, "patch_size", None)
    m = int(ps[0]) if ps else 32
    f = target / max(full)
    return [max(m, int(round(s * f / m)) * m) for s in full]


def activation_fit(tr: Trainer) -> dict[str, Any]:
    """Saved activations as ``constant + batch * (per_image + per_unit * units)``."""
    full = [v.size for v in expand(tr.method.views())]
    units_full = sum(_units(tr, s) for s in full)
    sets: list[list[int]] = []
    if max(full) > 64:
        sets = [_small_sizes(tr, full, 32), _small_sizes(tr, full, 64)]
    how = "saved tensors of the training step on 2 and 4 images"
    points: list[tuple[float, float, float]] = []  # (units, constant, slope)
    try:
        for i, sizes in enumerate(sets):
            units = sum(_units(tr, s) for s in sizes)
            if i == 0:
                a2, a4 = _saved_bytes(tr, 2, sizes), _saved_bytes(tr, 4, sizes)
                const = 2 * a2 - a4
                points.append((units, const, (a4 - a2) / 2))
            else:  # the batch-independent part does not depend on the view size either
                points.append((units, const, (_saved_bytes(tr, 2, sizes) - const) / 2))
    except Exception:  # noqa: BLE001 - a method that needs the full size: measure there
        points = []
    if len(points) == 2 and points[1][0] != points[0][0]:
        (u1, c1, p1), (u2, _, p2) = points
        g = max(0.0, (p2 - p1) / (u2 - u1))
        h = max(0.0, p1 - g * u1)
        unit = "tokens" if _is_vit(tr) else "pixels"
        how += (
            f" at views of {sets[0]} and {sets[1]} px, scaled linearly in the batch and in "
            f"the {unit} per view to {full} px"
        )
        fit = {"constant": max(0.0, c1), "per_image": h, "per_unit": g, "units_full": units_full}
    else:
        a2, a4 = _saved_bytes(tr, 2, full), _saved_bytes(tr, 4, full)
        how += f" at the full view sizes {full} px, scaled linearly in the batch"
        fit = {"constant": max(0.0, 2.0 * a2 - a4), "per_image": (a4 - a2) / 2,
               "per_unit": 0.0, "units_full": units_full}  # fmt: skip
    if tr.run.trainer.grad_checkpointing:
        fit["checkpoint_extra_per_image"] = _checkpoint_extra(tr, sets[0] if sets else full)
        how += "; with activation checkpointing: plus the blocks' inputs and one block recomputed"
    fit["how"] = how + " (precision and device of the run)"
    return fit


def _is_vit(tr: Trainer) -> bool:
    return getattr(tr.method.backbone, "blocks", None) is not None


def _checkpoint_extra(tr: Trainer, sizes: list[int]) -> float:
    """Per image: what checkpointing keeps that the saved-tensor count cannot see (each
    checkpointed block's input) plus the recomputation of one block during backward."""
    encoders = [m for m in tr.method.modules() if hasattr(m, "set_grad_checkpointing")
                and getattr(m, "grad_checkpointing", False)]  # fmt: skip
    if not encoders:
        return 0.0
    scale = _units_ratio(tr, sizes)
    inputs: list[int] = []
    hooks = []
    blocks = [m for enc in encoders for m in _blocks(enc)]

    def pre(_m: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.is_grad_enabled():  # a momentum encoder's no-grad forward keeps nothing
            inputs.append(
                sum(a.numel() * a.element_size() for a in args if isinstance(a, Tensor))
            )

    for m in blocks:
        hooks.append(m.register_forward_pre_hook(pre))
    try:
        on = _saved_bytes(tr, 2, sizes)
    finally:
        for h in hooks:
            h.remove()
    for enc in encoders:
        enc.set_grad_checkpointing(False)
    try:
        off = _saved_bytes(tr, 2, sizes)
    finally:
        for enc in encoders:
            enc.set_grad_checkpointing(True)
    kept_inputs = sum(inputs)
    recompute = max(0, off - on) / max(1, len(blocks))
    return (kept_inputs + recompute) / 2 * scale


def _units_ratio(tr: Trainer, sizes: list[int]) -> float:
    full = [v.size for v in expand(tr.method.views())]
    return sum(_units(tr, s) for s in full) / sum(_units(tr, s) for s in sizes)


def _blocks(encoder: nn.Module) -> list[nn.Module]:
    """The units timm checkpoints one by one: transformer blocks or residual blocks."""
    seq = getattr(encoder, "blocks", None)
    if isinstance(seq, nn.Sequential | nn.ModuleList):
        return list(seq)
    out: list[nn.Module] = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = getattr(encoder, name, None)
        if isinstance(layer, nn.Sequential):
            out.extend(layer)
    return out


def memory_warning(mem: dict[str, Any]) -> str | None:
    """The line to print when the estimate exceeds the device, else None."""
    if not mem.get("exceeds_device"):
        return None
    return (
        f"estimated peak memory per process {mem['total'] / GIB:.1f} GiB exceeds "
        f"{mem.get('device_name', 'the device')}'s {mem['device_memory'] / GIB:.1f} GiB at "
        f"{mem['per_process_batch']} images per process. {ACCUMULATION_NOTE}"
    )


def human_bytes(n: float) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


def human_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{int(n)}"


def fmt_float(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or (1e-3 <= abs(x) < 1e4):
        return f"{x:.6g}"
    return f"{x:.3e}" if not math.isinf(x) else str(x)
