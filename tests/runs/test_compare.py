"""``ssl compare``: the table from fixture runs' config.json + metrics.jsonl (with eval
events), every output format, the PNG, training a comparison, and one-line errors."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sslcli import api
from sslcli.config import save_json
from sslcli.runs.compare import read_run, render
from tests.helpers import cli


def fixture_run(
    root: Path, method: str, *, loss0: float, knn: float, linear: float | None, wall: float,
    steps: int = 40, finished: bool = True,
) -> Path:  # fmt: skip
    """A run directory as the trainer (and ssl eval) leave it: resolved config.json,
    step/epoch/end records and eval events in metrics.jsonl."""
    d = root / f"{method}-run"
    d.mkdir(parents=True)
    _, run, _ = api.resolve_config(
        method,
        overrides={"backbone": {"name": "test_resnet"}, "data": {"image_size": 16},
                   "trainer": {"epochs": 4, "batch_size": 32, "out": str(d)}},
    )  # fmt: skip
    save_json(run, d / "config.json")
    t0 = 1_000_000.0
    recs: list[dict[str, Any]] = [
        {"event": "start", "method": method, "knn_random": 0.3, "time": t0},
    ]
    for s in range(1, steps + 1):
        recs.append({"step": s, "epoch": (s - 1) // 10, "lr": 0.1,
                     "loss": loss0 * math.exp(-s / 20), "images_per_s": 500.0})  # fmt: skip
        if s % 10 == 0:
            recs.append({"event": "epoch", "epoch": s // 10 - 1, "step": s,
                         "probe_top1": min(0.95, 0.4 + 0.1 * s / 10),
                         "time": t0 + wall * s / steps})  # fmt: skip
    if finished:
        recs.append({"event": "end", "step": steps, "loss": loss0 * math.exp(-steps / 20),
                     "knn_top1": knn, "knn_random": 0.3, "images_per_s": 480.0,
                     "wall_s": wall, "peak_mem_mb": 1234.5, "time": t0 + wall})  # fmt: skip
    if linear is not None:
        recs.append({"event": "eval", "protocol": "linear", "step": steps, "top1": linear,
                     "label_fraction": None, "data": "digits"})  # fmt: skip
        recs.append({"event": "eval", "protocol": "linear", "step": steps, "top1": 0.2,
                     "label_fraction": 0.01, "data": "digits"})  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut')
    return d


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [
        fixture_run(tmp_path, "simclr", loss0=6.0, knn=0.81, linear=0.9, wall=30.0),
        fixture_run(tmp_path, "byol", loss0=2.0, knn=0.77, linear=None, wall=45.0),
    ]


def test_read_run_summarises_config_and_metrics(runs: list[Path]) -> None:
    s = read_run(runs[0])
    assert (s.method, s.backbone, s.data, s.epochs, s.steps) == (
        "simclr", "test_resnet", "digits@16", 4, 40,
    )  # fmt: skip
    assert s.final_loss == pytest.approx(6.0 * math.exp(-2))
    assert (s.knn_top1, s.knn_random, s.images_per_s) == (0.81, 0.3, 480.0)
    assert (s.wall_s, s.peak_mem_mb) == (30.0, 1234.5)
    assert s.linear_top1 == 0.9  # the full-label eval, not the 1%-label one
    assert len(s.loss_curve) == 40 and s.finished
    kinds = {p["kind"] for p in s.acc_points}
    assert {"kNN (random)", "kNN", "online probe", "linear (eval)"} <= kinds
    assert "linear (1% labels) (eval)" in kinds
    b = read_run(runs[1])
    assert b.linear_top1 is None and b.method == "byol"


def test_unfinished_run_uses_its_last_logged_loss(tmp_path: Path) -> None:
    d = fixture_run(tmp_path, "simclr", loss0=3.0, knn=0.5, linear=None, wall=1, finished=False)
    s = read_run(d)
    assert not s.finished and s.final_loss == pytest.approx(3.0 * math.exp(-2))
    assert s.knn_top1 is None and s.steps == 40


def test_formats(runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["compare", *map(str, runs), "--format", "csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["method"] for r in rows] == ["simclr", "byol"]
    assert float(rows[0]["linear_top1"]) == 0.9 and rows[1]["linear_top1"] == ""
    assert float(rows[1]["knn_top1"]) == 0.77 and float(rows[0]["wall_s"]) == 30.0
    code, out, _ = cli(["compare", *map(str, runs), "--format", "json"], capsys)
    data = json.loads(out)
    assert data[0]["run_dir"] == str(runs[0]) and len(data[0]["evals"]) == 2
    code, out, _ = cli(["compare", *map(str, runs), "--format", "markdown"], capsys)
    lines = out.strip().splitlines()
    assert lines[0].startswith("| run | method |") and lines[1].startswith("|---")
    assert "| 90.0% |" in lines[2] and "| 81.0% |" in lines[2] and len(lines) == 4
    code, out, _ = cli(["compare", *map(str, runs)], capsys)
    assert code == 0 and "simclr" in out and "byol" in out and "90.0%" in out
    assert render([read_run(runs[0])], "csv").count("\n") == 1


def test_plot_writes_a_png_with_content(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import matplotlib.image as mpimg

    png = tmp_path / "plots" / "cmp.png"
    code, _, err = cli(["compare", *map(str, runs), "--plot", str(png), "-f", "csv"], capsys)
    assert code == 0, err
    assert png.is_file() and png.stat().st_size > 20_000
    img = mpimg.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 1000  # three panels side by side
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # curves, axes and text, not a blank canvas
    # Coloured pixels (the runs' curves), not only black text on white.
    saturation = rgb.max(-1) - rgb.min(-1)
    assert (saturation > 0.3).mean() > 0.002


def test_plot_without_matplotlib_is_one_line(
    runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    code, _, err = cli(["compare", *map(str, runs), "--plot", str(tmp_path / "x.png")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "matplotlib" in lines[0]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["compare", "/nonexistent/run"], "run directory not found"),
        (["compare", "{tmp}"], "no config.json"),
        (["compare", "{run}", "--format", "xml"], "--format 'xml'"),
        (["compare", "{run}", "--epochs", "3"], "only apply with --methods"),
        (["compare", "--methods", " , "], "at least one method"),
    ],
)
def test_errors_are_one_line(
    argv: list[str], needle: str, runs: list[Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    subst = {"{tmp}": str(empty), "{run}": str(runs[0])}
    code, out, err = cli([subst.get(a, a) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ssl: error: "), err
    assert needle in lines[0] and out == ""


def test_compare_trains_methods_alike_and_reports_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two steps of a real method plus a missing one: the table has the trained run, the
    missing one is a one-line error and the exit code says something failed."""
    root = tmp_path / "cmp"
    argv = ["compare", "--methods", "simclr,nosuchmethod", "--epochs", "1", "--max-steps", "2",
            "--backbone", "test_resnet", "--image-size", "16", "--batch-size", "16",
            "--seed", "3", "--out", str(root), "--set", "trainer.eval_knn=false",
            "--format", "json"]  # fmt: skip
    code, out, err = cli(argv, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("ssl: error: 1 of 2 methods failed")
    (row,) = json.loads(out)
    assert row["method"] == "simclr" and row["steps"] == 2 and row["final_loss"] is not None
    cfg = json.loads((root / "simclr" / "config.json").read_text())
    assert cfg["trainer"]["seed"] == 3 and cfg["trainer"]["epochs"] == 1
    assert cfg["data"]["image_size"] == 16 and cfg["backbone"]["name"] == "test_resnet"


@pytest.mark.slow
def test_a_real_comparison_learns(tmp_path: Path) -> None:
    """A few epochs of SimCLR on digits with resnet18: the table's kNN beats the random
    initialisation, and the linear probe (run by compare) is far above chance."""
    from sslcli.runs.compare import compare

    t0 = time.perf_counter()
    res = compare(
        methods=["simclr"], data="digits", epochs=5, backbone="resnet18", batch_size=128,
        seed=0, out=tmp_path, sets=["method.temperature=0.5", "method.blur_p=0"],
    )  # fmt: skip
    (s,) = res.summaries
    print(f"simclr resnet18 digits 5 ep: kNN {s.knn_top1:.3f} (random {s.knn_random:.3f}), "
          f"linear {s.linear_top1:.3f}, {time.perf_counter() - t0:.0f} s")  # fmt: skip
    assert not res.failures
    assert s.knn_top1 is not None and s.knn_random is not None and s.knn_top1 > s.knn_random
    assert s.linear_top1 is not None and s.linear_top1 > 0.5
