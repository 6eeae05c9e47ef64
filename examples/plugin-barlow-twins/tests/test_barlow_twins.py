"""Barlow Twins: the loss against the paper's formula, and one training step via sslcli."""

from __future__ import annotations

import torch
from sslcli_barlow_twins import barlow_twins_loss


def test_loss_matches_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(32, 6), torch.randn(32, 6)
    a = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + 1e-5)
    b = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + 1e-5)
    c = a.T @ b / 32
    expected = 0.0
    for i in range(6):
        for j in range(6):
            expected += (1 - c[i, i]) ** 2 if i == j else 0.0051 * c[i, j] ** 2
    torch.testing.assert_close(barlow_twins_loss(z1, z2, 0.0051), torch.as_tensor(expected))


def test_identical_decorrelated_views_have_zero_loss() -> None:
    z = torch.linalg.qr(torch.randn(64, 8))[0] * 8**0.5  # orthogonal, unit-variance columns
    z = z - z.mean(0)
    assert barlow_twins_loss(z, z, 0.0051) < 0.05


def test_trains_one_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sslcli import train

    result = train(
        "barlow-twins",
        overrides={
            "backbone": {"name": "test_resnet"},
            "data": {"image_size": 16},
            "trainer": {
                "max_steps": 1,
                "batch_size": 8,
                "eval_knn": False,
                "out": str(tmp_path / "run"),
            },
        },
        sets=["method.proj_dim=64"],
    )
    assert result.steps == 1 and result.final_loss is not None
