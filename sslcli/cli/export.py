"""``ssl export [TARGET] --out DIR``: parse flags, call :func:`sslcli.runs.export.export`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sslcli.cli.console import err, out


def register(app: typer.Typer) -> None:
    app.command("export")(export)


def export(
    target: str = typer.Argument(
        None,
        help="Run directory or checkpoint file (default: the most recent run under ./runs).",
        show_default=False,
    ),
    out_dir: str = typer.Option(
        None, "--out", "-o", help="Output directory (default: <run>/export[-WHICH])."
    ),
    which: str = typer.Option(
        None,
        "--which",
        help="Encoder to export (e.g. teacher | student, CMC: l | ab); default: the evaluated one.",
    ),
    with_heads: bool = typer.Option(
        False, "--with-heads", help="Also write the method's heads to heads.safetensors."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Write an encoder as model.safetensors + timm config.json (loads in plain timm)."""
    from sslcli.runs.export import export as do_export
    from sslcli.runs.targets import latest_run, load_target

    if target is None:
        target = str(latest_run())
        err.print(f"target: {target} (the most recent run under ./runs)", markup=False)
    if out_dir is None:
        t = load_target(target)
        base = t.run_dir if t.run_dir is not None else Path.cwd()
        suffix = f"-{which}" if which and which != t.default_which else ""
        stem = "export" if t.run_dir is not None else f"{Path(t.weights).stem}-export"
        out_dir = str(base / f"{stem}{suffix}")
        err.print(f"out: {out_dir}", markup=False)
    result = do_export(target, out_dir, which=which, with_heads=with_heads)
    for note in result.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    if as_json:
        out.out(json.dumps(result.to_json()), highlight=False)
        return
    out.print(
        f"exported encoder {result.which!r} ({result.architecture}) to {result.out}: "
        + ", ".join(p.name for p in result.files),
        markup=False,
    )
    if not result.small_stem:
        out.print(
            f'load it with: timm.create_model("local-dir:{result.out}", pretrained=True, '
            "num_classes=0)",
            markup=False,
        )
