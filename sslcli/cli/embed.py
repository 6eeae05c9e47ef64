"""``ssl embed [TARGET] --data D --out FILE``: parse flags, call :func:`sslcli.api.embed`."""

from __future__ import annotations

import json
from typing import Any

import typer

from sslcli.cli.console import err, out


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)


def embed(
    target: str = typer.Argument(
        None,
        help="Run directory, checkpoint file or exported directory (default: the most recent "
        "run under ./runs).",
        show_default=False,
    ),
    out_file: str = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output file; its extension picks the format: .safetensors | .npz | .parquet "
        "(parquet needs pyarrow).",
    ),
    data: str = typer.Option(
        None, "--data", "-d", help="'digits', DIR or format:DIR (default: the run's own data)."
    ),
    split: str = typer.Option("train", "--split", help="train | test (a flat folder: train)."),
    which: str = typer.Option(
        None, "--which", help="Encoder to use (e.g. teacher | student); default: the method's."
    ),
    normalize: bool = typer.Option(
        False, "--normalize", help="L2-normalise each embedding (dot product = cosine)."
    ),
    dtype: str = typer.Option(
        "float32", "--dtype", help="float32 | float16 (half the file; ~3 significant digits)."
    ),
    neighbors: int = typer.Option(
        0,
        "--neighbors",
        "-k",
        help="Also store each image's K nearest other images and their cosine similarity.",
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per encoder batch."),
    workers: int = typer.Option(0, "--workers", help="Decoding workers for folder datasets."),
    max_bad_fraction: float = typer.Option(
        None,
        "--max-bad-fraction",
        help="Fail when more than this fraction of the images is unreadable (default: the "
        "run's data.max_bad_fraction, 0.01); fewer are skipped and named.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object (the file's metadata) on stdout."
    ),
) -> None:
    """Embed every image of a dataset with a trained encoder, into one file."""
    from sslcli import api

    api.embeddings_format(out_file)  # a wrong extension fails before anything is loaded
    with _progress() as advance:
        res = api.embed(
            target, data=data, out=out_file, split=split, which=which, normalize=normalize,
            dtype=dtype, neighbors=neighbors, device=device, batch_size=batch_size,
            num_workers=workers, max_bad_fraction=max_bad_fraction,
            say=lambda m: err.print(m, markup=False, highlight=False), progress=advance,
        )  # fmt: skip
    m = res.meta
    if as_json:
        out.out(json.dumps({**m, "out": str(res.path)}), highlight=False)
        return
    extra = f", {m['neighbors']} neighbours each" if m["neighbors"] else ""
    skipped = f"; {len(m['skipped'])} unreadable image(s) skipped" if m["skipped"] else ""
    out.print(
        f"wrote {m['rows']} embeddings of dimension {m['dim']} ({m['dtype']}"
        f"{', L2-normalised' if m['normalize'] else ''}{extra}) to {res.path}{skipped}",
        markup=False,
    )


class _progress:
    """A rich progress bar on stderr (only on a terminal); yields ``advance(done, total)``."""

    def __enter__(self) -> Any:
        self.bar: Any = None
        if not err.is_terminal:
            return lambda done, total: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=err,
        )  # fmt: skip
        self.bar.start()
        task = self.bar.add_task("embed", total=None)
        return lambda done, total: self.bar.update(task, completed=done, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
