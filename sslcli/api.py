"""The public Python API; the CLI commands are thin wrappers around these functions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sslcli import config as cfg
from sslcli import registry
from sslcli.errors import ConfigError, PluginError
from sslcli.eval.options import EvalOptions
from sslcli.method import Method

if TYPE_CHECKING:
    from sslcli.engine.trainer import TrainResult


def load_method(name: str) -> type[Method]:
    """The validated method class registered as ``name``."""
    return registry.load(name)


def list_methods() -> list[registry.MethodStatus]:
    return registry.list_methods()


def resolve_config(
    method: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume: str | Path | None = None,
) -> tuple[type[Method], cfg.RunConfig, Any]:
    """Method class, run config and method config from all layers, in precedence order.

    With ``resume``, the run's saved config is the lowest user layer, so
    ``ssl train --resume RUN`` needs nothing else.
    """
    record: Any = None
    if resume is not None:
        _check_resume_target(Path(resume))
        record = _resumed_run(Path(resume))[1]
    layers = [layer for _, layer in _user_layers(config, overrides, sets, resume)]
    if resume is not None:
        trained = cfg.method_name_of(layers[0])
        if method and trained and method != trained:
            # Said first: otherwise the other method's options would be reported one by one.
            raise ConfigError(
                [f"cannot resume {resume} as {method}: this run was trained with {trained} "
                 f"(ssl train {trained} --resume {resume}, or start a new run)"]
            )  # fmt: skip
    name = method
    for layer in layers:
        name = cfg.method_name_of(layer) or name
    if method:
        name = method
    if not name:
        raise PluginError("no method given: 'ssl train METHOD' ('ssl methods' lists them)")
    if method or record is None or name != cfg.method_name_of(layers[0]):
        method_cls = registry.load(name)
    else:
        # Resuming: the package that trained the run, even where another registers the
        # same name; if it is gone, the error says which package the run needs.
        method_cls = registry.load_for_run(name, record, source=f"{resume}")
    run, mcfg = cfg.resolve(method_cls, layers)
    return method_cls, run, mcfg


def _check_resume_target(resume: Path) -> None:
    from sslcli.runs.layout import is_export_dir

    if not resume.exists():
        raise ConfigError([f"--resume {resume}: no such run directory or checkpoint"])
    d = resume if resume.is_dir() else resume.parent
    if is_export_dir(d):
        raise ConfigError(
            [f"--resume {resume}: this is an exported model (ssl export), not a run; "
             "resume needs a run directory or a checkpoint file"]
        )  # fmt: skip


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file (YAML, TOML or JSON) as a nested dict; errors are one line.

    ``METHOD:RECIPE`` (not an existing path) names a recipe file shipped inside the
    method's package (:func:`sslcli.registry.recipe_files`); the layer then names the
    method too, unless the file does."""
    shipped = registry.recipe_reference(str(path))
    if shipped is None:
        return cfg.read_recipe(path)
    layer = cfg.read_recipe(shipped[1])
    if cfg.method_name_of(layer) is None:
        given = layer.get("method")
        layer["method"] = {**(given if isinstance(given, dict) else {}), "name": shipped[0]}
    return layer


def _resumed_run(resume: Path) -> tuple[dict[str, Any], Any]:
    """The resolved config a run directory or checkpoint holds, and its plugin record."""
    run_json = _run_config_path(resume)
    if run_json is not None:
        return cfg.load_run_config(run_json), cfg.load_run_record(run_json)
    # A bare checkpoint file carries its resolved config in its metadata.
    from sslcli.runs import checkpoint as ckpt

    meta = ckpt.read_meta(ckpt.resolve(resume))
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ConfigError([f"cannot resume {resume}: its checkpoint holds no run config"])
    return saved, meta.get("plugin")


def _user_layers(
    config: str | Path | None,
    overrides: dict[str, Any] | None,
    sets: list[str] | None,
    resume: str | Path | None,
) -> list[tuple[str, dict[str, Any]]]:
    """The user's config layers, lowest precedence first, each with where it came from."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if resume is not None:
        layers.append(("resumed run", _resumed_run(Path(resume))[0]))
    if config is not None:
        layers.append((f"file {Path(config).name}", read_recipe(config)))
    if overrides:
        layers.append(("flag", overrides))
    if sets:
        layers.append(("--set", cfg.parse_set(sets)))
    return layers


def _run_config_path(resume: Path) -> Path | None:
    """The config.json of the run ``resume`` names: the directory's own (never a parent's:
    a run directory without one is not inside another run), or, for a checkpoint file, that
    of the run directory it lies in."""
    from sslcli.runs.layout import is_run_dir

    if resume.is_dir():
        cands = [resume] if resume.name != "checkpoints" else [resume.parent]
    else:
        up = resume.parent
        cands = [up.parent] if up.name == "checkpoints" else [up]
    for d in cands:
        if (d / "config.json").is_file() and is_run_dir(d):
            return d / "config.json"
    return None


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
    method_cls, run, mcfg = resolve_config(
        method, config=config, overrides=overrides, sets=sets, resume=resume
    )
    from sslcli.engine.trainer import Trainer

    resume_path = _resume_path(run, resume)
    trainer = Trainer(run, method_cls, mcfg, resume=resume_path, console=console, force=force)
    return trainer.fit()


def _resume_path(run: cfg.RunConfig, resume: str | Path | None) -> Path | None:
    if resume is None:
        return None
    resume_path = Path(resume)
    if run.trainer.out is None:
        run.trainer.out = str(resume_path if resume_path.is_dir() else resume_path.parent.parent)
    return resume_path


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

    from sslcli.data.datasets import open_dataset
    from sslcli.engine import plan as dry
    from sslcli.engine.trainer import Trainer

    named = _user_layers(config, overrides, sets, resume)
    method_cls, run, mcfg = resolve_config(
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
    resume_path = _resume_path(run, resume)
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


def export(target: str | Path | None, out: str | Path, **kw: Any) -> Any:
    """Write ``model.safetensors`` + a timm ``config.json`` for ``target`` into ``out``."""
    from sslcli.runs.export import export as _export

    return _export(target, out, **kw)


def compare(run_dirs: Any = (), *, report_path: str | Path | None = None, **kw: Any) -> Any:
    """Collect runs (or train ``methods=[...]``) into one comparison; with
    ``report_path``, also one HTML page of them side by side."""
    from sslcli.runs.compare import compare as _compare

    result = _compare(run_dirs, **kw)
    if report_path is not None and result.summaries:
        from sslcli.report.compare import write_compare_report

        write_compare_report(result.summaries, report_path)
    return result


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
    from sslcli.preview import write_views

    flags: dict[str, Any] = {}
    pairs = {"data.dataset": data, "backbone.name": backbone, "data.image_size": image_size}
    for key, value in pairs.items():
        if value is not None:
            cfg.set_dotted(flags, key, value)
    _, run, _ = resolve_config(method, config=config, overrides=flags, sets=sets or [])
    return write_views(run, Path(out), n=n, seed=run.trainer.seed if seed is None else seed)


def _quiet(msg: str) -> None:
    pass


__all__ = [
    "compare",
    "embed",
    "embeddings_format",
    "report",
    "evaluate",
    "EvalOptions",
    "export",
    "ConfigError",
    "TrainResult",
    "list_methods",
    "load_method",
    "plan",
    "resolve_config",
    "train",
    "views",
]
