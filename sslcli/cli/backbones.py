"""``ssl backbones``: the aliases with parameter counts and feature widths."""

from __future__ import annotations

import typer
from rich.table import Table

from sslcli.cli.console import out


def register(app: typer.Typer) -> None:
    app.command("backbones")(backbones)


def backbones() -> None:
    """List backbone aliases (any timm model name works too)."""
    from sslcli.backbones import describe_all

    table = Table(title="backbones (any timm model name is accepted too)")
    for col in ("alias", "timm model", "params (M)", "feature width"):
        table.add_column(col)
    for r in describe_all():
        table.add_row(r["alias"], r["timm"], f"{r['params_m']:.1f}", str(r["features"]))
    out.print(table)
