"""``ssl report``: one self-contained HTML page about a run.

Sections of a run's report:

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
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sslcli.errors import ReportError
from sslcli.report import sections
from sslcli.report.gather import resolve_run
from sslcli.report.html import write_page
from sslcli.runs.compare import read_run
from sslcli.runs.metrics import FILE as metrics_file
from sslcli.runs.metrics import read_records

SECTIONS: tuple[tuple[str, str], ...] = (
    ("settings", "Settings"),
    ("curves", "Training curves"),
    ("evaluations", "Evaluations"),
    ("views", "Views the run trained on"),
    ("neighbours", "Nearest neighbours"),
    ("map", "2-D map of the embeddings"),
)
"""(id, heading) of a run report's sections, in order."""
MAP_METHODS = ("pca", "tsne")


def _quiet(msg: str) -> None:
    pass


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
    records = read_records(run_dir / metrics_file)
    nn_html, map_html = sections.encoder_sections(
        run_dir, data=data, which=which, queries=queries, top=top, map_method=map_method,
        map_points=map_points, device=device, batch_size=batch_size, num_workers=num_workers,
        say=say,
    )  # fmt: skip
    bodies = {
        "settings": sections.settings_section(s, config),
        "curves": sections.curves_section(s, records),
        "evaluations": sections.evals_section(s),
        "views": sections.views_section(config),
        "neighbours": nn_html,
        "map": map_html,
    }
    return write_page(
        Path(out), f"ssl report: {run_dir.name}",
        f"{s.method} on {s.data} with {s.backbone} — {run_dir}", SECTIONS, bodies,
    )  # fmt: skip
