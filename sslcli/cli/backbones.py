"""``ssl backbones``: the aliases with parameter counts and feature widths."""

from __future__ import annotations

import typer
from rich.table import Table

from sslcli.cli.console import out


def register(app: typer.Typer) -> None:
    app.command("backbones")(backbones)


def backbones() -> None:
    """List backbone aliases (any timm model name works too)."""
    from sslcli import api

    table = Table(
        title="backbones (any timm model name is accepted too)",
        caption="* timm's model built with other constructor arguments: SimCLR v2's "
        "SK-ResNets (two 3x3 branches, ResNet-D stem, width 1x/2x/3x)",
    )
    for col in ("alias", "timm model", "params (M)", "feature width"):
        table.add_column(col)
    for r in api.describe_backbones():
        timm_name = r["timm"] + (" *" if r["kwargs"] else "")
        table.add_row(r["alias"], timm_name, f"{r['params_m']:.1f}", str(r["features"]))
    out.print(table)
