"""``ssl methods [NAME]``: list registered methods, or one method's options."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from sslcli.cli.console import out


def register(app: typer.Typer) -> None:
    app.command("methods")(methods)


def methods(name: str = typer.Argument(None, help="Show this method's options.")) -> None:
    """List methods (name, package, version, summary) or show one method's options."""
    from sslcli import api

    if name:
        _show(api.load_method(name))
        return
    table = Table(title="methods")
    for col in ("name", "package", "version", "summary"):
        table.add_column(col)
    # Everything a plugin supplies is escaped: rich would read 'x[cuda]' as markup.
    for st in api.list_methods():
        label = st.info.qualified if st.clash else st.info.name
        if st.cls is None:
            summary = f"[red]broken[/red]: {escape(st.error or '')}"
        else:
            try:
                summary = escape(st.cls.summary())
            except Exception as e:  # noqa: BLE001 - a plugin's summary must not stop the list
                summary = f"[red]broken[/red]: summary() raised {escape(type(e).__name__)}"
        if st.clash:
            others = ", ".join(c.qualified for c in st.clash)
            summary = (
                f"[yellow]name clash[/yellow] with {escape(others)}: "
                f"use {escape(st.info.qualified)}; " + summary
            )
        table.add_row(escape(label), escape(st.info.package), escape(st.info.version), summary)
    out.print(table)


def _show(cls: type) -> None:
    out.print(f"[bold]{escape(cls.name)}[/bold]: {escape(cls.summary())}")
    table = Table(title="method options (--set method.KEY=VALUE)")
    for col in ("option", "default", "description"):
        table.add_column(col)
    from sslcli import api

    for opt in api.method_options(cls):
        default = repr(opt["default"])
        notes = []
        if opt["depends_on"]:
            # Filled per run by Method.option_defaults; the run's config.json has the value.
            default = f"by {opt['depends_on']}"
            notes.append(f"default depends on the {opt['depends_on']}")
        if opt["resume_safe"]:
            notes.append("may change on resume")
        desc = opt["description"] + (f" [{'; '.join(notes)}]" if notes else "")
        table.add_row(escape(opt["key"]), escape(default), escape(desc))
    out.print(table)
    shipped = api.recipe_files(cls)
    if shipped:
        out.print(
            escape(f"recipe files (--config {cls.name}:NAME): " + ", ".join(shipped)),
            highlight=False,
        )
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
            out.print(escape(label + ": " + ", ".join(lines)), highlight=False)
