"""The public Python API, and the only module the ``ssl`` commands import: each command
parses its flags, calls one function here and prints what it returns.

Heavy modules (the engine, evaluation, reports) are imported on first use so that
``ssl --help`` and ``import sslcli.api`` stay quick.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Errors are part of the API: the commands' one error boundary (cli/app.py) catches them.
from sslcli.errors import ConfigError, Interrupted, SSLError, TargetError

if TYPE_CHECKING:
    from sslcli.engine.result import TrainResult
    from sslcli.eval.options import EvalOptions
    from sslcli.method import Method
    from sslcli.registry import MethodStatus
    from sslcli.runs.compare import CompareResult, RunSummary
    from sslcli.runs.export import ExportResult


# ---------------------------------------------------------------------------------------------
# Methods, backbones, settings
# ---------------------------------------------------------------------------------------------


def load_method(name: str) -> type[Method]:
    """The validated method class registered as ``name``."""
    from sslcli import registry

    return registry.load(name)


def list_methods() -> list[MethodStatus]:
    """Every registered method, with its package, version, and why it is broken if it is."""
    from sslcli import registry

    return registry.list_methods()


def method_options(cls: type[Method]) -> list[dict[str, Any]]:
    """``ssl methods NAME``: each option's key, default, description, whether its default
    depends on the run (``depends_on``) and whether it may change on resume."""
    from sslcli.method import dependent_options, resume_safe_options

    depends = dependent_options(cls.Config)
    safe = resume_safe_options(cls.Config)
    return [
        {"key": key, "default": field.get_default(call_default_factory=True),
         "description": field.description or "", "depends_on": depends.get(key),
         "resume_safe": key in safe}
        for key, field in cls.Config.model_fields.items()
    ]  # fmt: skip


def recipe_files(cls: type[Method]) -> list[str]:
    """Recipe files shipped in the method's package (``--config METHOD:NAME``)."""
    from sslcli import registry

    return registry.recipe_files(cls)


def describe_backbones() -> list[dict[str, Any]]:
    """``ssl backbones``: each alias with its timm model, parameters and feature width."""
    from sslcli.backbones import describe_all

    return describe_all()


def resolve_config(method: str | None = None, **layers: Any) -> tuple[type[Method], Any, Any]:
    """Method class, run config and method config from all layers (``config``,
    ``overrides``, ``sets``, ``resume``): :func:`sslcli.settings.resolve_config`."""
    from sslcli import settings

    return settings.resolve_config(method, **layers)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file (or ``METHOD:RECIPE``) as a nested dict
    (:func:`sslcli.settings.read_recipe`)."""
    from sslcli import settings

    return settings.read_recipe(path)


def latest_run() -> Path:
    """The run under ./runs with the most recent checkpoint."""
    from sslcli.runs.layout import latest_run as latest

    return latest()


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def train(
    method: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume: str | Path | None = None,
    console: Any = None,
    force: bool = False,
) -> TrainResult:
    """Train ``method``; see :class:`sslcli.config.RunConfig` for the override sections.

    Example: ``train("simclr", overrides={"trainer": {"epochs": 1}})``. ``force`` lets a
    new run take over a directory that holds another run (whose files are removed first).
    """
    from sslcli import settings
    from sslcli.engine.trainer import Trainer

    method_cls, run, mcfg = settings.resolve_config(
        method, config=config, overrides=overrides, sets=sets, resume=resume
    )
    resume_path = settings.resume_path(run, resume)
    trainer = Trainer(run, method_cls, mcfg, resume=resume_path, console=console, force=force)
    return trainer.fit()


def plan(
    method: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume: str | Path | None = None,
    processes: int | None = None,
    images: int | None = None,
    memory: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """What ``train`` with the same arguments would build and do, without training or
    writing anything (``ssl train --dry-run``); one JSON-able dict.

    The trainer's own set-up resolves it (so wrong settings fail as in a real run).
    ``processes``: plan for that many torchrun processes (default: ``$WORLD_SIZE`` or 1);
    ``images``: plan for a training set of that many images without opening the data.
    When no layer names the data and the default data set cannot hold one batch (an
    ImageNet recipe), the plan is for ImageNet-1k's training split, and says so.
    """
    import os

    from sslcli import settings
    from sslcli.data.datasets import open_dataset
    from sslcli.engine import plan as dry
    from sslcli.engine.trainer import Trainer

    named = settings.user_layers(config, overrides, sets, resume)
    method_cls, run, mcfg = settings.resolve_config(
        method, config=config, overrides=overrides, sets=sets, resume=resume
    )
    recipe = method_cls.recipe_for(run.backbone.name).model_dump()
    sources = dry.sources_of(
        [("method recipe", {k: v for k, v in recipe.items() if v}), *named]
    )
    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes < 1:
        raise ConfigError([f"--processes: must be >= 1 (got {processes})"])
    if images is not None and images < 1:
        raise ConfigError([f"--images: must be >= 1 (got {images})"])
    note = None
    if images is None and "data.dataset" not in sources:
        n_default = len(open_dataset(run.data.dataset, "train", 8))
        if run.trainer.batch_size > n_default:
            images = dry.IMAGENET_TRAIN_IMAGES
            note = (
                f"no data given and {run.data.dataset!r} ({n_default} images) cannot hold "
                f"one batch of {run.trainer.batch_size}: planned for {images:,} images "
                "(ImageNet-1k train); --data DIR or --images N plans for yours"
            )
    elif images is not None:
        note = f"planned for {images:,} images (--images); the data was not opened"
    resume_path = settings.resume_path(run, resume)
    with dry.record_create_model() as calls:
        trainer = Trainer(
            run, method_cls, mcfg, resume=resume_path, console=console,
            dry_run=dry.DryRun(processes=processes, images=images, note=note),
        )  # fmt: skip
    return dry.describe(trainer, sources=sources, timm_calls=calls, memory=memory)


def evaluate(options: EvalOptions, *, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate a run/checkpoint/export as ``options`` say (``knn``, ``linear`` or
    ``finetune``); one JSON-able dict. Example:
    ``evaluate(EvalOptions(protocol="linear", target="runs/simclr-..."))``."""
    from sslcli.eval.api import evaluate as _evaluate

    return _evaluate(options, say=say or _quiet)


def export(
    target: str | Path | None = None,
    out: str | Path | None = None,
    *,
    which: str | None = None,
    with_heads: bool = False,
    say: Callable[[str], None] = lambda m: None,
) -> ExportResult:
    """Write ``model.safetensors`` + a timm ``config.json`` for ``target`` (default: the most
    recent run under ./runs) into ``out`` (default: the run's ``export[-WHICH]``, or
    ``<checkpoint>-export`` beside a checkpoint outside a run); ``say`` hears which target
    and directory were chosen, and the export's notes."""
    from sslcli.runs.export import default_export_dir, write_export
    from sslcli.runs.targets import load_target

    if target is None:
        target = latest_run()
        say(f"target: {target} (the most recent run under ./runs)")
    t = load_target(target)
    if out is None:
        out = default_export_dir(t, which)
        say(f"out: {out}")
    result = write_export(t, out, which=which, with_heads=with_heads)
    for note in result.notes:
        say(f"note: {note}")
    return result


def compare(
    run_dirs: Sequence[str | Path] = (),
    *,
    methods: Sequence[str] = (),
    plot_path: str | Path | None = None,
    report_path: str | Path | None = None,
    say: Callable[[str], None] = lambda m: None,
    console: Any = None,
    **train_options: Any,
) -> CompareResult:
    """Runs side by side: ``run_dirs`` (default: every run under ./runs), after training
    ``methods`` alike if given (:func:`train_methods`); optionally a PNG of their curves
    (``plot_path``) and one HTML page of them (``report_path``)."""
    from sslcli.runs.compare import CompareResult, find_runs, read_run
    from sslcli.runs.layout import RUNS_DIR

    failures: dict[str, str] = {}
    dirs = [Path(p) for p in run_dirs]
    if methods:
        trained, failures = train_methods(methods, say=say, console=console, **train_options)
        dirs.extend(trained)
    elif not dirs:
        dirs = find_runs()
        if not dirs:
            raise TargetError(f"no run directories given and none under {RUNS_DIR}/")
        say(f"comparing the {len(dirs)} runs under {RUNS_DIR}/")
    result = CompareResult([read_run(d) for d in dirs], failures)
    if plot_path is not None and result.summaries:
        from sslcli.runs.compare import plot

        plot(result.summaries, plot_path)
    if report_path is not None and result.summaries:
        from sslcli.report.compare import write_compare_report

        write_compare_report(result.summaries, report_path)
    return result


def train_methods(
    methods: Sequence[str],
    *,
    data: str | None = None,
    epochs: int | None = None,
    backbone: str | None = None,
    batch_size: int | None = None,
    image_size: int | None = None,
    seed: int | None = None,
    max_steps: int | None = None,
    device: str | None = None,
    out: str | Path | None = None,
    sets: Sequence[str] = (),
    linear: bool = True,
    say: Callable[[str], None] = lambda m: None,
    console: Any = None,
) -> tuple[list[Path], dict[str, str]]:
    """Train ``methods`` with one shared data/budget/seed (``ssl compare --methods``); kNN
    (by the trainer) and, with ``linear``, a linear probe for each. Returns (run
    directories, method -> one-line error for those that failed)."""
    from sslcli.runs.layout import RUNS_DIR

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = Path(out) if out else RUNS_DIR / f"compare-{stamp}"
    shared: dict[str, Any] = {}
    for section, key, value in (
        ("data", "dataset", data), ("data", "image_size", image_size),
        ("backbone", "name", backbone), ("trainer", "epochs", epochs),
        ("trainer", "batch_size", batch_size), ("trainer", "seed", seed),
        ("trainer", "max_steps", max_steps), ("trainer", "device", device),
    ):  # fmt: skip
        if value is not None:
            shared.setdefault(section, {})[key] = value
    runs: list[Path] = []
    failures: dict[str, str] = {}
    for name in methods:
        overrides = json.loads(json.dumps(shared))
        overrides.setdefault("trainer", {})["out"] = str(root / name)
        say(f"compare: training {name} -> {root / name}")
        try:
            result = train(name, overrides=overrides, sets=list(sets), console=console)
        except Interrupted:
            # Ctrl-C / SIGTERM stops the whole comparison, not just this method's run.
            say(f"compare: stopped during {name}; the methods after it were not trained")
            raise
        except SSLError as e:
            failures[name] = str(e)
            say(f"compare: {name} failed: {e}")
            continue
        runs.append(result.run_dir)
        if linear and result.knn_trained is not None:
            # kNN ran, so the data has labelled train/test splits: the probe can run too.
            try:
                from sslcli.eval.options import EvalOptions

                options = {"protocol": "linear", "target": result.run_dir}
                evaluate(EvalOptions(**options, device=device or "auto"))
            except SSLError as e:
                failures[name] = f"linear probe: {e}"
                say(f"compare: {name}: linear probe failed: {e}")
    return runs, failures


def embed(target: str | Path | None = None, **kw: Any) -> Any:
    """Embed every image of a dataset (default: the run's own) with ``target``'s encoder.

    Returns :class:`sslcli.eval.embeddings.Embeddings` (arrays); with ``out=FILE`` the file is
    written too (``.safetensors``, ``.npz`` or ``.parquet``). Example:
    ``embed("runs/simclr-...", data="photos/", neighbors=8).neighbors``.
    """
    from sslcli.eval.embed import embed as _embed

    return _embed(target, **kw)


def embeddings_format(path: str | Path) -> str:
    """The embeddings file format ``path``'s extension names; a one-line error for any other
    (checked before anything is loaded)."""
    from sslcli.eval.embeddings import format_of

    return format_of(path)


def report(run: str | Path | None = None, out: str | Path = "report.html", **kw: Any) -> Any:
    """Write one self-contained HTML report of a run (curves, neighbours, a 2-D map)."""
    from sslcli.report.run import write_report

    return write_report(run, out, **kw)


def memory_warning(memory: dict[str, Any]) -> str | None:
    """The line ``ssl train --dry-run`` prints when a plan's memory estimate exceeds the
    device, else None."""
    from sslcli.engine.memory import memory_warning as warning

    return warning(memory)


def check_compare_format(fmt: str) -> None:
    """A one-line error unless ``ssl compare --format`` accepts ``fmt``."""
    from sslcli.runs.compare import FORMATS

    if fmt not in FORMATS:
        raise SSLError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")


def render_comparison(summaries: Sequence[RunSummary], fmt: str) -> str:
    """The comparison as ``markdown``, ``csv`` or ``json`` text."""
    from sslcli.runs.compare import render

    return render(summaries, fmt)


def comparison_table(summaries: Sequence[RunSummary]) -> Any:
    """The comparison as a rich table (``ssl compare``'s default output)."""
    from sslcli.runs.compare import rich_table

    return rich_table(summaries)


def views(
    method: str | None = None,
    *,
    out: str | Path,
    data: str | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    config: str | Path | None = None,
    sets: list[str] | None = None,
    n: int = 8,
    seed: int | None = None,
) -> list[Path]:
    """Write the views ``train`` would make from ``n`` images with the same resolved settings
    (``seed`` None: the run's), as one grid PNG or a directory of PNGs; the files written."""
    from sslcli import settings
    from sslcli.preview import write_views

    flags: dict[str, Any] = {}
    pairs = {("data", "dataset"): data, ("backbone", "name"): backbone,
             ("data", "image_size"): image_size}  # fmt: skip
    for (section, key), value in pairs.items():
        if value is not None:
            flags.setdefault(section, {})[key] = value
    _, run, _ = settings.resolve_config(method, config=config, overrides=flags, sets=sets or [])
    return write_views(run, Path(out), n=n, seed=run.trainer.seed if seed is None else seed)


def _quiet(msg: str) -> None:
    pass


def __getattr__(name: str) -> Any:
    # EvalOptions validates against the evaluation modules (torch and all): imported when
    # first asked for, so that `ssl --help` and the error boundary stay light.
    if name == "EvalOptions":
        from sslcli.eval.options import EvalOptions

        return EvalOptions
    raise AttributeError(f"module 'sslcli.api' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "Interrupted",
    "SSLError",
    "TargetError",
    "compare",
    "check_compare_format",
    "comparison_table",
    "describe_backbones",
    "embed",
    "embeddings_format",
    "report",
    "evaluate",
    "EvalOptions",
    "export",
    "latest_run",
    "list_methods",
    "load_method",
    "memory_warning",
    "method_options",
    "plan",
    "read_recipe",
    "recipe_files",
    "render_comparison",
    "report",
    "resolve_config",
    "train",
    "train_methods",
    "views",
]
