"""``ssl report``: one self-contained HTML page about a run (and ``ssl compare --report``).

Everything is inline — charts are SVG written by :mod:`sslcli.svgplot`, images are PNG
data URIs, the style sheet is in the page and there is no script — so the file opens
offline, can be mailed, and cannot fetch anything. Sections of a run's report:

* settings: method, backbone, data, the recipe values that differ from the method's
  defaults, run time, images/s, peak memory;
* training curves from ``metrics.jsonl`` (loss, lr, ``emb_std`` — collapse shows as a fall
  — and every other logged scalar) and the accuracies recorded (kNN before/after
  training, online probe per epoch, every ``ssl eval`` result);
* the evaluations table (every ``ssl eval`` recorded for the run);
* a grid of the views the run trained on;
* nearest neighbours: fixed query images from the eval split and the top training images
  the encoder retrieves for each, with their similarity and labels;
* a 2-D map (PCA, or t-SNE on request) of the eval split's embeddings coloured by label.

Features come from :func:`sslcli.eval.cache.features` (the same features, and the same
cache, as ``ssl eval``), neighbours from :func:`sslcli.eval.neighbors.nearest`.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from sslcli import svgplot
from sslcli.config import flatten_dotted
from sslcli.errors import DataError, ReportError, SSLError, TargetError
from sslcli.runs.compare import COLUMNS, RunSummary, _records, fmt_value, read_run
from sslcli.runs.targets import is_export_dir, latest_run, run_dir_of

SECTIONS: tuple[tuple[str, str], ...] = (
    ("settings", "Settings"),
    ("curves", "Training curves"),
    ("evaluations", "Evaluations"),
    ("views", "Views the run trained on"),
    ("neighbours", "Nearest neighbours"),
    ("map", "2-D map of the embeddings"),
)
"""(id, heading) of a run report's sections, in order."""
COMPARE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("runs", "Runs"),
    ("settings", "Settings that differ"),
    ("curves", "Training curves"),
    ("evaluations", "Evaluations"),
)
MAP_METHODS = ("pca", "tsne")
FIRST_CURVES = ("loss", "lr", "emb_std")
"""Logged scalars charted first; every other numeric one follows."""
NOT_CURVES = {"step", "epoch", "time"}
CURVE_HELP = {
    "loss": "training loss",
    "lr": "learning rate",
    "emb_std": "embedding std (a fall towards 0 is collapse)",
    "images_per_s": "images/s",
}


def _quiet(msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------


def resolve_run(run: str | Path | None) -> Path:
    """The run directory of ``run`` (a run, or a checkpoint inside one; None: the latest)."""
    if run is None:
        return latest_run()
    p = Path(run)
    if not p.exists():
        raise TargetError(f"run not found: {p}")
    if is_export_dir(p):
        raise ReportError(
            f"{p} is an exported model, which keeps no training record: give its run directory"
        )
    if p.is_file() or p.name == "checkpoints":
        d = run_dir_of(p if p.is_file() else p / "last.safetensors")
        if d is None:
            raise ReportError(f"{p} does not lie in a run directory")
        return d
    if not (p / "config.json").is_file():
        raise ReportError(f"{p} is not a run directory (no config.json)")
    return p


def differences_from_defaults(config: dict[str, Any]) -> list[tuple[str, Any, Any]] | None:
    """``(dotted key, value, default)`` where the run's config differs from what the
    method's defaults alone resolve to (None when the method is not installed)."""
    from sslcli import registry
    from sslcli.config import RUN_RECORDS, resolve

    m = config.get("method")
    name = m.get("name") if isinstance(m, dict) else m
    if not isinstance(name, str) or not name:
        return None
    try:
        run, _ = resolve(registry.load(name), [])
    except SSLError:
        return None
    settings = {k: v for k, v in config.items() if k not in RUN_RECORDS}  # not settings
    ours, base = flatten_dotted(settings), flatten_dotted(run.to_json_dict())
    skip = {"trainer.out"}  # always differs (the run's own directory), says nothing
    return [
        (k, ours.get(k), base.get(k))
        for k in sorted(set(ours) | set(base))
        if k not in skip and ours.get(k) != base.get(k)
    ]


def step_curves(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Every numeric scalar of the step records, by name: [(step, value)] sorted by step
    (a resumed run's repeated steps keep their latest value)."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        if "event" in r or "step" not in r:
            continue
        step = int(r["step"])
        for k, v in r.items():
            if k in NOT_CURVES or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if np.isfinite(v):
                by_key.setdefault(k, {})[step] = float(v)
    order = [k for k in FIRST_CURVES if k in by_key] + sorted(
        k for k in by_key if k not in FIRST_CURVES
    )
    return {k: sorted(by_key[k].items()) for k in order}


# ---------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c9cfdb}nav{padding:8px 28px;background:#e9ecf1}
nav a{margin-right:16px;color:#24559e;text-decoration:none}
section{background:#fff;margin:16px 28px;padding:14px 20px;border-radius:8px;
box-shadow:0 1px 3px rgba(0,0,0,.08)}section h2{margin:0 0 10px;font-size:18px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{padding:3px 10px;
border-bottom:1px solid #e3e6eb;text-align:left;vertical-align:top}th{background:#f0f2f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#6b7280;fill:#6b7280}
.note{color:#6b7280;font-style:italic}.charts{display:flex;flex-wrap:wrap;gap:10px}
.kv{display:flex;flex-wrap:wrap;gap:24px}
svg.chart{background:#fff}svg .title{font-size:13px;font-weight:600;fill:#1d2330}
svg .tick{font-size:10px;fill:#4b5563}svg .label,svg .legend{font-size:11px;fill:#1d2330}
svg .plot{fill:#fbfbfc;stroke:#c8ccd3}svg .grid{stroke:#e5e7eb}svg .axis{stroke:#9ca3af}
.nn{border-collapse:separate;border-spacing:4px}.nn td{border:0;padding:2px;text-align:center;
font-size:11px}.nn img{width:72px;height:72px;display:block;margin:auto;
border:3px solid #d1d5db;border-radius:3px}.nn img.pix{image-rendering:pixelated}
.nn img.same{border-color:#16a34a}.nn img.other{border-color:#dc2626}
.nn img.query{border-color:#1d2330}.nn td.q{padding-right:14px}
.views img{max-width:100%;image-rendering:pixelated}
"""


def _page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    nav = "".join(f'<a href="#{sid}">{escape(head)}</a>' for sid, head, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{escape(head)}</h2>{html}</section>'
        for sid, head, html in sections
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>{escape(title)}</h1><p>{escape(subtitle)}</p></header>"
        f"<nav>{nav}</nav><main>{body}</main></body></html>\n"
    )


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] = ()
) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            cls = ' class="num"' if i < len(numeric) and numeric[i] else ""
            cells.append(f"<td{cls}>{escape(_text(v))}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _pct(v: Any) -> str:
    return "-" if not isinstance(v, (int, float)) else f"{100 * v:.2f}%"


def png_data_uri(image: Any) -> str:
    """A uint8 [3, H, W] (or [1, H, W]) tensor/array as a ``data:image/png`` URI."""
    from PIL import Image

    a = np.asarray(image.cpu() if hasattr(image, "cpu") else image, dtype=np.uint8)
    a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---------------------------------------------------------------------------------------------
# Sections of a run report
# ---------------------------------------------------------------------------------------------


def _settings_section(s: RunSummary, config: dict[str, Any]) -> str:
    data = config.get("data", {})
    trainer = config.get("trainer", {})
    head = [
        ("method", s.method),
        ("backbone", s.backbone),
        ("data", f"{data.get('dataset')} at {data.get('image_size')} px"),
        ("epochs / steps", f"{s.epochs} / {s.steps}"),
        ("batch size", trainer.get("batch_size")),
        ("finished", "yes" if s.finished else "no (no end record)"),
    ]
    perf = [
        ("run time", "-" if s.wall_s is None else f"{s.wall_s:.1f} s"),
        ("images/s", fmt_value("images_per_s", s.images_per_s)),
        ("peak memory", "-" if s.peak_mem_mb is None else f"{s.peak_mem_mb:.0f} MB"),
        ("final loss", fmt_value("final_loss", s.final_loss)),
        ("kNN top-1 (random init → trained)",
         f"{fmt_value('knn_top1', s.knn_random)} → {fmt_value('knn_top1', s.knn_top1)}"),
    ]  # fmt: skip
    html = (
        '<div class="kv">'
        + _table(["run", ""], head)
        + _table(["measured", ""], perf)
        + "</div>"
    )
    diffs = differences_from_defaults(config)
    if diffs is None:
        html += _note("the method is not installed here: its defaults are unknown")
    elif not diffs:
        html += _note("every recipe value is the method's default")
    else:
        html += "<h3>Recipe values that differ from the method's defaults</h3>"
        html += _table(["setting", "this run", "default"], diffs)
    return html


def _accuracy_series(s: RunSummary, label: str = "") -> list[svgplot.Series]:
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for p in s.acc_points:
        by_kind.setdefault(p["kind"], []).append((float(p["step"]), float(p["value"])))
    return [
        svgplot.Series(f"{label}{kind}", pts, color=svgplot.color(i), dashed="eval" in kind)
        for i, (kind, pts) in enumerate(by_kind.items())
    ]


def _curves_section(s: RunSummary, records: Sequence[dict[str, Any]]) -> str:
    charts = []
    for key, pts in step_curves(records).items():
        charts.append(svgplot.line_chart(
            [svgplot.Series(key, [(float(x), y) for x, y in pts])],
            title=CURVE_HELP.get(key, key), ylabel=key,
        ))  # fmt: skip
    charts.append(svgplot.line_chart(
        _accuracy_series(s), title="accuracy (kNN, online probe, ssl eval)", ylabel="top-1 (%)",
        y_percent=True,
    ))  # fmt: skip
    html = f'<div class="charts">{"".join(charts)}</div>'
    if not step_curves(records):
        html += _note("no step records in metrics.jsonl yet")
    return html


def _evals_rows(evals: Sequence[dict[str, Any]], run: str | None = None) -> list[list[Any]]:
    rows = []
    for r in evals:
        when = r.get("time")
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(when)) if when else "-"
        frac = r.get("label_fraction")
        chosen = ""
        if r.get("protocol") == "knn":
            chosen = f"k={r.get('k')}, T={r.get('temperature')}"
        elif r.get("lr") is not None:
            chosen = f"lr {r.get('lr')}" + (f", wd {r['wd']}" if r.get("wd") is not None else "")
        row = [stamp, r.get("protocol"), r.get("step"), r.get("which") or "default",
               r.get("data"), f"{100 * frac:g}%" if frac else "all", _pct(r.get("top1")),
               _pct(r.get("top5")), chosen]  # fmt: skip
        rows.append(([run] if run is not None else []) + row)
    return rows


EVAL_HEADERS = ["time (UTC)", "protocol", "step", "encoder", "data", "labels", "top-1", "top-5",
                "chosen"]  # fmt: skip


def _evals_section(s: RunSummary) -> str:
    if not s.evals:
        return _note(
            f"no ssl eval result recorded for this run yet (ssl eval knn|linear|finetune "
            f"{s.run_dir})"
        )
    return _table(EVAL_HEADERS, _evals_rows(s.evals))


def _views_section(run_config: dict[str, Any]) -> str:
    """The grid of training views (as ``ssl views`` draws them) for the run's own settings
    and seed; a note instead when the run's data cannot be read any more."""
    from pydantic import ValidationError

    from sslcli.config import RunConfig
    from sslcli.preview import views_grid_png

    try:
        run = RunConfig.from_json_dict(run_config)
        png = views_grid_png(run, n=8, seed=run.trainer.seed)
    except (SSLError, ValidationError) as e:
        return _note(f"views preview unavailable: {str(e).splitlines()[0]}")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return f'<div class="views"><img src="{uri}" alt="views the run trained on"></div>'


def pick_queries(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` fixed rows: a seeded order, taken round-robin over the classes so that as many
    classes as possible appear (unlabelled data: the first ``n`` of the seeded order)."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(labels))
    classes = sorted({int(c) for c in labels[order] if c >= 0})
    if not classes:
        return np.sort(order[:n])
    queues = {c: [int(i) for i in order if labels[i] == c] for c in classes}
    picked: list[int] = []
    while len(picked) < min(n, len(labels)) and any(queues.values()):
        for c in classes:
            if queues[c] and len(picked) < n:
                picked.append(queues[c].pop(0))
    return np.asarray(picked, dtype=np.int64)


def _class_name(classes: list[str] | None, y: int) -> str:
    if y < 0:
        return "unlabelled"
    return classes[y] if classes and y < len(classes) else str(y)


def _thumb(image: Any, cls: str, title: str) -> str:
    pix = " pix" if int(image.shape[-1]) < 72 else ""
    return f'<img class="{cls}{pix}" src="{png_data_uri(image)}" alt="{escape(title)}" ' \
        f'title="{escape(title)}">'  # fmt: skip


def _neighbours_html(
    queries: Any, refs: Any, q_rows: np.ndarray, nb: np.ndarray, sims: np.ndarray,
    q_split: str,
) -> str:  # fmt: skip
    rows = []
    for qi, r in enumerate(q_rows):
        qx, qy, _ = queries[int(r)]
        q_name = _class_name(queries.classes, int(qy))
        cells = [f'<td class="q">{_thumb(qx, "query", f"query {q_split}[{r}]")}'
                 f"<b>query</b><br>{escape(q_name)}</td>"]  # fmt: skip
        for j, s in zip(nb[qi], sims[qi], strict=True):
            rx, ry, _ = refs[int(j)]
            known = int(qy) >= 0 and int(ry) >= 0
            cls = ("same" if int(ry) == int(qy) else "other") if known else ""
            name = _class_name(refs.classes, int(ry))
            cells.append(f"<td>{_thumb(rx, cls, f'train[{j}] {name} {s:.3f}')}"
                         f"{s:.3f}<br>{escape(name)}</td>")  # fmt: skip
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<table class="nn">{"".join(rows)}</table>'


def _encoder_sections(
    run_dir: Path,
    *,
    data: str | None,
    which: str | None,
    queries: int,
    top: int,
    map_method: str,
    map_points: int,
    device: str,
    batch_size: int,
    num_workers: int,
    say: Callable[[str], None],
) -> tuple[str, str]:
    """(neighbours html, map html): the parts that need the trained encoder."""
    from sslcli.runs.targets import load_target
    from sslcli.runtime import pick_device

    try:
        t = load_target(run_dir)
    except SSLError as e:
        msg = f"no trained encoder to show: {e}"
        return _note(msg), _note(msg)
    t.check_which(which)
    dev = pick_device(device)
    t.to(dev)
    spec = data or t.dataset
    if spec is None:
        msg = "the run does not record its data: give --data"
        return _note(msg), _note(msg)
    try:
        return _neighbours_and_map(
            t, spec, which=which, queries=queries, top=top, map_method=map_method,
            map_points=map_points, device=dev, batch_size=batch_size, num_workers=num_workers,
            say=say,
        )  # fmt: skip
    except SSLError as e:
        # Moved or broken data costs these two sections, not the whole report.
        say(f"report: no neighbours or map: {e}")
        msg = f"unavailable: {e}"
        return _note(msg), _note(msg)


def _neighbours_and_map(
    t: Any,
    spec: str,
    *,
    which: str | None,
    queries: int,
    top: int,
    map_method: str,
    map_points: int,
    device: Any,
    batch_size: int,
    num_workers: int,
    say: Callable[[str], None],
) -> tuple[str, str]:
    from sslcli.data.datasets import available_splits, open_dataset
    from sslcli.eval import cache as feature_cache
    from sslcli.eval.neighbors import nearest
    from sslcli.runtime import pick_dtype

    dev = device
    load_size = t.load_size if spec == t.dataset else t.image_size

    max_bad = float(t.config.get("data", {}).get("max_bad_fraction") or 0.01)

    def open_split(split: str) -> Any:
        # The labelled rows, as ssl eval opens them (so its cached features are reused);
        # all rows of data without labels.
        kw: dict[str, Any] = {"max_bad_fraction": max_bad}
        try:
            return open_dataset(spec, split, load_size, labelled_only=True, **kw)  # type: ignore[arg-type]
        except DataError as e:
            if "no labelled images" not in str(e):
                raise
            return open_dataset(spec, split, load_size, **kw)  # type: ignore[arg-type]

    def feats(ds: Any) -> np.ndarray:
        f = feature_cache.features(
            t, ds, which=which, device=dev, dtype=pick_dtype("auto", dev),
            batch_size=batch_size, num_workers=num_workers,
        )  # fmt: skip
        return f.features.numpy()

    say(f"report: features of {spec} (the ssl eval feature cache is reused)")
    train = open_split("train")
    q_split = "test" if "test" in available_splits(spec) else "train"
    test = open_split("test") if q_split == "test" else train
    f_train = feats(train)
    f_query = feats(test) if test is not train else f_train
    q_labels = test.labels.numpy()
    q_rows = pick_queries(q_labels, queries)
    k = min(top, len(train) - (1 if test is train else 0))
    nb, sims = nearest(
        f_query[q_rows], f_train, k, device=dev, self_rows=q_rows if test is train else None
    )
    where = "the test split" if q_split == "test" else "the training split (no test split)"
    frames = (
        "; a green frame: same label as the query, red: another label"
        if bool((q_labels >= 0).any())
        else ""
    )
    nn_html = (
        f"<p>{len(q_rows)} fixed query images from {escape(where)} and the {k} training images "
        f"with the most similar embeddings (cosine similarity under each){frames}.</p>"
        + _neighbours_html(test, train, q_rows, nb, sims, q_split)
    )
    return nn_html, _map_html(f_query, q_labels, test.classes, map_method, map_points, q_split)


def _map_html(
    feats: np.ndarray, labels: np.ndarray, classes: list[str] | None, method: str,
    points: int, split: str,
) -> str:  # fmt: skip
    n = feats.shape[0]
    rows = np.arange(n)
    if n > points:
        rows = np.sort(np.random.RandomState(0).permutation(n)[:points])
    x = feats[rows].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # cosine geometry
    if len(rows) < 3:
        return _note("too few images for a map")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, (len(rows) - 1) / 3))
        xy = TSNE(2, init="pca", perplexity=perplexity, random_state=0).fit_transform(x)
        how = f"t-SNE (perplexity {perplexity:g})"
    else:
        from sklearn.decomposition import PCA

        pca = PCA(2, random_state=0).fit(x)
        xy = pca.transform(x)
        ev = pca.explained_variance_ratio_
        how = (
            f"PCA (the two components explain {100 * ev[0]:.1f}% + {100 * ev[1]:.1f}% "
            "of the variance)"
        )
    groups = [int(v) for v in labels[rows]]
    names = classes or [str(i) for i in range(max(groups, default=-1) + 1)]
    svg = svgplot.scatter(
        [(float(a), float(b)) for a, b in xy], groups, names,
        title=f"{len(rows)} {split} images, {how.split(' (')[0]}",
    )  # fmt: skip
    return f"<p>{escape(how)}, of L2-normalised embeddings, coloured by label.</p>{svg}"


def write_report(
    run: str | Path | None = None,
    out: str | Path = "report.html",
    *,
    data: str | None = None,
    which: str | None = None,
    queries: int = 8,
    top: int = 8,
    map_method: str = "pca",
    map_points: int = 2000,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    say: Callable[[str], None] = _quiet,
) -> Path:
    """Write the HTML report of ``run`` (None: the latest run under ./runs) to ``out``."""
    if map_method not in MAP_METHODS:
        raise ReportError(f"--map {map_method!r}: use one of {', '.join(MAP_METHODS)}")
    if queries < 1 or top < 1 or map_points < 3:
        raise ReportError("--queries and --top must be >= 1, --map-points >= 3")
    run_dir = resolve_run(run)
    if run is None:
        say(f"run: {run_dir} (the most recent run under ./runs)")
    config = json.loads((run_dir / "config.json").read_text())
    s = read_run(run_dir)
    records = _records(run_dir / "metrics.jsonl")
    nn_html, map_html = _encoder_sections(
        run_dir, data=data, which=which, queries=queries, top=top, map_method=map_method,
        map_points=map_points, device=device, batch_size=batch_size, num_workers=num_workers,
        say=say,
    )  # fmt: skip
    bodies = {
        "settings": _settings_section(s, config),
        "curves": _curves_section(s, records),
        "evaluations": _evals_section(s),
        "views": _views_section(config),
        "neighbours": nn_html,
        "map": map_html,
    }
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    html = _page(
        f"ssl report: {run_dir.name}",
        f"{s.method} on {s.data} with {s.backbone} — {run_dir} — written {stamp}",
        [(sid, head, bodies[sid]) for sid, head in SECTIONS],
    )
    return _write(Path(out), html)


def _write(path: Path, html: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# ssl compare --report: several runs side by side
# ---------------------------------------------------------------------------------------------


def write_compare_report(summaries: Sequence[RunSummary], out: str | Path) -> Path:
    """Curves and tables of several runs side by side, in one self-contained HTML file."""
    names = [f"{s.method} ({s.run_dir.name})" for s in summaries]
    table = _table(
        [h for _, h in COLUMNS],
        [[fmt_value(k, s.row()[k]) for k, _ in COLUMNS] for s in summaries],
        [k not in ("run", "method", "backbone", "data") for k, _ in COLUMNS],
    )
    configs = []
    for s in summaries:
        try:
            configs.append(flatten_dotted(json.loads((s.run_dir / "config.json").read_text())))
        except (OSError, json.JSONDecodeError):
            configs.append({})
    keys = sorted({k for c in configs for k in c} - {"trainer.out"})
    differ = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    settings = (
        _table(["setting", *names], [[k, *(c.get(k) for c in configs)] for k in differ])
        if differ
        else _note("the runs share every setting")
    )
    curves_by_run = [step_curves(_records(s.run_dir / "metrics.jsonl")) for s in summaries]
    keys_c = list(dict.fromkeys(k for c in curves_by_run for k in c))
    keys_c = [k for k in FIRST_CURVES if k in keys_c] + [k for k in keys_c if k not in FIRST_CURVES]
    charts = []
    for key in keys_c:
        series = [
            svgplot.Series(names[i], [(float(x), y) for x, y in c.get(key, [])],
                           color=svgplot.color(i))
            for i, c in enumerate(curves_by_run)
        ]  # fmt: skip
        charts.append(svgplot.line_chart(series, title=CURVE_HELP.get(key, key), ylabel=key))
    acc = []
    for i, s in enumerate(summaries):
        for ser in _accuracy_series(s, f"{s.method}: "):
            ser.color = svgplot.color(i)
            acc.append(ser)
    charts.append(svgplot.line_chart(acc, title="accuracy", ylabel="top-1 (%)", y_percent=True))
    evals = [row for s, n in zip(summaries, names, strict=True) for row in _evals_rows(s.evals, n)]
    evals_html = _table(["run", *EVAL_HEADERS], evals) if evals else _note("no ssl eval results")
    bodies = {
        "runs": table,
        "settings": settings,
        "curves": f'<div class="charts">{"".join(charts)}</div>',
        "evaluations": evals_html,
    }
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    html = _page(
        f"ssl compare: {len(summaries)} runs",
        f"{', '.join(names)} — written {stamp}",
        [(sid, head, bodies[sid]) for sid, head in COMPARE_SECTIONS],
    )
    return _write(Path(out), html)
