"""``ssl export [TARGET] --out DIR``: parse flags, call :func:`sslcli.api.export`."""

from __future__ import annotations

import json

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
    from sslcli import api

    result = api.export(
        target, out_dir, which=which, with_heads=with_heads,
        say=lambda m: err.print(m, markup=False, highlight=False),
    )  # fmt: skip
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
