"""How much memory one process of a run needs at its peak (``ssl train --dry-run``).

Per process (i.e. per GPU under torchrun):

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

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sslcli.data.views import expand
from sslcli.method import Batch, StepInfo
from sslcli.runtime import autocast

if TYPE_CHECKING:
    from sslcli.engine.trainer import Trainer

GIB = 2**30

ACCUMULATION_NOTE = (
    "A contrastive batch cannot be emulated by gradient accumulation: the other images "
    "of the batch are the negatives (SimCLR, MoCo v3, InvaSpread, CPC, SwAV's and DINO's "
    "batch-wide statistics) and BatchNorm statistics are per batch, so k small steps "
    "optimise a different loss than one large step. Use more GPUs (the batch is split "
    "over processes with negatives gathered across them), trainer.grad_checkpointing=true "
    "(ViTs and ResNets), or a smaller batch with the learning rate scaled accordingly."
)


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


def saved_bytes(tr: Trainer, batch: int, sizes: list[int]) -> int:
    """Bytes autograd keeps for backward in one ``training_step`` of ``batch`` images with
    the views at ``sizes`` (parameters and buffers excluded; each storage counted once)."""
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
    if tr.channels_last:
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
                a2, a4 = saved_bytes(tr, 2, sizes), saved_bytes(tr, 4, sizes)
                const = 2 * a2 - a4
                points.append((units, const, (a4 - a2) / 2))
            else:  # the batch-independent part does not depend on the view size either
                points.append((units, const, (saved_bytes(tr, 2, sizes) - const) / 2))
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
        a2, a4 = saved_bytes(tr, 2, full), saved_bytes(tr, 4, full)
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
        on = saved_bytes(tr, 2, sizes)
    finally:
        for h in hooks:
            h.remove()
    for enc in encoders:
        enc.set_grad_checkpointing(False)
    try:
        off = saved_bytes(tr, 2, sizes)
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


