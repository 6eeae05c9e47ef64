"""InstDisc: memory bank, NCE loss and Z, softmax variant, the method's step and update order."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sslcli_plugins.instdisc import InstDisc, InstDiscConfig

from sslcli.backbones import make_spec
from sslcli.method import Batch, StepInfo
from sslcli.nn.memory_bank import MemoryBank
from sslcli.nn.nce import (
    NCELoss,
    NCENormalizer,
    bank_softmax_loss,
    nce_criterion,
    sample_noise_indices,
)

STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


def _unit(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


# -- the memory bank ---------------------------------------------------------------------------


def test_bank_initialisation_is_uniform_in_plus_minus_s() -> None:
    torch.manual_seed(0)
    bank = MemoryBank(500, 128).bank
    s = 1 / math.sqrt(128 / 3)
    assert bank.shape == (500, 128)
    assert float(bank.min()) >= -s and float(bank.max()) <= s
    # Uniform on [-s, s]: both ends are reached and the mean is ~0, variance s^2/3 = 1/D.
    assert float(bank.min()) < -0.99 * s and float(bank.max()) > 0.99 * s
    assert abs(float(bank.var()) - 1 / 128) < 0.1 / 128


def test_bank_update_touches_exactly_the_batch_rows() -> None:
    torch.manual_seed(0)
    mem = MemoryBank(10, 4, momentum=0.5)
    before = mem.bank.clone()
    index = torch.tensor([7, 2, 9])
    f = _unit(3, 4)
    mem.update(index, f)
    for row in range(10):
        if row in (7, 2, 9):
            b = index.tolist().index(row)
            v = 0.5 * before[row] + 0.5 * f[b]
            expected = v / math.sqrt(sum(float(t) ** 2 for t in v))
            torch.testing.assert_close(mem.bank[row], expected)
        else:
            assert torch.equal(mem.bank[row], before[row])


def test_bank_update_other_momentum() -> None:
    torch.manual_seed(1)
    mem = MemoryBank(6, 3, momentum=0.8)
    before = mem.bank.clone()
    f = _unit(1, 3)
    mem.update(torch.tensor([4]), f)
    v = 0.8 * before[4] + 0.2 * f[0]
    torch.testing.assert_close(mem.bank[4], v / v.norm())


def test_bank_duplicate_indices_are_applied_in_batch_order() -> None:
    torch.manual_seed(2)
    mem = MemoryBank(8, 5, momentum=0.5)
    expected = mem.bank.clone()
    index = torch.tensor([3, 1, 3, 6, 3, 1])
    f = _unit(6, 5)
    mem.update(index, f)
    for b, i in enumerate(index.tolist()):  # one occurrence after the other
        v = 0.5 * expected[i] + 0.5 * f[b]
        expected[i] = v / v.norm()
    torch.testing.assert_close(mem.bank, expected)


def test_rows_are_a_copy() -> None:
    mem = MemoryBank(5, 3)
    rows = mem.rows(torch.tensor([[1, 2], [0, 4]]))
    assert rows.shape == (2, 2, 3)
    snapshot = rows.clone()
    mem.update(torch.tensor([1, 2, 0, 4]), _unit(4, 3))
    assert torch.equal(rows, snapshot)


# -- the NCE loss --------------------------------------------------------------------------------


def test_noise_indices_put_the_positive_first() -> None:
    torch.manual_seed(0)
    index = torch.tensor([5, 0, 99])
    idx = sample_noise_indices(index, 50, 100)
    assert idx.shape == (3, 51)
    assert torch.equal(idx[:, 0], index)
    assert int(idx.min()) >= 0 and int(idx.max()) < 100


def _direct_nce(probs: list[list[float]], n: int) -> float:
    """Wu et al. Eq. 6-7 with K noise samples, written out per sample and per noise row."""
    k = len(probs[0]) - 1
    pn = 1.0 / n
    total = 0.0
    for row in probs:
        total += math.log(row[0] / (row[0] + k * pn + 1e-7))
        for p in row[1:]:
            total += math.log(k * pn / (p + k * pn + 1e-7))
    return -total / len(probs)


def test_nce_criterion_matches_the_formula() -> None:
    torch.manual_seed(0)
    probs = torch.rand(4, 9, dtype=torch.float64) * 1e-2
    got = nce_criterion(probs, 1000)
    assert got.item() == pytest.approx(_direct_nce(probs.tolist(), 1000), rel=1e-12)


def test_z_is_estimated_on_the_first_batch_then_frozen() -> None:
    norm = NCENormalizer(dataset_size=1000)
    s1 = torch.rand(4, 9) + 0.5
    z1 = norm(s1)
    assert z1.item() == pytest.approx(float(s1.mean()) * 1000, rel=1e-6)
    z2 = norm(torch.rand(4, 9) * 10)
    assert z2.item() == z1.item()
    assert norm.z.item() == z1.item()


def test_z_ema_variant() -> None:
    norm = NCENormalizer(dataset_size=50, momentum=0.99)
    batches = [torch.rand(3, 5) + i for i in range(4)]
    z = -1.0
    for s in batches:
        est = float(s.mean()) * 50
        z = est if z < 0 else 0.99 * z + 0.01 * est
        assert norm(s).item() == pytest.approx(z, rel=1e-6)


def test_z_survives_a_state_dict_round_trip() -> None:
    a = NCENormalizer(100)
    a(torch.rand(2, 3))
    b = NCENormalizer(100)
    b.load_state_dict(a.state_dict())
    assert b.z.item() == a.z.item()
    assert b(torch.rand(2, 3) * 7).item() == a.z.item()


def test_nce_loss_and_gradient_match_a_direct_implementation() -> None:
    torch.manual_seed(0)
    n, tau, b, k, d = 200, 0.07, 3, 6, 8
    f = _unit(b, d, dtype=torch.float64).requires_grad_()
    rows = _unit(b, k + 1, d, dtype=torch.float64)
    loss_mod = NCELoss(n, tau, None)
    loss, probs = loss_mod(f, rows)
    loss.backward()

    # Direct: s_bj = exp(v_bj . f_b / tau), Z = mean(s) * N as a constant, P = s / Z.
    f2 = f.detach().clone().requires_grad_()
    scores = [[torch.exp(sum(rows[i, j, c] * f2[i, c] for c in range(d)) / tau)
               for j in range(k + 1)] for i in range(b)]  # fmt: skip
    z = sum(float(s.detach()) for r in scores for s in r) / (b * (k + 1)) * n
    total = torch.zeros((), dtype=torch.float64)
    kpn = k / n
    for i in range(b):
        p0 = scores[i][0] / z
        total = total + torch.log(p0 / (p0 + kpn + 1e-7))
        for j in range(1, k + 1):
            total = total + torch.log(kpn / (scores[i][j] / z + kpn + 1e-7))
    direct = -total / b
    direct.backward()
    # The module computes in fp32 (autocast-proof); the direct version in fp64.
    assert loss.item() == pytest.approx(direct.item(), rel=1e-6)
    assert loss_mod.normalizer.z.item() == pytest.approx(z, rel=1e-6)
    torch.testing.assert_close(f.grad, f2.grad, rtol=1e-5, atol=1e-6)


def test_bank_softmax_matches_a_direct_implementation() -> None:
    torch.manual_seed(0)
    f = _unit(3, 4, dtype=torch.float64)
    bank = _unit(7, 4, dtype=torch.float64)
    index = torch.tensor([2, 6, 0])
    loss, _ = bank_softmax_loss(f, bank, index, 0.1)  # fp32 inside
    total = 0.0
    for i in range(3):
        logits = [float(bank[j] @ f[i]) / 0.1 for j in range(7)]
        total += -(logits[int(index[i])] - math.log(sum(math.exp(v) for v in logits)))
    assert loss.item() == pytest.approx(total / 3, rel=1e-6)


# -- the method ------------------------------------------------------------------------------------


def _method(**cfg: object) -> InstDisc:
    torch.manual_seed(0)
    backbone = make_spec("test_resnet", 16).build()
    return InstDisc(InstDiscConfig(**cfg), backbone, dataset_size=40)  # type: ignore[arg-type]


def _batch(index: list[int]) -> Batch:
    torch.manual_seed(len(index))
    return Batch(views=[torch.randn(len(index), 3, 16, 16)], index=torch.tensor(index))


def test_step_reads_the_old_rows_then_updates_the_batch_rows() -> None:
    m = _method(nce_k=8)
    batch = _batch([3, 17, 25, 4])
    old = m.memory.bank.clone()
    torch.manual_seed(123)
    out = m.training_step(batch, STEP)
    # The loss was computed from the bank before any update ...
    assert torch.equal(m.memory.bank, old)
    torch.manual_seed(123)
    idx = sample_noise_indices(batch.index, 8, 40)
    f = out.embedding
    assert f is not None
    ref_loss, _ = NCELoss(40, 0.07, None)(f, old[idx])
    assert out.loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    out.loss.backward()
    # ... and the rows of the batch take the new features after the optimiser step.
    m.after_optimizer_step(STEP)
    for b, i in enumerate(batch.index.tolist()):
        v = 0.5 * old[i] + 0.5 * f[b]
        torch.testing.assert_close(m.memory.bank[i], v / v.norm())
    untouched = [r for r in range(40) if r not in batch.index.tolist()]
    assert torch.equal(m.memory.bank[untouched], old[untouched])


def test_z_is_frozen_across_steps_unless_ema() -> None:
    frozen = _method(nce_k=8)
    frozen.training_step(_batch([0, 1, 2, 3]), STEP)
    frozen.after_optimizer_step(STEP)
    z1 = frozen.nce.normalizer.z.item()
    frozen.training_step(_batch([4, 5, 6]), STEP)
    assert frozen.nce.normalizer.z.item() == z1

    ema = _method(nce_k=8, z_momentum=0.99)
    ema.training_step(_batch([0, 1, 2, 3]), STEP)
    ema.after_optimizer_step(STEP)
    e1 = ema.nce.normalizer.z.item()
    ema.training_step(_batch([4, 5, 6]), STEP)
    assert ema.nce.normalizer.z.item() != e1
    assert "nce.normalizer.z" in ema.state_dict() and "memory.bank" in ema.state_dict()


def test_softmax_variant_trains_and_updates_the_bank() -> None:
    m = _method(nce_k=0)
    batch = _batch([1, 2, 3, 4, 5])
    old = m.memory.bank.clone()
    out = m.training_step(batch, STEP)
    f = out.embedding
    assert f is not None
    expected, _ = bank_softmax_loss(f, old, batch.index, 0.07)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.loss.backward()  # the bank is untouched until after the optimiser step
    m.after_optimizer_step(STEP)
    assert not torch.equal(m.memory.bank[1:6], old[1:6])
    assert torch.equal(m.memory.bank[6:], old[6:])


def test_views_follow_the_official_augmentation() -> None:
    (v,) = _method().views()
    assert v.count == 1 and v.scale == (0.2, 1.0)
    assert v.jitter_p == 1.0 and (v.brightness, v.contrast, v.saturation, v.hue) == (0.4,) * 4
    assert v.grayscale_p == 0.2 and v.grayscale_first


def test_more_noise_samples_than_images_runs_with_a_warning() -> None:
    # Noise is drawn with replacement, so K >= N is computable (the official K = 4096 runs
    # on digits' 1,438 images) but a poor problem, which the warning says.
    with pytest.warns(UserWarning, match="nce_k=100 >= 40 images"):
        m = _method(nce_k=100)
    out = m.training_step(_batch([0, 1, 2]), STEP)
    assert torch.isfinite(out.loss)


def test_default_noise_count_follows_the_data_set_size() -> None:
    from sslcli.nn.nce import default_noise_count

    # The official K = 4096 from CIFAR-10 size up; N/8 below 32,768 images, so an image's
    # own row stays rare among its noise (digits: 1,438 images -> K = 179).
    assert default_noise_count(1_281_167) == default_noise_count(50_000) == 4096
    assert default_noise_count(32_768) == 4096 and default_noise_count(32_767) == 4095
    assert default_noise_count(1438) == 179 and default_noise_count(3) == 1
    # InstDisc itself uses the exact softmax below that size (NCE approximates it for
    # large N only), and the official K above it.
    assert _method().nce_k == 0  # dataset_size 40
    assert _method(nce_k=0).nce_k == 0 and _method(nce_k=7).nce_k == 7
    torch.manual_seed(0)
    big = InstDisc(InstDiscConfig(), make_spec("test_resnet", 16).build(), dataset_size=50_000)
    assert big.nce_k == 4096


@pytest.mark.parametrize("method", ["instdisc", "invaspread"])
def test_eval_which_embedding_reads_the_unit_128d_embedding(
    method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The published kNN numbers of InstDisc and InvaSpread use the 128-d normalised
    embedding: ``ssl eval knn --which embedding`` evaluates it; the default stays the
    backbone's pooled feature; ``ssl export`` refuses it in one line."""
    import json

    from safetensors import safe_open

    from sslcli.cli.app import main
    from sslcli.runs.targets import load_target
    from tests.helpers import make_run

    run = make_run(tmp_path / method, method=method)
    t = load_target(run)
    assert list(t.candidates) == ["backbone", "embedding"]
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        f = t.embedder("embedding")(x)
        assert f.shape == (4, 128)
        torch.testing.assert_close(f.norm(dim=1), torch.ones(4))
        # The method's own training-time embedding, from the same weights.
        assert t.method is not None
        torch.testing.assert_close(f, F.normalize(t.method.head(t.method.backbone(x)), dim=1))
        assert t.embedder(None)(x).shape[1] != 128  # the default: the backbone feature
    widths = {}
    for which in (None, "embedding"):
        cache = tmp_path / f"cache-{which}"
        argv = ["eval", "knn", str(run), "--json", "--k", "20", "--cache-dir", str(cache)]
        code = main(argv + (["--which", which] if which else []))
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out)["which"] == which
        (entry, *_) = sorted(cache.glob("features-*.safetensors"))
        with safe_open(str(entry), "pt") as fh:
            widths[which] = fh.get_tensor("features").shape[1]
    assert widths["embedding"] == 128 != widths[None]
    code = main(["export", str(run), "--out", str(tmp_path / "exp"), "--which", "embedding"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not a timm network" in err[0]
    main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "by default is the method's encoder's pooled backbone feature" in text
    assert "'embedding', the 128-d unit embedding" in text
