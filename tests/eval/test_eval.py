"""Evaluation: kNN and linear probe against direct computations, the no-test-labels rule,
label fractions, the feature cache, the online probe, and ``ssl eval`` end to end."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sslcli import api
from sslcli.eval import linear as linear_mod
from sslcli.eval.knn import knn_accuracies, knn_accuracy
from sslcli.eval.linear import LinearHeads, linear_probe
from sslcli.eval.online_probe import OnlineProbe
from sslcli.eval.splits import holdout_split, label_subset
from sslcli.runs import checkpoint as ckpt
from sslcli.runtime import eval_mode
from tests.helpers import DIGITS_TRAIN, cli, make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("eval") / "simclr-run")


# ---------------------------------------------------------------------------------------------
# kNN against a direct implementation
# ---------------------------------------------------------------------------------------------


def direct_knn(
    train: list[list[float]], train_y: list[int], test: list[list[float]], test_y: list[int],
    k: int, temperature: float, num_classes: int,
) -> float:  # fmt: skip
    """Weighted kNN written out: cosine similarity, the k most similar training samples each
    vote exp(sim / T) for their class, the largest total wins (lowest class on a tie)."""

    def norm(v: list[float]) -> list[float]:
        n = math.sqrt(sum(a * a for a in v))
        return [a / n for a in v]

    tr = [norm(v) for v in train]
    correct = 0
    for q, truth in zip(test, test_y, strict=True):
        qn = norm(q)
        sims = [(sum(a * b for a, b in zip(qn, t, strict=True)), i) for i, t in enumerate(tr)]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, i in sims[:k]:
            votes[train_y[i]] += math.exp(s / temperature)
        pred = max(range(num_classes), key=lambda c: (votes[c], -c))
        correct += pred == truth
    return correct / len(test)


def test_knn_matches_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=g)
    train_y = torch.randint(0, 4, (60,), generator=g)
    test_y = torch.randint(0, 4, (25,), generator=g)
    train = centers[train_y] + 0.9 * torch.randn(60, 6, generator=g)
    test = centers[test_y] + 0.9 * torch.randn(25, 6, generator=g)
    for temperature in (0.07, 0.5):
        # chunk=7 makes the chunked path cover several, uneven chunks.
        accs = knn_accuracies(train, train_y, test, test_y, (15, 3), temperature, 4, chunk=7)
        for k in (15, 3):
            want = direct_knn(train.tolist(), train_y.tolist(), test.tolist(), test_y.tolist(),
                              k, temperature, 4)  # fmt: skip
            assert accs[k] == pytest.approx(want, abs=1e-9), (k, temperature)
            assert 0.2 < want < 1.0  # a non-trivial problem, so the check can fail
        assert accs[15] == pytest.approx(
            knn_accuracy(train, train_y, test, test_y, 15, temperature)
        )


def test_knn_with_k_beyond_the_reference_set() -> None:
    x = torch.eye(3)
    y = torch.tensor([0, 1, 2])
    assert knn_accuracies(x, y, x, y, (200,), 0.07, 3) == {200: 1.0}


# ---------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------


def test_label_subset_is_class_balanced_fixed_and_ignores_unlabelled() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3 + [-1] * 10)
    sub = label_subset(labels, 0.1)
    assert torch.equal(sub, label_subset(labels, 0.1))  # fixed
    counts = torch.bincount(labels[sub], minlength=3).tolist()
    assert counts == [5, 3, 1]  # round(0.1 n_c), at least one per class
    assert bool((labels[sub] >= 0).all()) and torch.equal(sub, sub.sort().values)
    assert label_subset(labels, 1.0).numel() == 83
    with pytest.raises(ValueError):
        label_subset(labels, 0.0)


def test_holdout_split_partitions_every_class() -> None:
    labels = torch.tensor([0] * 20 + [1] * 9 + [2])
    fit, held = holdout_split(labels, 0.1)
    assert set(fit.tolist()).isdisjoint(held.tolist())
    assert sorted(fit.tolist() + held.tolist()) == list(range(30))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 1, 0]
    assert 29 in fit.tolist()  # the single image of class 2 is never held out


# ---------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------


def test_linear_heads_update_is_torch_sgd_with_nesterov() -> None:
    """Each of the K heads follows torch.optim.SGD(momentum, nesterov, weight decay on W)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 5, generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    lrs, wds = [0.1, 0.5], [0.0, 0.01]
    heads = LinearHeads(5, 3, lrs, wds)
    heads.set_standardization(x)
    refs = []
    for lr, wd in zip(lrs, wds, strict=True):
        lin = torch.nn.Linear(5, 3)
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        opt = torch.optim.SGD([{"params": [lin.weight], "weight_decay": wd},
                               {"params": [lin.bias], "weight_decay": 0.0}],
                              lr=lr, momentum=0.9, nesterov=True)  # fmt: skip
        refs.append((lin, opt))
    z = (x - x.mean(0)) / x.std(0, unbiased=False)
    for step in range(4):
        factor = 1.0 - 0.2 * step
        LinearHeads.loss(heads(x), y).backward()
        heads.sgd_step(factor)
        for i, (lin, opt) in enumerate(refs):
            for grp in opt.param_groups:
                grp["lr"] = lrs[i] * factor
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(z), y).backward()
            opt.step()
    for i, (lin, _) in enumerate(refs):
        torch.testing.assert_close(heads.weight[i], lin.weight.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(heads.bias[i], lin.bias, rtol=1e-5, atol=1e-6)


def _blobs(n: int, seed: int, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, 8, generator=torch.Generator().manual_seed(123)) * 2
    y = torch.randint(0, 5, (n,), generator=g)
    return centers[y] + noise * torch.randn(n, 8, generator=g), y


def test_linear_probe_accuracy_is_its_classifier_on_the_test_split() -> None:
    x, y = _blobs(300, 0)
    xt, yt = _blobs(120, 1)
    res = linear_probe(x, y, xt, yt, 5, lrs=(0.1, 1.0), epochs=30, batch_size=64)
    c = res.classifier
    # The reported number, recomputed by hand from the returned classifier.
    correct = 0
    for row, truth in zip(xt.tolist(), yt.tolist(), strict=True):
        z = [(a - s) / sc for a, s, sc in zip(row, c["shift"].tolist(), c["scale"].tolist(),
                                               strict=True)]  # fmt: skip
        logits = [
            sum(z[d] * c["weight"][d, j].item() for d in range(8)) + c["bias"][j].item()
            for j in range(5)
        ]
        correct += max(range(5), key=lambda j: logits[j]) == truth
    assert res.top1 == pytest.approx(correct / len(yt), abs=1e-6)
    # ... and it is as good as an independent solver of the same (convex) problem.
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0, unbiased=False)
    ref = LogisticRegression(C=100.0, max_iter=5000).fit(((x - mu) / sd).numpy(), y.numpy())
    ref_acc = float((ref.predict(((xt - mu) / sd).numpy()) == yt.numpy()).mean())
    assert abs(res.top1 - ref_acc) <= 0.03, (res.top1, ref_acc)
    assert res.top1 > 0.6  # the problem is learnable; a broken probe lands near 0.2


def test_linear_probe_on_separable_features_is_perfect() -> None:
    x, y = _blobs(200, 2, noise=0.05)
    xt, yt = _blobs(50, 3, noise=0.05)
    res = linear_probe(x, y, xt, yt, 5, lrs=(0.3,), epochs=10, batch_size=50)
    assert res.top1 == 1.0 and res.holdout_images == 0 and res.train_images == 200


def test_hyper_parameters_never_depend_on_test_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Poisoned test labels and features change the reported accuracy, never the choice;
    and the test split is scored exactly once, after the choice."""
    x, y = _blobs(300, 4, noise=1.5)
    xt, yt = _blobs(100, 5, noise=1.5)
    kw: dict[str, Any] = dict(lrs=(0.001, 0.03, 1.0), wds=(0.0, 0.05), epochs=15, batch_size=64)
    calls: list[int] = []
    real = linear_mod.score_heads

    def spy(heads: LinearHeads, xs: torch.Tensor, ys: torch.Tensor, chunk: int = 4096) -> Any:
        calls.append(int(ys.shape[0]))
        return real(heads, xs, ys, chunk)

    monkeypatch.setattr(linear_mod, "score_heads", spy)
    clean = linear_probe(x, y, xt, yt, 5, **kw)
    assert calls == [clean.holdout_images, 100], "test must be scored once, last"
    poisoned_y = (yt + 1 + torch.randint(0, 4, yt.shape)) % 5  # every label wrong
    poisoned = linear_probe(x, y, torch.randn_like(xt) * 9, poisoned_y, 5, **kw)
    assert (poisoned.lr, poisoned.wd) == (clean.lr, clean.wd)
    assert [c.holdout_top1 for c in poisoned.candidates] == [
        c.holdout_top1 for c in clean.candidates
    ]
    assert poisoned.top1 != clean.top1
    # The choice is a real one: the held-out scores differ across the grid.
    assert len({c.holdout_top1 for c in clean.candidates}) > 1


def test_linear_probe_refuses_a_sweep_without_anything_to_hold_out() -> None:
    x = torch.randn(3, 4)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(linear_mod.EvalError, match="hold some out"):
        linear_probe(x, y, x, y, 3, lrs=(0.1, 1.0), epochs=1)


# ---------------------------------------------------------------------------------------------
# Online probe
# ---------------------------------------------------------------------------------------------


def test_online_probe_learns_ignores_unlabelled_rows_and_resumes_exactly() -> None:
    x, y = _blobs(512, 6, noise=0.5)
    probe = OnlineProbe(8, 5, lr=0.1)
    for i in range(0, 256, 32):
        loss = probe.step(x[i : i + 32], y[i : i + 32])
        assert loss.requires_grad is False
    first = probe.compute()
    assert set(first) == {"probe_top1", "probe_loss"} and probe.seen.item() == 256
    probe.reset()
    # Unlabelled rows: no loss, nothing counted.
    assert probe.step(x[:16], torch.full((16,), -1)).item() == 0.0
    assert probe.seen.item() == 0 and probe.accuracy is None
    clone = OnlineProbe(8, 5, lr=0.1)
    clone.load_state_dict(probe.state_dict())
    for i in range(256, 512, 32):
        a = probe.step(x[i : i + 32], y[i : i + 32])
        b = clone.step(x[i : i + 32], y[i : i + 32])
        assert torch.equal(a, b)
    for (k, v), (_, w) in zip(probe.state_dict().items(), clone.state_dict().items(),
                              strict=True):  # fmt: skip
        assert torch.equal(v, w), k
    acc = probe.accuracy
    assert acc is not None and acc > 0.9 > first["probe_top1"] - 0.5
    preds = probe.predict(x[:64]).argmax(1)
    assert float((preds == y[:64]).float().mean()) > 0.9


def test_online_probe_never_touches_the_encoder_gradients() -> None:
    enc = torch.nn.Linear(8, 8)
    feats = enc(torch.randn(16, 8))
    probe = OnlineProbe(8, 3)
    probe.step(feats, torch.randint(0, 3, (16,)))
    assert enc.weight.grad is None


# ---------------------------------------------------------------------------------------------
# ssl eval end to end
# ---------------------------------------------------------------------------------------------


def test_eval_knn_json_records_and_caches(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    argv = ["eval", "knn", str(run_dir), "--json", "--cache-dir", str(cache), "--k", "50"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["protocol"] == "knn" and r["method"] == "simclr" and r["step"] == 2
    assert set(r["knn"]) == {"50", "20"} and r["top1"] == r["knn"]["50"]
    assert r["feature_cache"] == "miss" and r["train_images"] == DIGITS_TRAIN
    assert 0.0 <= r["top1"] <= 1.0
    # Same numbers from the cache (two entries: train and test).
    assert len(list(cache.glob("features-*.safetensors"))) == 2
    code, out2, _ = cli(argv, capsys)
    r2 = json.loads(out2)
    assert r2["feature_cache"] == "hit" and r2["knn"] == r["knn"]
    # kNN on the cached features, computed directly, gives the reported numbers.
    from sslcli.eval.cache import read_entry

    entries = {}
    for p in cache.glob("features-*.safetensors"):
        from safetensors import safe_open

        with safe_open(str(p), "pt") as f:
            key = json.loads(f.metadata()["sslcli_cache"])
        entries[key["data"]["split"]] = read_entry(p, key)
    (xtr, ytr), (xte, yte) = entries["train"], entries["test"]
    assert knn_accuracy(xtr, ytr, xte, yte, 50, 0.07) == pytest.approx(r["top1"])
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e.get("event") == "eval"]
    assert evals and evals[-1]["knn"] == r["knn"] and evals[-1]["step"] == 2


def test_eval_linear_and_finetune_with_label_fraction(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = ["--cache-dir", str(tmp_path / "c"), "--no-record"]
    code, out, err = cli(["eval", "linear", str(run_dir), "--json", "--epochs", "3",
                          "--lr", "0.1,1", "--label-fraction", "0.1", *cache], capsys)  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    from sslcli.data.datasets import open_dataset

    labels = open_dataset("digits", "train", 16).labels
    n10, n1 = label_subset(labels, 0.1).numel(), label_subset(labels, 0.01).numel()
    assert n1 == 10 and 130 < n10 < 160  # round(1.4) = 1 and ~14 images of each digit
    assert r["label_fraction"] == 0.1 and r["train_images"] == n10
    assert [c["lr"] for c in r["selection"]] == [0.1, 1.0] and r["lr"] in (0.1, 1.0)
    code, out, err = cli(["eval", "linear", str(run_dir), "--epochs", "1", "--lr", "0.1",
                          "--augment", "--label-fraction", "0.1", *cache], capsys)  # fmt: skip
    assert code == 0, err
    assert "linear evaluation" in out and "top-1" in out
    code, out, err = cli(["eval", "finetune", str(run_dir), "--json", "--epochs", "1",
                          "--label-fraction", "0.01", "--no-record"], capsys)  # fmt: skip
    assert code == 0, err
    r = json.loads(out)
    assert r["protocol"] == "finetune" and r["train_images"] == n1 and r["epochs"] == 1


def test_bare_eval_takes_the_latest_run(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import shutil

    runs = tmp_path / "runs"
    runs.mkdir()
    old, new = runs / "simclr-old", runs / "simclr-new"
    for d in (old, new):
        shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("eval-cache"))
    past = time.time() - 1000
    os.utime(old / "checkpoints" / "last.safetensors", (past, past))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["eval", "knn", "--json", "--no-cache"], capsys)
    assert code == 0, err
    assert json.loads(out)["target"] == str(new.resolve())
    assert "most recent run" in err and "data: digits" in err
    assert any(
        json.loads(line).get("event") == "eval"
        for line in (new / "metrics.jsonl").read_text().splitlines()
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["eval", "knn", "/nonexistent/run"], "target not found"),
        (["eval", "linear", "{tmp}"], "no checkpoint"),
        (["eval", "knn", "{run}", "--data", "/nonexistent/data"], "/nonexistent/data"),
        (["eval", "knn", "{run}", "--which", "nope"], "--which 'nope'"),
        (["eval", "knn", "{run}", "--label-fraction", "2"], "label-fraction"),
        (["eval", "knn", "{run}", "--data", "{flat}"], "no labelled test split"),
        (["eval", "linear", "{run}", "--lr", "abc"], "comma-separated"),
    ],
)
def test_bad_targets_and_data_are_one_line_errors(
    argv: list[str], needle: str, run_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    from PIL import Image

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(flat / f"{i}.png")
    subst = {"{tmp}": str(tmp_path), "{run}": str(run_dir), "{flat}": str(flat)}
    code, out, err = cli([subst.get(a, a) for a in argv], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl: error: "), err
    assert needle in lines[0]
    assert out == ""


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"protocol": "svm"}, "unknown protocol 'svm'"),
        ({"protocol": "knn", "holdout": 1.0}, "--holdout must be in (0, 1)"),
        ({"protocol": "knn", "k": 0}, "--k must be >= 1"),
        ({"protocol": "knn", "temperature": 0.0}, "--temperature > 0"),
        ({"protocol": "finetune", "wds": "0,0.1"}, "one --wd value"),
        ({"protocol": "linear", "head_layer": 1}, "fine-tuning only"),
        ({"protocol": "knn", "k": "many"}, "k: "),
        ({"protocol": "knn", "kk": 5}, "kk: unknown option"),
    ],
)
def test_eval_options_fail_in_one_line_before_anything_loads(
    fields: dict[str, Any], needle: str
) -> None:
    with pytest.raises(linear_mod.EvalError) as e:
        api.EvalOptions(**fields)
    assert needle in str(e.value) and len(str(e.value).splitlines()) == 1


def test_eval_options_fill_the_protocols_defaults() -> None:
    linear = api.EvalOptions(protocol="linear", lrs="0.1, 1", wds=None)
    assert linear.lrs == [0.1, 1.0] and linear.wds == [0.0]
    assert api.EvalOptions(protocol="linear").lrs == [0.01, 0.03, 0.1, 0.3, 1.0]
    assert api.EvalOptions(protocol="finetune").lrs == [0.05]


def test_finetune_trains_a_copy_of_the_whole_encoder(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sslcli.data.datasets import open_dataset
    from sslcli.eval.finetune import build_net, train_net, train_view
    from sslcli.runs.targets import load_target

    t = load_target(run_dir)
    train = open_dataset("digits", "train", 16, labelled_only=True)
    before = {k: v.clone() for k, v in t.method.state_dict().items()}
    net = build_net(t, None, 10, seed=0)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    rows = label_subset(train.labels, 0.05)
    kw: dict[str, Any] = dict(lr=0.05, weight_decay=0.0, epochs=2, batch_size=32,
                              view=train_view(t), device=torch.device("cpu"), dtype=None,
                              seed=0)  # fmt: skip
    train_net(net, train, rows, **kw)
    changed = {k for k, v in net.state_dict().items() if not torch.equal(v, start[k])}
    body_params = {f"body.{n}" for n, _ in net.body.named_parameters()}
    assert body_params <= changed, sorted(body_params - changed)[:5]  # every encoder weight
    assert {"head.weight", "head.bias"} <= changed
    after = t.method.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the checkpoint is untouched

    # A method whose embed() blocks gradients is refused, not silently linear-probed.
    method_cls = type(t.method)
    blocked = torch.no_grad()(method_cls.embed)
    monkeypatch.setattr(method_cls, "embed", blocked)
    net = build_net(t, None, 10, seed=0)
    assert net.via_embed
    with pytest.raises(linear_mod.EvalError, match="no gradient reaches the encoder"):
        train_net(net, train, rows, **kw)


def test_eval_on_an_image_folder_through_the_loader_path(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Folder datasets have no in-memory fast path: batches come through a DataLoader."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 4)):
        for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
            d = tmp_path / "folder" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = (torch.tensor(colour) + torch.randint(-20, 20, (3,), generator=g)).tolist()
                Image.new("RGB", (12, 10), tuple(px)).save(d / f"{i}.png")
    data = ["--data", str(tmp_path / "folder"), "--no-record", "--json"]
    code, out, err = cli(["eval", "knn", str(run_dir), "--no-cache", "--k", "3", *data], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert (r["train_images"], r["test_images"], r["num_classes"]) == (16, 8, 2)
    code, out, err = cli(["eval", "linear", str(run_dir), "--augment", "--epochs", "2",
                          "--lr", "0.1", "--no-cache", *data], capsys)  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["augment"] is True
    code, out, err = cli(["eval", "finetune", str(run_dir), "--epochs", "1", *data], capsys)
    assert code == 0, err
    assert json.loads(out)["train_images"] == 16


def test_simclr_v2_finetunes_from_a_head_layer(
    tmp_path: Path, run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SimCLR v2 fine-tunes from the middle of its 3-layer head by default (Sec. 2.1);
    ``--head-layer`` picks another layer; other methods refuse the flag in one line."""
    from sslcli.eval.finetune import build_net
    from sslcli.runs.targets import load_target

    v2 = make_run(tmp_path / "v2", method="simclr-v2", sets=["method.proj_hidden_dim=24"])
    t = load_target(v2)
    x = torch.randn(4, 3, 16, 16)
    m = t.method
    with torch.no_grad(), eval_mode(m):
        want = m.projector[0](m.backbone(x))  # backbone, then head layer 1 (Linear-BN-ReLU)
    net = build_net(t, None, 10, seed=0)  # the method's default, finetune_layer = 1
    assert net.head.in_features == 24
    with torch.no_grad(), eval_mode(net):
        assert torch.allclose(net.features(x), want, atol=1e-6)
    assert build_net(t, None, 10, 0, head_layer=0).head.in_features == m.backbone.num_features
    assert build_net(t, None, 10, 0, head_layer=3).head.in_features == 128  # whole head
    with pytest.raises(linear_mod.EvalError, match="--head-layer: layer must be in 0..3"):
        build_net(t, None, 10, 0, head_layer=4)
    # The network is a copy: fine-tuning never writes into the checkpoint's modules.
    assert all(p is not q for p in net.parameters() for q in m.parameters())

    code, _, err = cli(["eval", "finetune", str(run_dir), "--head-layer", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--head-layer needs a run or checkpoint of a method" in err
    with pytest.raises(linear_mod.EvalError, match="fine-tuning only"):
        api.evaluate(api.EvalOptions(protocol="linear", target=v2, head_layer=1, record=False))


def test_weights_of_another_layout_are_a_short_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A checkpoint whose head was saved under other names (an older layout) and with one
    # tensor of another shape: counts and two examples per kind, not the whole key list.
    run = make_run(tmp_path / "old")
    path = run / "checkpoints" / "last.safetensors"
    groups, meta = ckpt.load(path)
    model = {k.replace("projector.0.", "projector.9."): v for k, v in groups["model"].items()}
    model["backbone.fc_norm.weight"] = torch.zeros(3)  # not in the model
    key = next(k for k in model if k.startswith("backbone.") and k.endswith("conv1.weight"))
    model[key] = torch.zeros(1)
    for old in (run / "checkpoints").iterdir():
        old.unlink()
    ckpt.save(run / "checkpoints", 2, {"model": model}, meta, keep=2)
    code, _, err = cli(["eval", "knn", str(run)], capsys)
    (line,) = err.strip().splitlines()
    assert code == 2 and "weights do not fit method 'simclr'" in line
    assert re.search(r"\d+ missing keys \(e\.g\. projector\.0\.", line)
    assert re.search(r"\d+ unexpected keys \(e\.g\. ", line) and "1 reshaped keys" in line
    assert len(line) < 400
