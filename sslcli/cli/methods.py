"""``ssl methods [NAME]``: list registered methods, or one method's options."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from sslcli.cli.console import out


def register(app: typer.Typer) -> None:
    app.command("methods")(methods)


def methods(name: str = typer.Argument(None, help="Show this method's options.")) -> None:
    """List methods (name, package, version, summary) or show one method's options."""
    from sslcli import registry

    if name:
        _show(registry.load(name))
        return
    table = Table(title="methods")
    for col in ("name", "package", "version", "summary"):
        table.add_column(col)
    for st in registry.list_methods():
        if st.cls is None:
            table.add_row(
                st.info.name, st.info.package, st.info.version, f"[red]broken[/red]: {st.error}"
            )
        else:
            table.add_row(st.info.name, st.info.package, st.info.version, st.cls.summary())
    out.print(table)


def _show(cls: type) -> None:
    out.print(f"[bold]{cls.name}[/bold]: {cls.summary()}")
    table = Table(title="method options (--set method.KEY=VALUE)")
    for col in ("option", "default", "description"):
        table.add_column(col)
    for key, field in cls.Config.model_fields.items():
        table.add_row(
            key, repr(field.get_default(call_default_factory=True)), field.description or ""
        )
    out.print(table)
    # Recipes may depend on the architecture (MoCo v3, DINO): show each distinct one.
    shown: list[dict[str, Any]] = []
    for family, example in (("convnets", "resnet50"), ("ViTs", "vit-s")):
        recipe = cls.recipe_for(example).model_dump()
        if recipe in shown:
            continue
        shown.append(recipe)
        lines = [f"{sec}.{k} = {v!r}" for sec, vals in recipe.items() for k, v in vals.items()]
        if lines:
            label = "method recipe defaults"
            if cls.recipe_for("resnet50") != cls.recipe_for("vit-s"):
                label += f" ({family})"
            out.print(label + ": " + ", ".join(lines), highlight=False)
