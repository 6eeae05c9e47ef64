"""CPC: patch grid, causal context network, directions, InfoNCE, patch augmentation, embed."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import timm
import torch
from sslcli_plugins.cpc import (
    CPC,
    ContextNetwork,
    CPCConfig,
    cpc_infonce,
    cut_patches,
    grid_geometry,
    patch_augment,
)

import sslcli
from sslcli import api
from sslcli.backbones import make_spec
from sslcli.errors import ConfigError
from sslcli.method import Batch, StepInfo

STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


def test_grid_geometry_scales_the_paper_grid() -> None:
    assert grid_geometry(256, 7) == (64, 32)  # v1: 64-px patches, stride 32, from 256 px
    assert grid_geometry(32, 7) == (8, 4)
    assert grid_geometry(16, 7) == (4, 2)
    for size in (256, 32, 16):
        patch, stride = grid_geometry(size, 7)
        assert (size - patch) // stride + 1 == 7 and (size - patch) % stride == 0
    with pytest.raises(ConfigError, match="image_size"):
        grid_geometry(30, 7)


def test_cut_patches_matches_explicit_slicing() -> None:
    x = torch.randn(2, 3, 16, 16)
    p = cut_patches(x, 4, 2)
    assert p.shape == (2, 7, 7, 3, 4, 4)
    for i in range(7):
        for j in range(7):
            assert torch.equal(p[:, i, j], x[:, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4])


def test_context_at_row_i_depends_only_on_rows_up_to_i() -> None:
    torch.manual_seed(0)
    net = ContextNetwork(width=6, hidden=4, blocks=6).double()
    z = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    base = net(z)
    for i in range(6):
        z2 = z.clone()
        z2[:, :, i + 1 :] += torch.randn_like(z2[:, :, i + 1 :])
        out = net(z2)
        assert torch.equal(out[:, :, : i + 1], base[:, :, : i + 1]), f"row {i} sees below"
        assert not torch.allclose(out[:, :, i + 1], base[:, :, i + 1])
    # Six blocks reach six rows up: the last row sees the first.
    z3 = z.clone()
    z3[:, :, 0] += 1
    assert not torch.equal(net(z3)[:, :, 6], base[:, :, 6])


def _method(**cfg: object) -> CPC:
    torch.manual_seed(0)
    return CPC(CPCConfig(**cfg), make_spec("test_resnet", 16).build())  # type: ignore[arg-type]


ORDER = {  # position along each direction's prediction order, for grid side g
    "top-down": lambda r, c, g: r,
    "bottom-up": lambda r, c, g: g - 1 - r,
    "left-right": lambda r, c, g: c,
    "right-left": lambda r, c, g: g - 1 - c,
}


@pytest.mark.parametrize("direction", list(ORDER))
def test_each_direction_predicts_ahead_from_its_own_past(direction: str) -> None:
    m = _method(directions=[direction], pred_steps=3).double()
    g = 7
    order = ORDER[direction]
    z = torch.randn(2, m.predictors[direction][0].in_channels, g, g, dtype=torch.float64)
    preds, target, source = m.predictions(z)
    assert preds.shape[0] == 2 * g * (6 + 5 + 4) == target.shape[0] == source.shape[0]
    sr, sc = (source % (g * g)) // g, source % g
    tr, tc = (target % (g * g)) // g, target % g
    assert torch.equal(target // (g * g), source // (g * g))  # same image
    k = order(tr, tc, g) - order(sr, sc, g)
    assert sorted(set(k.tolist())) == [1, 2, 3]
    # The coordinate across the direction is the same for source and target.
    across = (tc, sc) if direction in ("top-down", "bottom-up") else (tr, sr)
    assert torch.equal(*across)
    # Causality: changing every patch after line `cut` leaves the predictions made from
    # lines <= cut unchanged, and changes the others.
    cut = 3
    z2 = z.clone()
    for r in range(g):
        for c in range(g):
            if order(r, c, g) > cut:
                z2[:, :, r, c] += 1.0
    preds2, _, _ = m.predictions(z2)
    early = order(sr, sc, g) <= cut
    assert torch.equal(preds2[early], preds[early])
    assert not torch.allclose(preds2[~early], preds[~early])


def test_infonce_matches_a_direct_implementation() -> None:
    torch.manual_seed(0)
    preds = torch.randn(5, 4, dtype=torch.float64)
    targets = torch.randn(9, 4, dtype=torch.float64)
    positive = torch.tensor([0, 8, 3, 3, 5])
    loss, acc = cpc_infonce(preds, targets, positive)
    total, hits = 0.0, 0
    for m in range(5):
        scores = [float(preds[m] @ targets[n]) for n in range(9)]
        total += -(scores[int(positive[m])] - math.log(sum(math.exp(s) for s in scores)))
        hits += int(max(range(9), key=lambda n: scores[n]) == int(positive[m]))
    assert loss.item() == pytest.approx(total / 5, rel=1e-5)
    assert acc.item() == pytest.approx(hits / 5)


def test_chunked_infonce_gives_the_same_value_and_gradients() -> None:
    torch.manual_seed(0)
    preds = torch.randn(23, 6, requires_grad=True)
    targets = torch.randn(11, 6, requires_grad=True)
    positive = torch.randint(0, 11, (23,))
    full, acc_full = cpc_infonce(preds, targets, positive)
    g_full = torch.autograd.grad(full, [preds, targets])
    chunked, acc_chunked = cpc_infonce(preds, targets, positive, max_elements=40)  # 3 rows
    g_chunked = torch.autograd.grad(chunked, [preds, targets])
    torch.testing.assert_close(chunked, full)
    assert acc_chunked.item() == acc_full.item()
    for a, b in zip(g_chunked, g_full, strict=True):
        torch.testing.assert_close(a, b)


def test_patch_augmentation() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, 4, 4)
    assert torch.equal(patch_augment(x, color_drop=False, flip_p=0.0), x)
    assert torch.equal(patch_augment(x, color_drop=False, flip_p=1.0), x.flip(-1))
    y = patch_augment(x, color_drop=True, flip_p=0.0)
    kept = (y == x).flatten(2).all(2)  # [64, 3]: channel left untouched
    assert torch.equal(kept.sum(1), torch.ones(64, dtype=torch.long))
    assert len(set(kept.float().argmax(1).tolist())) == 3  # every channel gets kept sometimes
    for n in range(64):
        c = int(kept[n].float().argmax())
        std = float(x[n, c].std())
        for other in {0, 1, 2} - {c}:
            assert float(y[n, other].std()) < 0.05 * std  # noise of ~1/100 the kept std


def test_step_gives_every_parameter_a_gradient() -> None:
    m = _method(directions=["top-down"])
    torch.manual_seed(1)
    b = 4
    out = m.training_step(Batch(views=[torch.randn(b, 3, 16, 16)], index=torch.arange(b)), STEP)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_embed_mean_pools_the_patch_features() -> None:
    m = _method()
    m.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        # One forward over the explicitly sliced patches (position-major), then the mean.
        patches = [
            x[:, :, 2 * i : 2 * i + 4, 2 * j : 2 * j + 4] for i in range(7) for j in range(7)
        ]
        feats = m.backbone(torch.cat(patches))  # LayerNorm: no cross-patch statistics
        expected = feats.view(49, 2, -1).mean(0)
        torch.testing.assert_close(m.embed(x), expected, rtol=1e-4, atol=1e-5)


def test_layer_norm_patch_encoder_exports_to_plain_timm() -> None:
    m = _method()
    norms = [type(mod).__name__ for mod in m.backbone.modules()]
    assert "GroupNorm1" in norms and not any("BatchNorm" in n for n in norms)
    spec = m.backbone.sslcli_spec
    assert spec.kwargs["norm_layer"] == "groupnorm1"
    plain = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **spec.kwargs)
    # The small stem is sslcli's change to the first conv; rebuild it the same way.
    plain.conv1 = copy.deepcopy(m.backbone.conv1)
    plain.load_state_dict(m.backbone.state_dict(), strict=True)
    batch = _method(norm="batch")
    assert any("BatchNorm" in type(mod).__name__ for mod in batch.backbone.modules())


def test_export_reproduces_the_grid_pooled_representation(tmp_path: Path) -> None:
    import json

    from sslcli.runs.targets import load_target

    run = tmp_path / "run"
    api.train(
        "cpc",
        overrides={
            "backbone": {"name": "test_resnet"},
            "trainer": {"max_steps": 1, "out": str(run), "eval_knn": False},
        },
    )
    result = api.export(run, tmp_path / "export")
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["sslcli"]["patch_grid"] == {"grid_size": 7, "patch": 4, "stride": 2}
    assert any("patch grid" in n for n in result.notes)
    assert "unfold(2, 4, 2)" in (tmp_path / "export" / "README.md").read_text()

    trained = load_target(run)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = trained.embedder()(images)  # CPC.embed: the run's evaluated features
        loaded = sslcli.load_timm(tmp_path / "export")
        torch.testing.assert_close(loaded(images), want)
        # ssl eval on the export uses the same wrapped encoder.
        exported = load_target(tmp_path / "export")
        torch.testing.assert_close(exported.embedder()(images), want)
        # The plain network inside is the patch encoder, loaded strictly.
        patches = cut_patches(images, 4, 2).reshape(-1, 3, 4, 4)
        torch.testing.assert_close(loaded.encoder(patches), trained.candidates["backbone"](patches))
    with pytest.raises(ValueError, match="16x16"):
        loaded(torch.rand(1, 3, 32, 32))


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="pred_steps"):
        _method(pred_steps=7)
    with pytest.raises(ConfigError, match="directions"):
        _method(directions=["top-down", "top-down"])




def test_v2_appendix_options_target_width_offsets_scale_and_weighting() -> None:
    """The CPC v2 appendix pseudo-code's choices as options: targets and predictions
    projected to 64 dims, predictions x0.1, only offset 3 predicted, one cross-entropy
    per offset summed (instead of the mean over all predictions)."""
    m = _method(
        directions=["top-down"], pred_steps=3, pred_min_step=3, target_dim=64, pred_scale=0.1
    )
    assert m.target_proj is not None and m.target_proj.out_channels == 64
    z = torch.randn(2, m.target_proj.in_channels, 7, 7)
    preds, target, source = m.predictions(z)
    assert preds.shape == (2 * 7 * 4, 64)  # offset 3 only: rows 0..3 predict rows 3..6
    assert set(((target - source) // 7).tolist()) == {3}
    w = m.predictors["top-down"][0]
    ctx = m.context["top-down"](z)
    torch.testing.assert_close(preds[:4], 0.1 * w(ctx)[0, :, 0, :4].T)
    with pytest.raises(ConfigError, match="pred_min_step"):
        _method(pred_steps=2, pred_min_step=3)


def test_per_offset_weighting_sums_each_offsets_mean() -> None:
    m = _method(directions=["top-down", "bottom-up"], pred_steps=2, offset_weighting="offset")
    m.train()
    x = torch.rand(2, 3, 16, 16)
    torch.manual_seed(1)
    loss = m.training_step(Batch(views=[x], index=torch.arange(2)), STEP).loss
    # The same step by hand: one mean cross-entropy per (direction, offset), summed.
    torch.manual_seed(1)
    z = m.encode_grid(x, augment=True)
    preds, target, source = m.predictions(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
    ce = torch.nn.functional.cross_entropy(preds.float() @ flat.T, target, reduction="none")
    sizes = [2 * 7 * 6, 2 * 7 * 5] * 2
    expected = sum(part.mean() for part in ce.split(sizes))
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, ce.mean())
