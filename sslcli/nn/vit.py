"""Vision Transformer helpers for MoCo v3: fixed 2-D sin-cos position embedding, frozen
random patch projection, and the official weight initialisation.

They act in place on a plain timm ``VisionTransformer`` and change no parameter names or
shapes, so the trained encoder still loads into ``timm.create_model`` unchanged: the
sin-cos table is stored in timm's own ``pos_embed`` parameter (with
``requires_grad=False``) and the frozen projection is timm's ``patch_embed.proj``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def is_vit(model: nn.Module) -> bool:
    """A timm ViT: patch embedding with a conv projection, and a position-embedding table."""
    patch = getattr(model, "patch_embed", None)
    return patch is not None and isinstance(getattr(patch, "proj", None), nn.Conv2d)


def sincos_2d_table(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """The 2-D sin-cos position embedding of a ``grid_h × grid_w`` patch grid: [h·w, dim].

    MoCo v3 uses a fixed (not learned) 2-D sin-cos position embedding (Chen, Xie & He
    2021, "An Empirical Study of Training Self-Supervised Vision Transformers",
    implementation details and the position-embedding ablation). Each patch at row
    ``r``, column ``c`` (row-major, timm's token order) gets
    ``[sin(r·ω), cos(r·ω), sin(c·ω), cos(c·ω)]`` with the ``dim/4``
    frequencies ``ω_d = temperature^(−d/(dim/4))``, d = 0 … dim/4 − 1 — the layout of the
    official code (``build_2d_sincos_position_embedding``), whose first half encodes the
    slow (row) index of the flattened grid and the second half the fast (column) index.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # slow index
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)  # fast index
    r = rows[:, None] * omega[None, :]
    c = cols[:, None] * omega[None, :]
    return torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1).float()


@torch.no_grad()
def use_sincos_pos_embed_(vit: nn.Module, temperature: float = 10000.0) -> None:
    """Fill ``vit.pos_embed`` with the fixed 2-D sin-cos table and stop its gradient.

    Prefix tokens (the class token, registers) that timm gives a position embedding get
    zeros, as the official code's ``pe_token``. With ``dynamic_img_size=True``, a view of
    another size (a local crop) uses timm's own resampling of this table to its grid —
    the same computation plain timm does at that size, so the exported encoder behaves
    exactly as in training; the resampled table is a function of a frozen tensor and
    therefore stays fixed too.
    """
    pos = getattr(vit, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        raise ValueError(f"{type(vit).__name__} has no learnable pos_embed to replace")
    grid_h, grid_w = vit.patch_embed.grid_size
    table = sincos_2d_table(grid_h, grid_w, pos.shape[-1], temperature)
    prefix = pos.shape[1] - table.shape[0]
    if prefix < 0:
        raise ValueError(f"pos_embed has {pos.shape[1]} rows for a {grid_h}x{grid_w} grid")
    full = torch.cat([torch.zeros(prefix, table.shape[1]), table], dim=0)
    pos.copy_(full.unsqueeze(0).to(pos.dtype))
    pos.requires_grad_(False)


def freeze_patch_projection_(vit: nn.Module) -> None:
    """Stop the gradient of the patch projection (weight and bias): it stays random.

    "we use a fixed random patch projection layer to embed the patches, which is not
    learned" — a stop-gradient right after the patch projection (Chen, Xie & He 2021,
    Sec. 4.1, "A trick for improving stability"): the instability of ViT training starts
    in the first layer, and this trick removes the dips in the training curve. Official
    code: ``stop_grad_conv1``.
    """
    for p in vit.patch_embed.proj.parameters():
        p.requires_grad_(False)


@torch.no_grad()
def moco_v3_init_(vit: nn.Module) -> None:
    """The official MoCo v3 ViT initialisation (``VisionTransformerMoCo.__init__``).

    Linear layers: Xavier-uniform, with the fused ``qkv`` projection treated as three
    separate ``D×D`` matrices (bound ``sqrt(6 / (D + D))`` rather than ``sqrt(6 / (3D +
    D))``); biases zero. Class token ~ N(0, 1e-6²). Patch projection: Xavier-uniform of
    the equivalent ``(C·p·p) → D`` linear map, bias zero. Layer norms keep their defaults
    and the position embedding is replaced separately (:func:`use_sincos_pos_embed_`).
    """
    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            if name.endswith("qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    cls = getattr(vit, "cls_token", None)
    if isinstance(cls, nn.Parameter):
        nn.init.normal_(cls, std=1e-6)
    proj = vit.patch_embed.proj
    fan_in = proj.weight.shape[1] * proj.weight.shape[2] * proj.weight.shape[3]
    bound = math.sqrt(6.0 / (fan_in + proj.weight.shape[0]))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
