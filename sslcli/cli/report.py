"""``ssl report [RUN] --out report.html``: parse flags, call :func:`sslcli.api.report`."""

from __future__ import annotations

import typer

from sslcli.cli.console import err, out


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    run: str = typer.Argument(
        None,
        help="Run directory, or a checkpoint inside one (default: the most recent run under "
        "./runs).",
        show_default=False,
    ),
    out_file: str = typer.Option("report.html", "--out", "-o", help="The HTML file to write."),
    data: str = typer.Option(
        None, "--data", "-d", help="Data for neighbours and the map (default: the run's own)."
    ),
    which: str = typer.Option(
        None, "--which", help="Encoder to show (e.g. teacher | student); default: the method's."
    ),
    queries: int = typer.Option(8, "--queries", help="Query images in the neighbours section."),
    top: int = typer.Option(8, "--top", help="Neighbours shown per query."),
    map_method: str = typer.Option(
        "pca", "--map", help="pca | tsne (t-SNE separates clusters better but is slow)."
    ),
    map_points: int = typer.Option(
        2000, "--map-points", help="At most this many images on the map (a fixed sample)."
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per encoder batch."),
    workers: int = typer.Option(0, "--workers", help="Decoding workers for folder datasets."),
) -> None:
    """Write one self-contained HTML report of a run: settings, curves, evaluations, views,
    nearest neighbours and a 2-D map of the embeddings."""
    from sslcli import api

    path = api.report(
        run, out_file, data=data, which=which, queries=queries, top=top, map_method=map_method,
        map_points=map_points, device=device, batch_size=batch_size, num_workers=workers,
        say=lambda m: err.print(m, markup=False, highlight=False),
    )  # fmt: skip
    out.print(f"report: {path}", markup=False)
