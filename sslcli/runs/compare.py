"""``ssl compare``: runs side by side — a table, and plots of their curves.

Everything is read from what a run leaves behind: ``config.json`` (method, backbone, data,
epochs) and ``metrics.jsonl`` (the ``start`` record, step records with the loss, ``epoch``
records — with ``probe_top1`` when an online probe ran —, the ``end`` record with
throughput, memory, wall time and kNN accuracy, and ``eval`` records appended by
``ssl eval``). Nothing here trains or evaluates (``ssl compare --methods a,b,c`` first
trains each method with the same data, budget and seed: :func:`sslcli.api.train_methods`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sslcli.errors import SSLError, TargetError
from sslcli.runs.layout import RUNS_DIR, is_export_dir
from sslcli.runs.metrics import FILE, read_records

FORMATS = ("table", "markdown", "csv", "json")

COLUMNS: list[tuple[str, str]] = [
    ("run", "run"),
    ("method", "method"),
    ("backbone", "backbone"),
    ("data", "data"),
    ("epochs", "epochs"),
    ("steps", "steps"),
    ("images_per_s", "img/s"),
    ("peak_mem_mb", "peak MB"),
    ("wall_s", "wall s"),
    ("final_loss", "loss"),
    ("knn_top1", "kNN"),
    ("knn_random", "kNN rand"),
    ("linear_top1", "linear"),
    ("finetune_top1", "finetune"),
]
"""(key, short header) of the table, in order."""


@dataclass
class RunSummary:
    run_dir: Path
    method: str
    backbone: str
    data: str
    epochs: int | None
    steps: int | None
    images_per_s: float | None = None
    peak_mem_mb: float | None = None
    wall_s: float | None = None
    final_loss: float | None = None
    knn_top1: float | None = None
    knn_random: float | None = None
    linear_top1: float | None = None
    finetune_top1: float | None = None
    finished: bool = False
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    acc_points: list[dict[str, Any]] = field(default_factory=list)
    """``{"step", "elapsed_s", "value", "kind"}`` for every accuracy the run recorded."""
    evals: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "run": self.run_dir.name, "method": self.method, "backbone": self.backbone,
            "data": self.data, "epochs": self.epochs, "steps": self.steps,
            "images_per_s": self.images_per_s, "peak_mem_mb": self.peak_mem_mb,
            "wall_s": self.wall_s, "final_loss": self.final_loss, "knn_top1": self.knn_top1,
            "knn_random": self.knn_random, "linear_top1": self.linear_top1,
            "finetune_top1": self.finetune_top1,
        }  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {**self.row(), "run_dir": str(self.run_dir), "finished": self.finished,
                "evals": self.evals}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def read_run(run_dir: str | Path) -> RunSummary:
    """Summarise one run directory (one-line :class:`TargetError` if it is not one)."""
    d = Path(run_dir)
    cfg_path = d / "config.json"
    if not d.is_dir():
        raise TargetError(f"run directory not found: {d}")
    if not cfg_path.is_file():
        raise TargetError(f"{d} is not a run directory (no config.json)")
    if is_export_dir(d):
        raise TargetError(
            f"{d} is an exported model (ssl export), not a run: compare the run it came from"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TargetError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise TargetError(f"{cfg_path} does not hold a run config")
    m = cfg.get("method")
    method = m.get("name") if isinstance(m, dict) else (m if isinstance(m, str) else "?")
    data_cfg = cfg.get("data", {})
    size = data_cfg.get("image_size")
    s = RunSummary(
        run_dir=d,
        method=str(method),
        backbone=str(cfg.get("backbone", {}).get("name", "?")),
        data=f"{data_cfg.get('dataset', '?')}" + (f"@{size}" if size else ""),
        epochs=cfg.get("trainer", {}).get("epochs"),
        steps=None,
    )
    recs = read_records(d / FILE)
    t_start: float | None = None
    last_step = 0
    for r in recs:
        ev = r.get("event")
        step = int(r.get("step") or 0)
        if ev == "start":
            t_start = _num(r.get("time"))
            s.knn_random = _num(r.get("knn_random"))
            if s.knn_random is not None:
                s.acc_points.append(
                    {"step": 0, "elapsed_s": 0.0, "value": s.knn_random, "kind": "kNN (random)"}
                )
        elif ev is None and "loss" in r:
            loss = _num(r.get("loss"))
            if loss is not None:
                s.loss_curve.append((step, loss))
            last_step = max(last_step, step)
        elif ev == "stop":
            last_step = max(last_step, step)
            loss = _num(r.get("loss"))
            if loss is not None and (not s.loss_curve or s.loss_curve[-1][0] != step):
                s.loss_curve.append((step, loss))
        elif ev == "epoch":
            acc = _num(r.get("probe_top1"))
            if acc is not None:
                s.acc_points.append(
                    {"step": step, "elapsed_s": _elapsed(r, t_start), "value": acc,
                     "kind": "online probe"}
                )  # fmt: skip
        elif ev == "end":
            s.finished = True
            last_step = max(last_step, step)
            s.final_loss = _num(r.get("loss"))
            s.images_per_s = _num(r.get("images_per_s"))
            s.peak_mem_mb = _num(r.get("peak_mem_mb"))
            s.wall_s = _num(r.get("wall_s"))
            s.knn_top1 = _num(r.get("knn_top1"))
            if s.knn_random is None:
                s.knn_random = _num(r.get("knn_random"))
            if s.knn_top1 is not None:
                s.acc_points.append(
                    {"step": step, "elapsed_s": s.wall_s or _elapsed(r, t_start),
                     "value": s.knn_top1, "kind": "kNN"}
                )  # fmt: skip
        elif ev == "eval":
            s.evals.append(r)
    s.steps = last_step or None
    if s.final_loss is None and s.loss_curve:
        s.final_loss = s.loss_curve[-1][1]
    _apply_evals(s)
    return s


def _elapsed(rec: dict[str, Any], t_start: float | None) -> float | None:
    t = _num(rec.get("time"))
    return None if t is None or t_start is None else max(0.0, t - t_start)


def _apply_evals(s: RunSummary) -> None:
    """The latest full-label evaluation of each protocol fills its column; every one is a
    point on the accuracy curves (at the checkpoint's step and the run's wall time)."""
    for r in s.evals:
        acc = _num(r.get("top1"))
        if acc is None:
            continue
        proto = r.get("protocol")
        frac = r.get("label_fraction")
        label = {"knn": "kNN", "linear": "linear", "finetune": "fine-tune"}.get(proto, str(proto))
        if frac:
            label += f" ({100 * frac:g}% labels)"
        step = int(r.get("step") or 0)
        at_end = s.steps is not None and step >= s.steps
        s.acc_points.append(
            {"step": step, "elapsed_s": s.wall_s if at_end else None, "value": acc,
             "kind": f"{label} (eval)"}
        )  # fmt: skip
        if frac:
            continue
        if proto == "linear":
            s.linear_top1 = acc
        elif proto == "finetune":
            s.finetune_top1 = acc
        elif proto == "knn" and s.knn_top1 is None:
            s.knn_top1 = acc


def find_runs(root: Path = RUNS_DIR) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if (p / "config.json").is_file() and not is_export_dir(p)
    )


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def fmt_value(key: str, v: Any) -> str:
    if v is None:
        return "-"
    if key in ("knn_top1", "knn_random", "linear_top1", "finetune_top1"):
        return f"{100 * v:.1f}%"
    if key == "final_loss":
        return f"{v:.4f}"
    if key in ("images_per_s", "peak_mem_mb", "wall_s"):
        return f"{v:.0f}" if v >= 10 else f"{v:.2g}"
    return str(v)


def render(summaries: Sequence[RunSummary], fmt: str) -> str:
    """The comparison as markdown, CSV or JSON text (``table`` is drawn by the CLI)."""
    rows = [s.row() for s in summaries]
    if fmt == "json":
        return json.dumps([s.to_json() for s in summaries], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=[k for k, _ in COLUMNS], lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        head = "| " + " | ".join(h for _, h in COLUMNS) + " |"
        rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
        body = [
            "| " + " | ".join(fmt_value(k, r[k]).replace("|", "\\|") for k, _ in COLUMNS) + " |"
            for r in rows
        ]
        return "\n".join([head, rule, *body])
    raise SSLError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def rich_table(summaries: Sequence[RunSummary]) -> Any:
    from rich.table import Table

    table = Table(title="runs compared", title_justify="left")
    for key, head in COLUMNS:
        numeric = key not in ("run", "method", "backbone", "data")
        table.add_column(head, justify="right" if numeric else "left")
    for s in summaries:
        r = s.row()
        table.add_row(*(fmt_value(k, r[k]) for k, _ in COLUMNS))
    return table


def plot(summaries: Sequence[RunSummary], path: str | Path) -> Path:
    """Loss curves, accuracy curves (per step) and accuracy against wall time, in one PNG."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise SSLError("--plot needs matplotlib: pip install 'sslcli[plot]' (or matplotlib)") from e
    # A bare Figure renders with the Agg canvas and leaves pyplot's global backend alone
    # (no display needed, and a caller's interactive session is not disturbed).
    fig = Figure(figsize=(16, 4.8))
    ax_loss, ax_acc, ax_time = fig.subplots(1, 3)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])

    def marker(kind: str) -> str:
        if kind in ("kNN", "kNN (random)", "online probe"):
            return {"kNN": "o", "kNN (random)": "x", "online probe": "."}[kind]
        shape = {"kNN": "^", "linear": "s", "fine-tune": "D"}.get(kind.split(" ")[0], "*")
        return shape if "labels)" not in kind else {"s": "v", "D": "d", "^": "<"}.get(shape, "*")

    for i, s in enumerate(summaries):
        c = colors[i % len(colors)]
        name = f"{s.method} ({s.run_dir.name})"
        if s.loss_curve:
            xs, ys = zip(*s.loss_curve, strict=True)
            ax_loss.plot(xs, ys, color=c, label=name, marker="." if len(xs) < 20 else None)
        pts = sorted(s.acc_points, key=lambda p: p["step"])
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for p in pts:
            by_kind.setdefault(p["kind"], []).append(p)
        for kind, ps in by_kind.items():
            mk = marker(kind)
            ax_acc.plot([p["step"] for p in ps], [100 * p["value"] for p in ps], color=c,
                        marker=mk, linestyle="-" if len(ps) > 1 else "none",
                        label=f"{s.method}: {kind}")  # fmt: skip
        timed = [p for p in pts if p["elapsed_s"] is not None]
        for kind in dict.fromkeys(p["kind"] for p in timed):
            ps = [p for p in timed if p["kind"] == kind]
            ax_time.plot([p["elapsed_s"] for p in ps], [100 * p["value"] for p in ps],
                         color=c, marker=marker(kind),
                         linestyle="-" if len(ps) > 1 else "none",
                         label=f"{s.method}: {kind}")  # fmt: skip
    ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
    ax_acc.set(title="accuracy", xlabel="step", ylabel="top-1 (%)")
    ax_time.set(title="accuracy vs wall time", xlabel="training wall time (s)",
                ylabel="top-1 (%)")  # fmt: skip
    for ax in (ax_loss, ax_acc, ax_time):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out


# ---------------------------------------------------------------------------------------------
# The result of ``ssl compare``
# ---------------------------------------------------------------------------------------------


@dataclass
class CompareResult:
    summaries: list[RunSummary]
    failures: dict[str, str] = field(default_factory=dict)
    """Method -> one-line error, for methods that could not be trained or evaluated."""
