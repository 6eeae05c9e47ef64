"""CMC: colour spaces, cross-bank NCE scoring, bank updates, embedding and export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from sslcli_plugins.cmc import CMC, CMCConfig

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.method import Batch, StepInfo
from sslcli.nn.colorspace import (
    LAB_MEAN,
    LAB_STD,
    YCBCR_MEAN,
    YCBCR_STD,
    luma_chroma_views,
    rgb_to_lab,
    rgb_to_ycbcr,
)
from sslcli.nn.nce import sample_noise_indices

STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


def _pixel(r: float, g: float, b: float) -> torch.Tensor:
    return torch.tensor([r, g, b]).view(1, 3, 1, 1)


# -- colour spaces -----------------------------------------------------------------------------


# Published CIE Lab (D65) values of sRGB colours.
LAB_REFERENCE = {
    (1.0, 1.0, 1.0): (100.0, 0.0, 0.0),
    (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
    (1.0, 0.0, 0.0): (53.24, 80.09, 67.20),
    (0.0, 1.0, 0.0): (87.73, -86.18, 83.18),
    (0.0, 0.0, 1.0): (32.30, 79.19, -107.86),
    (0.5, 0.5, 0.5): (53.39, 0.0, 0.0),
}


@pytest.mark.parametrize("rgb", list(LAB_REFERENCE))
def test_lab_matches_published_values(rgb: tuple[float, float, float]) -> None:
    lab = rgb_to_lab(_pixel(*rgb)).flatten().tolist()
    assert lab == pytest.approx(LAB_REFERENCE[rgb], abs=0.03)


def test_lab_constants_are_the_gamut_ranges() -> None:
    corners = torch.tensor([[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1)])
    lab = rgb_to_lab(corners.float().view(8, 3, 1, 1)).view(8, 3)
    for c in range(3):
        lo, hi = LAB_MEAN[c] - LAB_STD[c], LAB_MEAN[c] + LAB_STD[c]
        assert float(lab[:, c].min()) == pytest.approx(lo, abs=0.03)
        assert float(lab[:, c].max()) == pytest.approx(hi, abs=0.03)


def test_ycbcr_matches_bt601_per_pixel() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, 2, 3)
    got = rgb_to_ycbcr(x)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                r, g, b = (float(x[n, c, i, j]) for c in range(3))
                y = 16 + 65.481 * r + 128.553 * g + 24.966 * b
                cb = 128 - 37.797 * r - 74.203 * g + 112.0 * b
                cr = 128 + 112.0 * r - 93.786 * g - 18.214 * b
                assert got[n, :, i, j].tolist() == pytest.approx([y, cb, cr], abs=1e-4)
    assert rgb_to_ycbcr(_pixel(1, 1, 1)).flatten().tolist() == pytest.approx(
        [235, 128, 128], abs=1e-3
    )


@pytest.mark.parametrize("space", ["lab", "ycbcr"])
def test_views_are_normalised_into_minus_one_one(space: str) -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    x_l, x_ab = luma_chroma_views(x, space)
    assert x_l.shape == (4, 1, 8, 8) and x_ab.shape == (4, 2, 8, 8)
    both = torch.cat([x_l, x_ab], 1)
    assert float(both.abs().max()) <= 1.0 + 1e-3
    mean, std = (LAB_MEAN, LAB_STD) if space == "lab" else (YCBCR_MEAN, YCBCR_STD)
    raw = rgb_to_lab(x) if space == "lab" else rgb_to_ycbcr(x)
    for c in range(3):
        torch.testing.assert_close(both[:, c], (raw[:, c] - mean[c]) / std[c])


# -- the method -----------------------------------------------------------------------------------


def _method(**cfg: object) -> CMC:
    torch.manual_seed(0)
    backbone = make_spec("test_resnet", 16).build()
    return CMC(CMCConfig(**cfg), backbone, dataset_size=40)  # type: ignore[arg-type]


def _batch(index: list[int]) -> Batch:
    torch.manual_seed(len(index))
    return Batch(views=[torch.rand(len(index), 3, 16, 16)], index=torch.tensor(index))


def _features(m: CMC, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x_l, x_ab = m.split(x)
    f_l = torch.nn.functional.normalize(m.head_l(m.backbone(x_l)), dim=1)
    f_ab = torch.nn.functional.normalize(m.head_ab(m.backbone_ab(x_ab)), dim=1)
    return f_l.detach().double(), f_ab.detach().double()


def _direct_nce(anchor: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, n: int) -> float:
    """NCE of each anchor against rows idx[b] of ``bank``, Z = mean(scores) * N, in loops."""
    b, k1 = idx.shape
    k = k1 - 1
    scores = [[math.exp(float(anchor[i] @ bank[int(idx[i, j])]) / 0.07) for j in range(k1)]
              for i in range(b)]  # fmt: skip
    z = sum(sum(r) for r in scores) / (b * k1) * n
    total = 0.0
    for row in scores:
        p = [s / z for s in row]
        total += math.log(p[0] / (p[0] + k / n + 1e-7))
        total += sum(math.log((k / n) / (q + k / n + 1e-7)) for q in p[1:])
    return -total / b


def test_each_view_is_scored_against_the_other_views_bank() -> None:
    m = _method(nce_k=8)
    batch = _batch([3, 17, 25, 4, 9])
    old_l, old_ab = m.memory_l.bank.clone().double(), m.memory_ab.bank.clone().double()
    torch.manual_seed(7)
    out = m.training_step(batch, STEP)
    torch.manual_seed(7)
    idx = sample_noise_indices(batch.index, 8, 40)
    f_l, f_ab = _features(m, batch.views[0])
    l_loss = _direct_nce(f_l, old_ab, idx, 40)  # L anchor vs the ab bank
    ab_loss = _direct_nce(f_ab, old_l, idx, 40)  # ab anchor vs the L bank
    assert float(out.logs["l_loss"]) == pytest.approx(l_loss, rel=1e-4)
    assert float(out.logs["ab_loss"]) == pytest.approx(ab_loss, rel=1e-4)
    assert out.loss.item() == pytest.approx(l_loss + ab_loss, rel=1e-4)
    # Scoring an anchor against its own view's bank gives another value: the test can fail.
    assert _direct_nce(f_l, old_l, idx, 40) != pytest.approx(l_loss, rel=1e-3)
    # Two normalising constants, one per direction, both set on this first batch.
    assert m.nce_l.normalizer.z.item() > 0 and m.nce_ab.normalizer.z.item() > 0
    assert m.nce_l.normalizer.z.item() != m.nce_ab.normalizer.z.item()


def test_banks_take_their_own_views_features_after_the_step() -> None:
    m = _method(nce_k=8)
    batch = _batch([1, 5, 30])
    old_l, old_ab = m.memory_l.bank.clone(), m.memory_ab.bank.clone()
    out = m.training_step(batch, STEP)
    assert torch.equal(m.memory_l.bank, old_l) and torch.equal(m.memory_ab.bank, old_ab)
    f_l, f_ab = _features(m, batch.views[0])
    out.loss.backward()
    m.after_optimizer_step(STEP)
    for b, i in enumerate([1, 5, 30]):
        v = 0.5 * old_l[i] + 0.5 * f_l[b].float()
        torch.testing.assert_close(m.memory_l.bank[i], v / v.norm(), rtol=1e-5, atol=1e-6)
        v = 0.5 * old_ab[i] + 0.5 * f_ab[b].float()
        torch.testing.assert_close(m.memory_ab.bank[i], v / v.norm(), rtol=1e-5, atol=1e-6)
    others = [r for r in range(40) if r not in (1, 5, 30)]
    assert torch.equal(m.memory_l.bank[others], old_l[others])


def test_softmax_variant_is_cross_entropy_over_the_sampled_rows() -> None:
    m = _method(nce_k=6, loss="softmax")
    batch = _batch([0, 11, 22, 33])
    old_l, old_ab = m.memory_l.bank.clone().double(), m.memory_ab.bank.clone().double()
    torch.manual_seed(3)
    out = m.training_step(batch, STEP)
    torch.manual_seed(3)
    idx = sample_noise_indices(batch.index, 6, 40)
    f_l, f_ab = _features(m, batch.views[0])

    def ce(anchor: torch.Tensor, bank: torch.Tensor) -> float:
        total = 0.0
        for i in range(idx.shape[0]):
            logits = [float(anchor[i] @ bank[int(j)]) / 0.07 for j in idx[i]]
            total += math.log(sum(math.exp(v) for v in logits)) - logits[0]
        return total / idx.shape[0]

    expected = ce(f_l, old_ab) + ce(f_ab, old_l)
    assert out.loss.item() == pytest.approx(expected, rel=1e-4)


def test_embedding_is_the_concatenation_and_export_offers_both_encoders() -> None:
    m = _method(nce_k=4)
    m.eval()
    x = torch.rand(3, 3, 16, 16)
    x_l, x_ab = m.split(x)
    with torch.no_grad():
        emb = m.embed(x)
        torch.testing.assert_close(emb, torch.cat([m.backbone(x_l), m.backbone_ab(x_ab)], 1))
    cands = m.export_candidates()
    assert list(cands) == ["l", "ab"]
    assert m.encoder() is cands["l"]
    for name, chans in (("l", 1), ("ab", 2)):
        enc = cands[name]
        conv = next(c for c in enc.modules() if isinstance(c, torch.nn.Conv2d))
        assert conv.in_channels == chans and enc.sslcli_spec.kwargs["in_chans"] == chans
    # Only the two view encoders exist: no unused 3-channel backbone left in the model.
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    assert sorted({c.in_channels for c in convs if c.in_channels <= 3}) == [1, 2]


@pytest.mark.parametrize(("which", "space"), [(None, "lab"), ("ab", "ycbcr")])
def test_export_reproduces_the_concatenated_representation(
    tmp_path: Path, which: str | None, space: str
) -> None:
    import json

    import timm

    import sslcli
    from sslcli.errors import TargetError
    from sslcli.runs.targets import load_target

    run = tmp_path / "run"
    api.train(
        "cmc",
        overrides={
            "backbone": {"name": "test_resnet"},
            "trainer": {"max_steps": 1, "batch_size": 16, "out": str(run), "eval_knn": False},
        },
        sets=["method.nce_k=8", f"method.color_space={space}"],
    )
    out = tmp_path / "export"
    result = api.export(run, out, which=which)
    main, other = ("l", "ab") if which is None else ("ab", "l")
    cfg = json.loads((out / "config.json").read_text())
    pair = cfg["sslcli"]["paired_views"]
    assert (pair["which"], pair["companion"]["which"], pair["color_space"]) == (main, other, space)
    assert (out / f"{other}.safetensors").is_file()
    assert any("two encoders" in n for n in result.notes)

    trained = load_target(run)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = trained.embedder()(images)  # CMC.embed: both encoders, concatenated
        loaded = sslcli.load_timm(out)
        torch.testing.assert_close(loaded(images), want)
        torch.testing.assert_close(load_target(out).embedder()(images), want)
    # The main weights alone are a plain timm model with the view's channel count.
    plain = timm.create_model(cfg["architecture"], num_classes=0, **cfg["model_args"])
    assert cfg["model_args"]["in_chans"] == (1 if main == "l" else 2)
    from safetensors.torch import load_file

    state = load_file(str(out / "model.safetensors"))
    assert set(state) == set(plain.state_dict())
    assert loaded.encoder is (loaded.l if main == "l" else loaded.ab)
    # One colour-view encoder alone cannot take the RGB images sslcli evaluates: one line.
    del cfg["sslcli"]["paired_views"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TargetError, match="-channel inputs"):
        load_target(out)


def test_views_are_unnormalised_crops_without_colour_jitter() -> None:
    (v,) = _method().views()
    assert v.count == 1 and not v.normalize and v.jitter_p == 0 and v.grayscale_p == 0
    assert v.scale == (0.08, 1.0) and v.flip_p == 0.5
