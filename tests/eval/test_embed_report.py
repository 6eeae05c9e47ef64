"""``ssl embed`` (rows equal to ``ssl eval``'s features, index order, streaming, every file
format, neighbours against brute force) and ``ssl report`` / ``ssl compare --report`` (every
section present; opened in headless Chromium without console errors)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sslcli import api
from sslcli.cli.app import main
from sslcli.data.badfiles import UnreadableImageWarning
from sslcli.data.datasets import open_dataset
from sslcli.eval import cache as feature_cache
from sslcli.eval import embeddings as embeddings_mod
from sslcli.eval.embed import embed
from sslcli.eval.embeddings import Embeddings, load_embeddings
from sslcli.eval.neighbors import nearest
from sslcli.report.compare import COMPARE_SECTIONS
from sslcli.report.gather import pick_queries
from sslcli.report.run import SECTIONS, write_report
from sslcli.runs.targets import load_target
from sslcli.runtime import pick_device
from tests.helpers import cli

DIGITS_TRAIN, DIGITS_TEST = 1438, 359


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One short real training run on digits, shared by every test here, plus a recorded
    ``ssl eval knn`` (which also fills the feature cache with eval's own features)."""
    out = tmp_path_factory.mktemp("embed") / "simclr-run"
    api.train("simclr", overrides={
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": "digits", "image_size": 16},
        "trainer": {"epochs": 1, "batch_size": 32, "max_steps": 6, "log_every": 2,
                    "eval_knn": False, "out": str(out)},
    })  # fmt: skip
    assert main(["eval", "knn", str(out), "--k", "20", "--json"]) == 0
    return out


def similarity_matrix(x: np.ndarray) -> np.ndarray:
    v = x.astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    sim = v @ v.T
    np.fill_diagonal(sim, -np.inf)
    return sim


def brute_force(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The K most cosine-similar other rows of every row, from the full similarity matrix."""
    sim = similarity_matrix(x)
    idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(sim, idx, 1)


# ---------------------------------------------------------------------------------------------
# ssl embed
# ---------------------------------------------------------------------------------------------


def test_embeddings_file_equals_eval_features_in_dataset_order(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t = load_target(run_dir)
    dev = pick_device("auto")
    train = open_dataset("digits", "train", t.load_size, labelled_only=True)
    cached = feature_cache.features(t, train, device=dev, dtype=None)
    assert cached.status == "hit"  # exactly what `ssl eval knn` computed and stored
    out = tmp_path / "train.safetensors"
    # 100 images per batch: 15 batches stream through the memory map.
    code, stdout, err = cli(["embed", str(run_dir), "--out", str(out), "--batch-size", "100"],
                            capsys)  # fmt: skip
    assert code == 0, err
    assert f"wrote {DIGITS_TRAIN} embeddings" in stdout
    e = load_embeddings(out)
    assert e.embeddings.shape == cached.features.shape
    np.testing.assert_allclose(e.embeddings, cached.features.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(e.index, np.arange(DIGITS_TRAIN))
    np.testing.assert_array_equal(e.labels, cached.labels.numpy())
    assert e.classes == [str(c) for c in range(10)]
    assert e.meta["data"] == "digits" and e.meta["split"] == "train"


def test_streaming_in_batches_matches_one_batch_and_reports_progress(run_dir: Path) -> None:
    calls: list[tuple[int, int]] = []
    small = embed(run_dir, split="test", batch_size=50,
                  progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    whole = embed(run_dir, split="test", batch_size=DIGITS_TEST)
    assert len(calls) == -(-DIGITS_TEST // 50)  # one call per batch
    assert [d for d, _ in calls] == sorted({d for d, _ in calls}) and calls[-1] == (
        DIGITS_TEST, DIGITS_TEST,
    )  # fmt: skip
    np.testing.assert_allclose(small.embeddings, whole.embeddings, rtol=1e-5, atol=1e-5)
    assert isinstance(small, Embeddings) and small.embeddings.dtype == np.float32


@pytest.mark.parametrize("ext", [".safetensors", ".npz", ".parquet"])
def test_every_format_round_trips(
    run_dir: Path, tmp_path: Path, ext: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ext == ".parquet":
        pytest.importorskip("pyarrow", reason="pyarrow is not installed: .parquet is optional")
    kw: dict[str, Any] = dict(split="test", normalize=True, dtype="float16", neighbors=4)
    mem = embed(run_dir, **kw)
    out = tmp_path / f"e{ext}"
    # Write 8 KB at a time: every array crosses many chunk boundaries on its way to disk.
    monkeypatch.setattr(embeddings_mod, "CHUNK_BYTES", 8 << 10)
    disk = embed(run_dir, out=out, **kw)
    back = load_embeddings(out)
    for e in (disk, back):
        assert e.embeddings.dtype == np.float16 and e.embeddings.shape == mem.embeddings.shape
        np.testing.assert_array_equal(e.embeddings, mem.embeddings)
        np.testing.assert_array_equal(e.index, mem.index)
        np.testing.assert_array_equal(e.labels, mem.labels)
        np.testing.assert_array_equal(e.neighbors, mem.neighbors)
        np.testing.assert_array_equal(e.similarities, mem.similarities)
        assert e.classes == mem.classes and e.meta["normalize"] is True
    # Normalised before the cast: unit rows to float16 precision.
    norms = np.linalg.norm(back.embeddings.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    # Each file is readable by its format's own reader, without sslcli.
    if ext == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(out), framework="np") as f:
            np.testing.assert_array_equal(f.get_tensor("embeddings"), mem.embeddings)
            index = json.loads(f.metadata()["sslcli_index"])
        assert index == [int(i) for i in mem.index]
    elif ext == ".npz":
        with np.load(out, allow_pickle=False) as z:
            np.testing.assert_array_equal(z["embeddings"], mem.embeddings)
            np.testing.assert_array_equal(z["rows"], mem.index)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(str(out))
        assert table.num_rows == DIGITS_TEST and table.column("row").to_pylist()[:3] == [0, 1, 2]


def test_neighbours_match_brute_force(run_dir: Path) -> None:
    e = embed(run_dir, split="test", neighbors=5)
    full = similarity_matrix(e.embeddings)
    idx, sim = brute_force(e.embeddings, 5)
    assert e.neighbors is not None and e.similarities is not None
    # The K largest similarities, and each listed neighbour really has its listed similarity
    # (a barely trained encoder has near-ties that float32 and float64 may order apart).
    np.testing.assert_allclose(e.similarities, sim, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, e.neighbors, 1), e.similarities,
                               atol=1e-5)  # fmt: skip
    assert (e.neighbors == idx).mean() > 0.95
    assert not (e.neighbors == np.arange(len(e))[:, None]).any()  # never itself


def test_blocked_nearest_equals_brute_force_across_many_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(203, 7, generator=g).numpy()
    want_i, want_s = brute_force(x, 6)
    # A block of 256 elements: 16 references x 16 queries at a time, 13 x 13 blocks.
    got_i, got_s = nearest(x, x, 6, exclude_self=True, block=256)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_allclose(got_s, want_s, atol=1e-5)
    q = np.array([5, 100, 202])
    sub_i, _ = nearest(x[q], x, 6, self_rows=q, block=256)
    np.testing.assert_array_equal(sub_i, want_i[q])


def _image_folder(root: Path) -> list[str]:
    from PIL import Image

    rng = np.random.RandomState(1)
    rel = []
    for c, colour in enumerate(((220, 30, 30), (30, 30, 220))):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(4):
            # Noise around a class colour: enough entropy for a body worth cutting in half.
            px = np.clip(rng.normal(colour, 40, size=(32, 40 + i, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"img{i}.jpg", quality=90)
            rel.append(f"class{c}/img{i}.jpg")
    return rel


def test_folder_index_is_relative_paths_and_corrupt_images_are_skipped(
    run_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "photos"
    rel = _image_folder(data)
    # Not an image at all: dropped when the folder is opened.
    (data / "class1" / "junk.jpg").write_text("<html>not a jpeg</html>")
    # A valid header and a cut body: found only when decoded, and then replaced by the
    # dataset with the next image, which embed must not keep twice.
    raw = (data / "class0" / "img1.jpg").read_bytes()
    (data / "class0" / "img1.jpg").write_bytes(raw[: len(raw) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnreadableImageWarning)
        e = embed(run_dir, data=str(data), batch_size=3, out=tmp_path / "p.npz",
                  max_bad_fraction=0.3)  # fmt: skip
    kept = [p for p in rel if p != "class0/img1.jpg"]
    assert e.index == kept
    assert e.skipped == ["class1/junk.jpg", "class0/img1.jpg"]
    np.testing.assert_array_equal(e.labels, [0, 0, 0, 1, 1, 1, 1])
    # Each row is that file's own embedding: embed each file alone and compare.
    for k, path in enumerate(kept):
        solo = tmp_path / f"solo{k}" / "x"
        solo.mkdir(parents=True)
        shutil.copy(data / path, solo / "x.jpg")
        one = embed(run_dir, data=str(solo.parent))
        np.testing.assert_allclose(e.embeddings[k], one.embeddings[0], rtol=1e-5, atol=1e-5)
    assert len({e.embeddings[k].tobytes() for k in range(len(kept))}) == len(kept)


def _one_error(err: str, msg: str) -> bool:
    """Exactly one error line, the last one, saying ``msg`` (notes may come before it)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("ssl: error:")]
    return len(errors) == 1 and lines[-1] == errors[0] and msg in errors[0]


def test_bad_embed_options_are_one_line_errors(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    for argv, msg in (
        (["--out", str(tmp_path / "x.csv")], "extension must be one of"),
        (["--out", str(tmp_path / "x.npz"), "--dtype", "int8"], "--dtype 'int8'"),
        (["--out", str(tmp_path / "x.npz"), "--split", "test", "--neighbors", "400"],
         "at most 358 neighbours"),
    ):  # fmt: skip
        code, _, err = cli(["embed", str(run_dir), *argv], capsys)
        assert code == 2 and _one_error(err, msg), err
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    code, _, err = cli(["embed", str(run_dir), "--out", str(tmp_path / "x.parquet")], capsys)
    assert code == 2 and _one_error(err, "needs pyarrow"), err
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_python_api_embed_returns_arrays(run_dir: Path) -> None:
    import sslcli

    e = sslcli.embed(run_dir, split="test", neighbors=2)
    assert isinstance(e.embeddings, np.ndarray) and e.embeddings.shape[0] == DIGITS_TEST
    assert e.neighbors is not None and e.neighbors.shape == (DIGITS_TEST, 2)


# ---------------------------------------------------------------------------------------------
# ssl report
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_html(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    return out


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def test_report_has_every_section_with_its_content(report_html: Path, run_dir: Path) -> None:
    html = report_html.read_text()
    for sid, head in SECTIONS:
        assert head in _section(html, sid)
    settings = _section(html, "settings")
    assert "simclr" in settings and "test_resnet" in settings and "images/s" in settings
    assert "backbone.name" in settings and "resnet18" in settings  # differs from default
    assert "plugin." not in settings  # the run's plugin record is not a setting
    curves = _section(html, "curves")
    for title in ("training loss", "learning rate", "embedding std"):
        assert title in curves
    assert curves.count("<polyline") >= 3  # loss, lr, emb_std logged every 2 steps
    evals = _section(html, "evaluations")
    assert "knn" in evals and "k=20" in evals
    assert _section(html, "views").count("data:image/png;base64,") == 1
    nn = _section(html, "neighbours")
    assert nn.count('class="query') == 8
    assert nn.count("data:image/png;base64,") == 8 * 9
    assert "<svg" in _section(html, "map") and "PCA" in _section(html, "map")
    # Self-contained: nothing is fetched (the SVG namespace is a name, not a request).
    assert not re.search(r'(src|href)="(?!data:|#)', html)
    assert "http" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_report_queries_are_fixed_and_cover_the_classes() -> None:
    labels = np.repeat(np.arange(10), 30)
    q = pick_queries(labels, 8)
    assert len(set(labels[q].tolist())) == 8
    np.testing.assert_array_equal(q, pick_queries(labels, 8))


def test_report_tsne_and_bad_options(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = write_report(run_dir, tmp_path / "r.html", map_method="tsne", map_points=60,
                       queries=2, top=3)  # fmt: skip
    html = out.read_text()
    assert "t-SNE" in _section(html, "map") and "60 test images" in html
    assert _section(html, "neighbours").count('class="query') == 2
    code, _, err = cli(["report", str(run_dir), "--out", str(tmp_path / "x.html"),
                        "--map", "umap"], capsys)  # fmt: skip
    assert code == 2 and _one_error(err, "--map 'umap'"), err
    code, _, err = cli(["report", str(tmp_path), "--out", str(tmp_path / "x.html")], capsys)
    assert code == 2 and _one_error(err, "not a run directory"), err


def test_views_section_draws_the_runs_views_with_its_seed(
    monkeypatch: Any, run_dir: Path
) -> None:
    import sslcli.preview
    from sslcli.config import RunConfig
    from sslcli.report.sections import views_section

    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    seen: dict[str, Any] = {}

    def views_grid_png(config: RunConfig, n: int = 8, seed: int = 0) -> bytes:
        seen.update(config=config, n=n, seed=seed)
        return png

    monkeypatch.setattr(sslcli.preview, "views_grid_png", views_grid_png)
    saved = json.loads((run_dir / "config.json").read_text())
    saved["trainer"]["seed"] = 7
    html = views_section(saved)
    assert base64.b64encode(png).decode() in html
    assert seen["n"] == 8 and seen["seed"] == 7
    settings = {k: v for k, v in saved.items() if k != "plugin"}  # a record, not a setting
    assert seen["config"].to_json_dict() == settings  # the run's settings, round-tripped


def test_compare_report_puts_runs_side_by_side(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("eval-cache"))
    cfg = json.loads((other / "config.json").read_text())
    cfg["trainer"]["batch_size"] = 16
    (other / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "cmp.html"
    code, _, err = cli(["compare", str(run_dir), str(other), "--report", str(out),
                        "-f", "json"], capsys)  # fmt: skip
    assert code == 0, err
    html = out.read_text()
    for sid, head in COMPARE_SECTIONS:
        assert head in _section(html, sid)
    assert "trainer.batch_size" in _section(html, "settings")
    assert "trainer.epochs" not in _section(html, "settings")  # the same in both
    assert _section(html, "curves").count("<polyline") >= 2 * 3  # two runs per chart


# ---------------------------------------------------------------------------------------------
# The report in a real browser
# ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4 of the
    browser: no port, no network, no extra package), collecting every console error, page
    exception and error log entry of the page it loads."""

    def __init__(self, exe: str, profile: Path) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Move the child's ends above 10 so that placing them on 3 and 4 cannot clobber them.
        hi_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        hi_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)

        def place() -> None:
            os.dup2(hi_r, 3)
            os.dup2(hi_w, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}"],
            preexec_fn=place, close_fds=False, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for fd in (hi_r, hi_w):
            os.close(fd)
        self.w, self.r = to_chrome_w, from_chrome_r
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _read(self, timeout: float = 60.0) -> dict[str, Any]:
        while b"\0" not in self.buf:
            ready, _, _ = select.select([self.r], [], [], timeout)
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def send(self, method: str, session: bool = True, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            m = self._read()
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read())

    def open(self, url: str, width: int = 1280) -> None:
        target = self.send("Target.createTarget", session=False, url="about:blank")
        attached = self.send("Target.attachToTarget", session=False,
                             targetId=target["targetId"], flatten=True)  # fmt: skip
        self.session = attached["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=900,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        self.send("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif m == "Runtime.exceptionThrown":
                out.append(str(p.get("exceptionDetails", {}).get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                out.append(str(p["entry"].get("text")))
        return out

    def evaluate(self, js: str) -> Any:
        r = self.send("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        return r["result"].get("value")

    def screenshot(self, path: Path) -> None:
        h = int(self.evaluate("document.documentElement.scrollHeight"))
        self.send("Emulation.setDeviceMetricsOverride", width=1280, height=h,
                  deviceScaleFactor=1, mobile=False)  # fmt: skip
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", session=False)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.r, self.w):
            os.close(fd)


SECTION_CHECK = """(() => [...document.querySelectorAll('section')].map(s => ({
  id: s.id,
  height: s.getBoundingClientRect().height,
  visible: getComputedStyle(s).display !== 'none' && getComputedStyle(s).visibility !== 'hidden',
  images: s.querySelectorAll('img').length,
  broken: [...s.querySelectorAll('img')].filter(i => !i.complete || i.naturalWidth === 0).length,
  svgs: [...s.querySelectorAll('svg')].filter(v => v.getBoundingClientRect().width > 0).length,
})))()"""


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium); "
    "the report is checked in a real browser only where it is",
)
def test_report_renders_in_headless_chromium_without_errors(
    report_html: Path, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    b = Browser(CHROMIUM, tmp_path / "profile")
    try:
        # The check can fail: a page that logs an error and loads a missing image is caught.
        bad = tmp_path / "bad.html"
        bad.write_text('<script>console.error("broken")</script><img src="missing.png">')
        b.open(bad.as_uri())
        assert any("broken" in e for e in b.errors())
        b.events.clear()
        b.open(report_html.as_uri())
        sections = {s["id"]: s for s in b.evaluate(SECTION_CHECK)}
        shot = tmp_path / "report.png"
        b.screenshot(shot)
        errors = b.errors()
    finally:
        b.close()
    assert errors == []
    assert set(sections) == {sid for sid, _ in SECTIONS}
    for sid, s in sections.items():
        assert s["visible"] and s["height"] > 40, sid
        assert s["broken"] == 0, f"{sid}: {s['broken']} images did not decode"
    assert sections["neighbours"]["images"] == 8 * 9
    assert sections["curves"]["svgs"] >= 4 and sections["map"]["svgs"] == 1
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == 1280 and height > 1500  # the whole page, every section
