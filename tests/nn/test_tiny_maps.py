"""Convolutions on 1×1 maps as matrix products: same values, same gradients, same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sslcli.backbones import make_spec
from sslcli.nn.tiny_maps import CentreTapConv2d, centre_tap_on_tiny_maps


def _pair(conv: nn.Conv2d) -> tuple[nn.Conv2d, nn.Conv2d]:
    fast = centre_tap_on_tiny_maps(copy.deepcopy(conv))
    return conv, fast  # type: ignore[return-value]


@pytest.mark.parametrize(
    "kernel,padding,stride,bias",
    [(3, 1, 1, False), (3, 1, 2, True), (1, 0, 1, True), (1, 0, 2, False), (7, 3, 2, False)],
)
def test_same_values_and_gradients_on_1x1_inputs(
    kernel: int, padding: int, stride: int, bias: bool
) -> None:
    torch.manual_seed(0)
    plain, fast = _pair(nn.Conv2d(5, 4, kernel, stride=stride, padding=padding, bias=bias).double())
    assert type(fast) is CentreTapConv2d
    x = torch.randn(6, 5, 1, 1, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = plain(x), fast(x2)
    assert y.shape == y2.shape == (6, 4, 1, 1)
    torch.testing.assert_close(y2, y)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)  # zero off the centre
    if bias:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad)


def test_larger_maps_take_the_ordinary_convolution() -> None:
    torch.manual_seed(0)
    plain, fast = _pair(nn.Conv2d(3, 4, 3, padding=1))
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fast(x), plain(x))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # grouped: not one product
        nn.Conv2d(4, 4, 3, padding=2, dilation=2),
        nn.Conv2d(4, 4, 3, padding=0),  # no output on a 1×1 input
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(4, 4, 3, padding="same"),
    ],
)
def test_convolutions_the_shortcut_does_not_cover_are_left_alone(conv: nn.Conv2d) -> None:
    assert type(centre_tap_on_tiny_maps(conv)) is nn.Conv2d


def test_resnet_on_tiny_patches_is_unchanged_and_exports_as_plain_timm() -> None:
    torch.manual_seed(0)
    spec = make_spec("resnet18", 16)
    plain = spec.build()
    fast = centre_tap_on_tiny_maps(copy.deepcopy(plain))
    swapped = sum(type(m) is CentreTapConv2d for m in fast.modules())
    assert swapped > 10
    x = torch.randn(8, 3, 4, 4)  # CPC's 4-px patches: layer3 and layer4 run on 1×1 maps
    plain.eval(), fast.eval()
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
    state = fast.state_dict()
    assert list(state) == list(plain.state_dict())
    # The state dict is the plain model's: a fresh plain model takes it whole (strict).
    fresh = spec.build()
    fresh.load_state_dict(state)
    fresh.eval()
    torch.testing.assert_close(fresh(x), plain(x))
