"""``ssl compare [RUN_DIR...]`` / ``ssl compare --methods a,b,c``: parse flags, call the API."""

from __future__ import annotations

import typer

from sslcli.cli.console import err, out


def register(app: typer.Typer) -> None:
    app.command("compare")(compare)


def compare(
    run_dirs: list[str] = typer.Argument(
        None, help="Run directories (default: every run under ./runs).", show_default=False
    ),
    fmt: str = typer.Option("table", "--format", "-f", help="table | markdown | csv | json"),
    plot: str = typer.Option(
        None, "--plot", help="Write loss/accuracy curves and accuracy vs time to this PNG."
    ),
    report: str = typer.Option(
        None, "--report", help="Write the runs' curves and tables side by side to this HTML file."
    ),
    methods: str = typer.Option(
        None,
        "--methods",
        "-m",
        help="Comma-separated methods to train with the same data, budget and seed first.",
    ),
    data: str = typer.Option(None, "--data", "-d", help="Data for --methods."),
    epochs: int = typer.Option(None, "--epochs", "-e", help="Epochs for --methods."),
    backbone: str = typer.Option(None, "--backbone", "-b", help="Backbone for --methods."),
    batch_size: int = typer.Option(None, "--batch-size"),
    image_size: int = typer.Option(None, "--image-size"),
    seed: int = typer.Option(None, "--seed"),
    max_steps: int = typer.Option(None, "--max-steps", help="Stop each run after N steps."),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda"),
    out_dir: str = typer.Option(
        None, "--out", "-o", help="Parent directory of the --methods runs."
    ),
    sets: list[str] = typer.Option(None, "--set", help="section.key=value for every method."),
    linear: bool = typer.Option(
        True, "--linear/--no-linear", help="Linear-probe each trained method (with labels)."
    ),
) -> None:
    """Compare runs in one table (and a plot); or train several methods alike and compare."""
    from sslcli import api

    api.check_compare_format(fmt)
    names = [m.strip() for m in (methods or "").split(",") if m.strip()]
    if methods is not None and not names:
        raise api.SSLError("--methods needs at least one method name ('ssl methods' lists them)")
    if not names and any(
        v is not None for v in (data, epochs, backbone, batch_size, image_size, seed, max_steps)
    ):
        raise api.SSLError("--data/--epochs/--backbone/... only apply with --methods")
    result = api.compare(
        run_dirs or [],
        methods=names,
        plot_path=plot,
        report_path=report,
        say=lambda m: err.print(m, markup=False, highlight=False),
        console=err,
        data=data, epochs=epochs, backbone=backbone, batch_size=batch_size,
        image_size=image_size, seed=seed, max_steps=max_steps, device=device, out=out_dir,
        sets=sets or [], linear=linear,
    )  # fmt: skip
    if fmt == "table":
        table = api.comparison_table(result.summaries)
        if out.is_terminal:
            out.print(table)
        else:
            # Piped or captured: render at the table's natural width instead of squeezing
            # fourteen columns into the 80 that rich assumes without a terminal.
            import io

            from rich.console import Console
            from rich.measure import Measurement

            wide = Console(file=io.StringIO(), width=10_000, color_system=None)
            width = Measurement.get(wide, wide.options, table).maximum
            plain = Console(file=io.StringIO(), width=width, color_system=None)
            plain.print(table)
            out.out(plain.file.getvalue().rstrip("\n"), highlight=False)
    else:
        out.out(api.render_comparison(result.summaries, fmt), highlight=False)
    if plot:
        err.print(f"plot: {plot}", markup=False)
    if report:
        err.print(f"report: {report}", markup=False)
    if result.failures:
        lines = "; ".join(f"{k}: {v}" for k, v in result.failures.items())
        raise api.SSLError(f"{len(result.failures)} of {len(names)} methods failed: {lines}")
