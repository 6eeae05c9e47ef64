"""``ssl train``: parse flags into a config layer and call :func:`sslcli.api.train`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from sslcli.cli.console import err, out


def register(app: typer.Typer) -> None:
    app.command("train")(train)


def train(
    method: str = typer.Argument(None, help="Method name ('ssl methods'); or from --config."),
    backbone: str = typer.Option(None, "--backbone", "-b", help="Alias or timm model name."),
    data: str = typer.Option(None, "--data", "-d", help="'digits', DIR or format:DIR."),
    epochs: int = typer.Option(None, "--epochs", "-e"),
    batch_size: int = typer.Option(None, "--batch-size"),
    image_size: int = typer.Option(None, "--image-size"),
    device: str = typer.Option(None, "--device", help="auto | cpu | cuda"),
    precision: str = typer.Option(None, "--precision", help="auto | fp32 | bf16"),
    seed: int = typer.Option(None, "--seed"),
    out_dir: str = typer.Option(None, "--out", "-o", help="Run directory."),
    config: Path = typer.Option(None, "--config", "-c", help="Recipe file, or METHOD:RECIPE."),
    sets: list[str] = typer.Option(None, "--set", help="section.key=value (repeatable)."),
    resume: Path = typer.Option(
        None,
        "--resume",
        help="Run directory or checkpoint file to continue exactly where it stopped.",
    ),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile (CUDA)."),
    skip_nonfinite: int = typer.Option(
        None, "--skip-nonfinite", help="Skip up to N steps whose loss is NaN/inf, then stop."
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Start a new run in an --out that holds another run (its files are removed).",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Resolve and build everything, print the plan (settings and where they come "
        "from, data, views, backbone arguments, parameter groups, lr, schedule, memory per "
        "GPU), then exit without training or writing anything.",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="With --dry-run: one JSON object on stdout instead of tables."
    ),
    processes: int = typer.Option(
        None,
        "--processes",
        help="With --dry-run: plan for N torchrun processes (GPUs); default $WORLD_SIZE or 1.",
    ),
    images: int = typer.Option(
        None,
        "--images",
        help="With --dry-run: plan for a training set of N images without opening the data.",
    ),
    memory: bool = typer.Option(
        None,
        "--memory/--no-memory",
        help="With --dry-run: estimate the peak memory per GPU (default; runs a few small "
        "forward passes).",
    ),
) -> None:
    """Train an encoder with METHOD (defaults: digits, resnet18, a quick CPU-sized run)."""
    from sslcli import api

    if not dry_run:
        given = [f for f, v in (("--json", as_json or None), ("--processes", processes),
                                ("--images", images), ("--[no-]memory", memory))
                 if v is not None]  # fmt: skip
        if given:
            raise api.ConfigError([f"{', '.join(given)}: only with --dry-run"])

    flags: dict[str, Any] = {}
    pairs = {
        "backbone.name": backbone,
        "data.dataset": data,
        "data.image_size": image_size,
        "trainer.epochs": epochs,
        "trainer.batch_size": batch_size,
        "trainer.device": device,
        "trainer.precision": precision,
        "trainer.seed": seed,
        "trainer.out": out_dir,
        "trainer.compile": compile,
        "trainer.skip_nonfinite": skip_nonfinite,
    }
    for key, value in pairs.items():
        if value is not None:
            section, _, name = key.partition(".")
            flags.setdefault(section, {})[name] = value
    if dry_run:
        from sslcli.cli.dryrun import show

        plan = api.plan(
            method, config=config, overrides=flags, sets=sets or [], resume=resume,
            processes=processes, images=images, memory=memory is not False, console=err,
        )  # fmt: skip
        if os.environ.get("RANK", "0") != "0":
            return  # under torchrun, one process prints the plan
        show(plan, as_json=as_json)
        return
    result = api.train(
        method, config=config, overrides=flags, sets=sets or [], resume=resume, console=err,
        force=force,
    )  # fmt: skip
    if result.rank != 0:
        return  # under torchrun, rank 0 reports for every process
    out.print(f"run directory: {result.run_dir}")
    if result.final_loss is not None:
        out.print(f"final loss: {result.final_loss:.4f}")
    if result.knn_trained is not None:
        rnd = f"{100 * result.knn_random:.1f}%" if result.knn_random is not None else "n/a"
        out.print(
            f"kNN top-1 (test split): trained {100 * result.knn_trained:.1f}%  random init {rnd}"
        )
    probe = result.extra.get("probe_test_top1")
    if probe is not None:
        out.print(f"online probe top-1 (test split): {100 * probe:.1f}%")
