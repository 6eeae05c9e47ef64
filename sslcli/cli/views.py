"""``ssl views METHOD --out grid.png|DIR``: parse flags, call :func:`sslcli.api.views`."""

from __future__ import annotations

from pathlib import Path

import typer

from sslcli.cli.console import out


def register(app: typer.Typer) -> None:
    app.command("views")(views)


def views(
    method: str = typer.Argument(None, help="Method name ('ssl methods'); or from --config."),
    out_path: Path = typer.Option(
        ..., "--out", "-o", help="grid.png, or a directory for one PNG per view."
    ),
    data: str = typer.Option(None, "--data", "-d", help="'digits', DIR or format:DIR."),
    backbone: str = typer.Option(None, "--backbone", "-b", help="Alias or timm model name."),
    image_size: int = typer.Option(None, "--image-size"),
    config: Path = typer.Option(None, "--config", "-c", help="Recipe file, or METHOD:RECIPE."),
    sets: list[str] = typer.Option(None, "--set", help="section.key=value (repeatable)."),
    n: int = typer.Option(8, "--n", help="Number of source images (rows)."),
    seed: int = typer.Option(
        None, "--seed", help="Seed of the data order and augmentations (default: the run's)."
    ),
) -> None:
    """Write the views 'ssl train' would make from N images, with the same settings."""
    from sslcli import api

    written = api.views(
        method, out=out_path, data=data, backbone=backbone, image_size=image_size,
        config=config, sets=sets, n=n, seed=seed,
    )  # fmt: skip
    where = out_path if len(written) == 1 else f"{len(written)} pictures in {out_path}"
    out.print(f"wrote {where}")
