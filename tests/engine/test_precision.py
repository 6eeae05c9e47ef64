"""Every built-in method's loss computes in fp32 under bf16 autocast.

Each case feeds the loss fp32 inputs (the features a bf16 network would hand it, already
cast) and compares the loss and its gradients computed under
``torch.autocast("cpu", dtype=torch.bfloat16)`` with the plain fp32 result. Tolerance:
1e-5 relative on the loss and 1e-4 on each gradient's norm — fp32 reordering noise is
~1e-7, while a loss that lets autocast round its logits to bf16 (8 significant bits) is
off by ~1e-2 (SimCLR's NT-Xent at τ = 0.1 had a ~2 % gradient error). DINO's and SwAV's
cases include the layers that make their logits (the head's last layer; the prototype
scores of the batch and of the queue), since rounding there cannot be undone later.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from sslcli_plugins.cpc import cpc_infonce
from sslcli_plugins.dino import dino_loss
from sslcli_plugins.invaspread import invaspread_loss
from sslcli_plugins.moco import moco_loss
from sslcli_plugins.mocov3 import ctr_loss
from sslcli_plugins.swav import swav_loss

from sslcli import registry
from sslcli.nn.dino_head import WeightNormLinear
from sslcli.nn.losses import nt_xent
from sslcli.nn.nce import NCELoss, bank_softmax_loss, sampled_softmax_loss
from sslcli.nn.regression import byol_loss, simsiam_loss

B, D = 16, 128
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4

Case = tuple[list[torch.Tensor], Callable[[list[torch.Tensor]], torch.Tensor]]


def _unit(g: torch.Generator, *shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _case(method: str, g: torch.Generator) -> Case:
    if method in ("simclr", "simclr-v2"):
        return [_unit(g, B, D), _unit(g, B, D)], lambda x: nt_xent(x[0], x[1], 0.1)
    if method in ("moco-v1", "moco-v2"):
        tau = 0.07 if method == "moco-v1" else 0.2
        queue = _unit(g, 4096, D)
        return [_unit(g, B, D), _unit(g, B, D)], lambda x: moco_loss(x[0], x[1], queue, tau)[0]
    if method == "moco-v3":
        return [_unit(g, B, 256), _unit(g, B, 256)], lambda x: ctr_loss(x[0], x[1], 0.2)[0]
    if method == "byol":
        return [_unit(g, B, 256) for _ in range(4)], lambda x: byol_loss(*x)
    if method == "simsiam":
        return [torch.randn(B, 2048, generator=g) for _ in range(4)], lambda x: simsiam_loss(*x)
    if method == "invaspread":
        return [_unit(g, B, D), _unit(g, B, D)], lambda x: invaspread_loss(x[0], x[1], 0.1)[0]
    if method == "instdisc":
        bank, index = _unit(g, 512, D), torch.arange(B)
        rows = _unit(g, B, 4097, D)

        def instdisc(x: list[torch.Tensor]) -> torch.Tensor:
            # The exact softmax (small data) plus NCE (a fresh Z per call, as on a first step).
            nce = NCELoss(1_281_167, 0.07, None)(x[0], rows)[0]
            return bank_softmax_loss(x[0], bank, index, 0.07)[0] + nce

        return [_unit(g, B, D)], instdisc
    if method == "cmc":
        rows_ab, rows_l = _unit(g, B, 4097, D), _unit(g, B, 4097, D)

        def cmc(x: list[torch.Tensor]) -> torch.Tensor:
            nce = NCELoss(1_281_167, 0.07, None)(x[0], rows_ab)[0]
            nce = nce + NCELoss(1_281_167, 0.07, None)(x[1], rows_l)[0]
            soft = sampled_softmax_loss(x[0], rows_ab, 0.07)[0]
            return nce + soft + sampled_softmax_loss(x[1], rows_l, 0.07)[0]

        return [_unit(g, B, D), _unit(g, B, D)], cmc
    if method == "cpc":
        positive = torch.randint(0, 4 * B, (3 * B,), generator=g)
        preds, targets = torch.randn(3 * B, 64, generator=g), torch.randn(4 * B, 64, generator=g)
        return [preds, targets], lambda x: cpc_infonce(x[0], x[1], positive)[0]
    if method == "swav":
        # 2 global + 2 local crops, 300 prototypes, a queue of 64 past features per code.
        queues = [_unit(g, 64, D), _unit(g, 64, D)]

        def swav(x: list[torch.Tensor]) -> torch.Tensor:
            protos = F.normalize(x[1], dim=1)
            return swav_loss(x[0], protos, B, [0, 1], 0.1, 0.05, 3, queues)

        return [_unit(g, 4 * B, D), torch.randn(300, D, generator=g)], swav
    if method == "dino":
        # The bottleneck features (unit, 256-d) of 2 global + 4 local student crops and of
        # the teacher's 2 globals, through the weight-normalised last layer to K logits.
        last = WeightNormLinear(256, 8192)
        torch.nn.init.normal_(last.weight_v, generator=g)
        center = torch.randn(1, 8192, generator=g) * 0.1

        def dino(x: list[torch.Tensor]) -> torch.Tensor:
            return dino_loss(last(x[0]), last(x[1]), center, 0.04, 0.1, n_global=2)

        return [_unit(g, 6 * B, 256), _unit(g, 2 * B, 256)], dino
    raise KeyError(method)


BUILTINS = sorted(
    name for name, ep in registry.find().items() if ep.value.startswith("sslcli_plugins.")
)


def test_every_builtin_method_has_a_case() -> None:
    g = torch.Generator().manual_seed(0)
    for name in BUILTINS:
        _case(name, g)  # KeyError names a built-in without a precision check


@pytest.mark.parametrize("method", BUILTINS)
def test_loss_under_bf16_autocast_equals_fp32(method: str) -> None:
    def run(autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        inputs, fn = _case(method, torch.Generator().manual_seed(0))
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fn(leaves)
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    loss32, grads32 = run(False)
    loss16, grads16 = run(True)
    assert loss16.dtype == torch.float32, f"{method}: the loss itself is {loss16.dtype}"
    assert torch.isfinite(loss32)
    assert abs(loss16 - loss32) <= LOSS_RTOL * max(1.0, abs(float(loss32))), (
        f"{method}: loss {float(loss16)} under bf16 autocast vs {float(loss32)} in fp32"
    )
    for i, (a, b) in enumerate(zip(grads16, grads32, strict=True)):
        if b is None:  # a stop-gradient input (targets, keys, the teacher)
            assert a is None
            continue
        err = float((a.float() - b).norm() / b.norm().clamp_min(1e-30))
        assert err <= GRAD_RTOL, f"{method}: input {i} gradient off by {err:.2e} under bf16"
