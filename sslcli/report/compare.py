"""``ssl compare --report``: several runs side by side in one self-contained HTML page."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from sslcli.config import flatten_dotted
from sslcli.report import svgplot
from sslcli.report.gather import FIRST_CURVES, step_curves
from sslcli.report.html import note, table, write_page
from sslcli.report.sections import CURVE_HELP, EVAL_HEADERS, accuracy_series, evals_rows
from sslcli.runs.compare import COLUMNS, RunSummary, fmt_value
from sslcli.runs.metrics import FILE as metrics_file
from sslcli.runs.metrics import read_records

COMPARE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("runs", "Runs"),
    ("settings", "Settings that differ"),
    ("curves", "Training curves"),
    ("evaluations", "Evaluations"),
)


def write_compare_report(summaries: Sequence[RunSummary], out: str | Path) -> Path:
    """Curves and tables of several runs side by side, in one self-contained HTML file."""
    names = [f"{s.method} ({s.run_dir.name})" for s in summaries]
    runs_table = table(
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
        table(["setting", *names], [[k, *(c.get(k) for c in configs)] for k in differ])
        if differ
        else note("the runs share every setting")
    )
    curves_by_run = [step_curves(read_records(s.run_dir / metrics_file)) for s in summaries]
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
        for ser in accuracy_series(s, f"{s.method}: "):
            ser.color = svgplot.color(i)
            acc.append(ser)
    charts.append(svgplot.line_chart(acc, title="accuracy", ylabel="top-1 (%)", y_percent=True))
    evals = [row for s, n in zip(summaries, names, strict=True) for row in evals_rows(s.evals, n)]
    evals_html = table(["run", *EVAL_HEADERS], evals) if evals else note("no ssl eval results")
    bodies = {
        "runs": runs_table,
        "settings": settings,
        "curves": f'<div class="charts">{"".join(charts)}</div>',
        "evaluations": evals_html,
    }
    return write_page(
        Path(out), f"ssl compare: {len(summaries)} runs", ", ".join(names), COMPARE_SECTIONS,
        bodies,
    )  # fmt: skip
