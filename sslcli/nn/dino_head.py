"""DINO's projection head and the multi-crop forward pass (one call per resolution)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight normalisation: ``W = g · v / ‖v‖`` row-wise.

    Weight normalisation (Salimans & Kingma 2016, Eq. 2: "w = g/‖v‖ · v") separates each
    output unit's weight direction ``v`` from its length ``g``. DINO's last layer is
    "a weight normalized fully connected layer" (Caron et al. 2021, Sec. 3.1) whose length
    is fixed to 1 with ``norm_last_layer``: then ``g`` is a frozen parameter of ones and
    only directions are learnt, which the paper's code finds stabilises training.

    Written by hand rather than with ``torch.nn.utils`` so the state is two plain tensors,
    ``weight_g`` [out, 1] and ``weight_v`` [out, in] (the names of ``nn.utils.weight_norm``
    and of the official checkpoints), that survive ``state_dict`` round trips, deep copies
    (the EMA teacher) and safetensors checkpoints without any re-parametrisation hooks.
    """

    def __init__(self, in_features: int, out_features: int, fixed_norm: bool = True) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)  # PyTorch's default init
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        # "self.last_layer.weight_g.data.fill_(1)": unit-length rows from the start.
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fixed_norm)
        self.in_features = in_features
        self.out_features = out_features

    @property
    def weight(self) -> Tensor:
        """The effective weight ``g · v / ‖v‖`` (each row's norm equals its ``g``)."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        """``x Wᵀ`` in fp32 with autocast off, whatever the input dtype.

        DINO's last layer gives the logits of both softmaxes (student τ 0.1, teacher
        τ_t 0.04): bf16's 8-bit mantissa would move a teacher logit of 1/τ_t = 25 by up to
        0.1. The official code runs it under fp16 autocast (11 bits); fp32 costs one
        [N, 256] × [256, K] product, small next to the backbone.
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    def extra_repr(self) -> str:
        fixed = not self.weight_g.requires_grad
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fixed_norm={fixed}"
        )


class DINOHead(nn.Module):
    """MLP → ℓ2-normalised bottleneck → weight-normalised linear layer to K dimensions.

    "The projection head consists of a 3-layer multi-layer perceptron (MLP) with hidden
    dimension 2048 followed by ℓ2 normalization and a weight normalized fully connected
    layer with K dimensions" (Caron et al. 2021, Sec. 3.1); "DINO does not use a
    predictor" and, with ViTs, no BN in the head ("the ViT architectures do not use batch
    normalizations by default. Therefore, when applying DINO to ViT we do not use any BN
    also in the projection heads"). With the official defaults: Linear(D→2048) → GELU →
    Linear(2048→2048) → GELU → Linear(2048→256), ``n(·)``, Linear(256→65536, no bias)
    with weight norm, norm fixed to 1 when ``norm_last_layer``. The MLP's linear layers
    are initialised N(0, 0.02²) truncated at ±2 with zero biases, as in the code.
    ``use_bn`` inserts BatchNorm1d after each hidden linear layer (the code's
    ``use_bn_in_head``, off by default).

    Precision: the MLP follows autocast (bf16 on CUDA, like the backbone); the last layer
    always computes in fp32 (:class:`WeightNormLinear`), so the K logits are fp32.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        num_layers = max(num_layers, 1)
        self.mlp: nn.Module
        if num_layers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (num_layers - 1)
            for a, b in zip(dims[:-1], dims[1:], strict=True):
                layers.append(nn.Linear(a, b))
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def patch_size(backbone: nn.Module) -> int:
    """A ViT's patch side (crops must be a multiple of it); 1 for convnets."""
    embed = getattr(backbone, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        return 1
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


def multicrop_forward(backbone: nn.Module, views: list[Tensor]) -> Tensor:
    """Backbone features of every view, in order, with one call per run of equal sizes.

    DINO's ``MultiCropWrapper`` and SwAV's ResNet forward "group" consecutive crops of the
    same resolution and encode each group in a single forward pass: fewer, larger calls
    (speed), and BatchNorm statistics computed over all crops of a resolution rather than
    over one crop at a time. Returns the features of all views concatenated in the order
    given ([sum of batch sizes, D]).
    """
    if not views:
        raise ValueError("multicrop_forward needs at least one view")
    feats: list[Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        group = views[start] if end - start == 1 else torch.cat(views[start:end])
        feats.append(backbone(group))
        start = end
    return feats[0] if len(feats) == 1 else torch.cat(feats)
