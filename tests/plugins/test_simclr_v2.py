"""SimCLR v2: the 3-layer head, its scale-only last BN, fine-tuning from a head layer."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from sslcli_plugins.simclr import BatchNorm1dNoShift, SimCLRV2

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.errors import ConfigError
from sslcli.method import Batch, StepInfo
from tests.helpers import build_method

STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


def _method(*sets: str, backbone: str = "test_resnet") -> Any:
    return build_method("simclr-v2", *sets, backbone=backbone)


def _views(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(n, 3, 16, 16, generator=g) for _ in range(2)]


def test_head_is_three_layers_with_a_shift_free_last_bn() -> None:
    m = _method()
    width = 96  # test_resnet's feature width; the middle layers are as wide as the input
    head = m.projector
    assert len(head) == 3
    kinds = [[type(x).__name__ for x in layer] for layer in head]
    assert kinds == [
        ["Linear", "BatchNorm1d", "ReLU"],
        ["Linear", "BatchNorm1d", "ReLU"],
        ["Linear", "BatchNorm1dNoShift"],
    ]
    dims = [(layer[0].in_features, layer[0].out_features) for layer in head]
    assert dims == [(width, width), (width, width), (width, 128)]
    assert all(layer[0].bias is None for layer in head)  # BN follows every Linear
    assert head[0][1].bias is not None and head[1][1].bias is not None  # β in the middle
    last_bn = head[2][1]
    assert isinstance(last_bn, BatchNorm1dNoShift)
    assert last_bn.weight is not None and last_bn.bias is None  # γ, no β
    keys = set(m.state_dict())
    assert "projector.2.1.weight" in keys and "projector.2.1.bias" not in keys
    for layer in head:  # official init: N(0, 0.01²)
        assert 0.008 < float(layer[0].weight.detach().std()) < 0.012


def test_last_bn_output_is_scaled_but_never_shifted() -> None:
    bn = BatchNorm1dNoShift(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    x = torch.randn(64, 4) * 5 + 7
    y = bn(x)
    assert torch.allclose(y.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var(0, unbiased=False).sqrt(), bn.weight.detach(), atol=1e-3)
    bn.reset_parameters()
    assert torch.equal(bn.weight.detach(), torch.ones(4)) and bn.bias is None


def test_num_proj_layers_sets_the_depth() -> None:
    m = _method("method.num_proj_layers=2", "method.finetune_layer=1")
    assert len(m.projector) == 2
    with pytest.raises(ConfigError, match=r"method\.finetune_layer"):
        _method("method.num_proj_layers=2", "method.finetune_layer=3")


def nt_xent_loops(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Chen et al. 2020, Eq. 1 averaged over all 2N anchors, written with loops."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n2) if k != i)
        total -= math.log(math.exp(float(z[i] @ z[j]) / t) / denom)
    return total / n2


def test_training_step_is_nt_xent_of_the_v2_projections() -> None:
    m = _method()
    x1, x2 = _views()
    out = m.training_step(Batch(views=[x1, x2], index=torch.arange(8)), STEP)
    with torch.no_grad():
        z1, z2 = m.projector(m.backbone(torch.cat([x1, x2]))).chunk(2)
    assert math.isclose(float(out.loss.detach()), nt_xent_loops(z1, z2, 0.1), rel_tol=1e-4)
    out.loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_finetune_encoder_keeps_the_chosen_head_layers() -> None:
    m = _method()
    m.eval()
    x = _views()[0]
    with torch.no_grad():
        feats = m.backbone(x)
        first = m.projector[0](feats)
        enc = m.finetune_encoder()  # default: the middle of the head (layer 1)
        assert torch.allclose(enc(x), first, atol=1e-6)
        assert m.finetune_dim() == 96
        assert torch.allclose(m.finetune_encoder(0)(x), feats, atol=1e-6)
        assert torch.allclose(m.finetune_encoder(3)(x), m.projector(feats), atol=1e-6)
        assert m.finetune_dim(3) == 128 and m.finetune_dim(0) == 96
    # The module shares the method's weights (fine-tuning updates what was pre-trained).
    assert enc[0] is m.backbone and enc[1] is m.projector[0]
    assert len(m.finetune_encoder(2)) == 3
    with pytest.raises(ValueError):
        m.finetune_encoder(4)


def test_defaults_and_recipes() -> None:
    c = SimCLRV2.Config()
    assert (c.temperature, c.proj_dim, c.num_proj_layers, c.finetune_layer) == (0.1, 128, 3, 1)
    r = SimCLRV2.recipe
    assert r.optim["name"] == "lars" and r.optim["lr"] == 0.075
    assert r.optim["lr_scaling"] == "sqrt" and r.optim["weight_decay"] == 1e-4
    assert r.optim["exclude_norm_bias"] is True
    assert r.schedule == {"kind": "cosine", "warmup_epochs": 10}
    assert r.trainer == {"sync_bn": True}  # the official global BN
    (spec,) = _method().views()  # v1's augmentation
    assert spec.scale == (0.08, 1.0) and spec.interpolation == "bicubic" and not spec.normalize


def test_simclr_v1_head_is_the_two_layer_case() -> None:
    cls, _, cfg = api.resolve_config("simclr")
    m = cls(cfg, make_spec("test_resnet", 16).build())
    assert len(m.projector) == 2 and len(_method().projector) == 3
    assert type(m.projector) is type(_method().projector)


def test_selective_kernel_backbone_trains() -> None:
    m = _method(backbone="skresnet18")
    assert m.projector[0][0].in_features == 512
    x1, x2 = (v[:4] for v in _views(4))
    out = m.training_step(Batch(views=[x1, x2], index=torch.arange(4)), STEP)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert m.backbone.conv1.weight.grad is not None
