"""Projection and prediction heads shared by the methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear layers with optional BatchNorm and activation between them.

    ``dims`` = [in, hidden..., out]. Hidden layers are Linear -> BN -> act; the last layer
    is Linear, followed by BN when ``last_bn`` (``last_bn_affine=False`` gives MoCo v3 /
    SimSiam's BN without learnable scale and shift). ``bias=None`` means "no bias when a BN
    follows", which is what the official heads do.
    """

    def __init__(
        self,
        dims: Sequence[int],
        *,
        bn: bool = True,
        last_bn: bool = False,
        last_bn_affine: bool = True,
        act: type[nn.Module] = nn.ReLU,
        bias: bool | None = None,
        last_bias: bool | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        n = len(dims) - 1
        for i in range(n):
            last = i == n - 1
            with_bn = last_bn if last else bn
            b = (last_bias if last_bias is not None else bias) if last else bias
            use_bias = (not with_bn) if b is None else b
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=use_bias))
            if with_bn:
                layers.append(nn.BatchNorm1d(dims[i + 1], affine=last_bn_affine if last else True))
            if not last:
                layers.append(act())
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 - Sequential semantics
        return super().forward(x)


class UnitEmbedding(nn.Module):
    """``n(head(backbone(x)))`` in fp32: the unit embedding a method trains on, offered for
    evaluation (``ssl eval --which embedding``) where the method's published kNN numbers
    read it rather than the backbone's pooled feature (InstDisc, InvaSpread: 128-d).

    It holds references to the method's own modules (no copy), so it always evaluates the
    current weights. It is not a timm network, so ``ssl export`` cannot write it.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)
