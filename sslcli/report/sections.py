"""The HTML sections of a run's report (and the parts ``ssl compare --report`` shares):
settings, training curves, evaluations, views, nearest neighbours and the 2-D map."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from sslcli.errors import SSLError
from sslcli.report import svgplot
from sslcli.report.gather import (
    Neighbours,
    differences_from_defaults,
    neighbours,
    project_2d,
    step_curves,
)
from sslcli.report.html import note, pct, png_data_uri, table
from sslcli.runs.compare import RunSummary, fmt_value

CURVE_HELP = {
    "loss": "training loss",
    "lr": "learning rate",
    "emb_std": "embedding std (a fall towards 0 is collapse)",
    "images_per_s": "images/s",
}


def settings_section(s: RunSummary, config: dict[str, Any]) -> str:
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
        + table(["run", ""], head)
        + table(["measured", ""], perf)
        + "</div>"
    )
    diffs = differences_from_defaults(config)
    if diffs is None:
        html += note("the method is not installed here: its defaults are unknown")
    elif not diffs:
        html += note("every recipe value is the method's default")
    else:
        html += "<h3>Recipe values that differ from the method's defaults</h3>"
        html += table(["setting", "this run", "default"], diffs)
    return html


def accuracy_series(s: RunSummary, label: str = "") -> list[svgplot.Series]:
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for p in s.acc_points:
        by_kind.setdefault(p["kind"], []).append((float(p["step"]), float(p["value"])))
    return [
        svgplot.Series(f"{label}{kind}", pts, color=svgplot.color(i), dashed="eval" in kind)
        for i, (kind, pts) in enumerate(by_kind.items())
    ]


def curves_section(s: RunSummary, records: Sequence[dict[str, Any]]) -> str:
    charts = []
    for key, pts in step_curves(records).items():
        charts.append(svgplot.line_chart(
            [svgplot.Series(key, [(float(x), y) for x, y in pts])],
            title=CURVE_HELP.get(key, key), ylabel=key,
        ))  # fmt: skip
    charts.append(svgplot.line_chart(
        accuracy_series(s), title="accuracy (kNN, online probe, ssl eval)", ylabel="top-1 (%)",
        y_percent=True,
    ))  # fmt: skip
    html = f'<div class="charts">{"".join(charts)}</div>'
    if not step_curves(records):
        html += note("no step records in metrics.jsonl yet")
    return html


def evals_rows(evals: Sequence[dict[str, Any]], run: str | None = None) -> list[list[Any]]:
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
               r.get("data"), f"{100 * frac:g}%" if frac else "all", pct(r.get("top1")),
               pct(r.get("top5")), chosen]  # fmt: skip
        rows.append(([run] if run is not None else []) + row)
    return rows


EVAL_HEADERS = ["time (UTC)", "protocol", "step", "encoder", "data", "labels", "top-1", "top-5",
                "chosen"]  # fmt: skip


def evals_section(s: RunSummary) -> str:
    if not s.evals:
        return note(
            f"no ssl eval result recorded for this run yet (ssl eval knn|linear|finetune "
            f"{s.run_dir})"
        )
    return table(EVAL_HEADERS, evals_rows(s.evals))


def views_section(run_config: dict[str, Any]) -> str:
    """The grid of training views (as ``ssl views`` draws them) for the run's own settings
    and seed; a note instead when the run's data cannot be read any more."""
    from pydantic import ValidationError

    from sslcli.config import RunConfig
    from sslcli.preview import views_grid_png

    try:
        run = RunConfig.from_json_dict(run_config)
        png = views_grid_png(run, n=8, seed=run.trainer.seed)
    except (SSLError, ValidationError) as e:
        return note(f"views preview unavailable: {str(e).splitlines()[0]}")
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    return f'<div class="views"><img src="{uri}" alt="views the run trained on"></div>'


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


def encoder_sections(
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
        return note(msg), note(msg)
    t.check_which(which)
    dev = pick_device(device)
    t.to(dev)
    spec = data or t.dataset
    if spec is None:
        msg = "the run does not record its data: give --data"
        return note(msg), note(msg)
    try:
        nb = neighbours(
            t, spec, which=which, queries=queries, top=top, device=dev,
            batch_size=batch_size, num_workers=num_workers, say=say,
        )  # fmt: skip
        return _neighbours_section(nb), _map_section(nb, map_method, map_points)
    except SSLError as e:
        # Moved or broken data costs these two sections, not the whole report.
        say(f"report: no neighbours or map: {e}")
        msg = f"unavailable: {e}"
        return note(msg), note(msg)


def _neighbours_section(nb: Neighbours) -> str:
    where = "the test split" if nb.split == "test" else "the training split (no test split)"
    frames = (
        "; a green frame: same label as the query, red: another label"
        if bool((nb.labels >= 0).any())
        else ""
    )
    return (
        f"<p>{len(nb.rows)} fixed query images from {escape(where)} and the "
        f"{nb.nearest.shape[1]} training images with the most similar embeddings (cosine "
        f"similarity under each){frames}.</p>"
        + _neighbours_html(nb.queries, nb.refs, nb.rows, nb.nearest, nb.similarities, nb.split)
    )


def _map_section(nb: Neighbours, method: str, points: int) -> str:
    projected = project_2d(nb.features, method, points)
    if projected is None:
        return note("too few images for a map")
    rows, xy, how = projected
    groups = [int(v) for v in nb.labels[rows]]
    names = nb.queries.classes or [str(i) for i in range(max(groups, default=-1) + 1)]
    svg = svgplot.scatter(
        [(float(a), float(b)) for a, b in xy], groups, names,
        title=f"{len(rows)} {nb.split} images, {how.split(' (')[0]}",
    )  # fmt: skip
    return f"<p>{escape(how)}, of L2-normalised embeddings, coloured by label.</p>{svg}"
