"""The public Python API; the CLI commands are thin wrappers around these functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sslcli import config as cfg
from sslcli import registry
from sslcli.errors import ConfigError, PluginError
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
    layers = [layer for _, layer in _user_layers(config, overrides, sets, resume)]
    name = method
    for layer in layers:
        name = cfg.method_name_of(layer) or name
    if method:
        name = method
    if not name:
        raise PluginError("no method given: 'ssl train METHOD' ('ssl methods' lists them)")
    method_cls = registry.load(name)
    run, mcfg = cfg.resolve(method_cls, layers)
    return method_cls, run, mcfg


def _user_layers(
    config: str | Path | None,
    overrides: dict[str, Any] | None,
    sets: list[str] | None,
    resume: str | Path | None,
) -> list[tuple[str, dict[str, Any]]]:
    """The user's config layers, lowest precedence first, each with where it came from."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if resume is not None:
        run_json = _run_config_path(Path(resume))
        if run_json is not None:
            layers.append(("resumed run", cfg.load_run_config(run_json)))
        else:
            # A bare checkpoint file carries its resolved config in its metadata.
            from sslcli.engine import checkpoint as ckpt

            layers.append(("resumed run", ckpt.read_meta(Path(resume))["config"]))
    if config is not None:
        layers.append((f"file {Path(config).name}", cfg.read_recipe(config)))
    if overrides:
        layers.append(("flag", overrides))
    if sets:
        layers.append(("--set", cfg.parse_set(sets)))
    return layers


def _run_config_path(resume: Path) -> Path | None:
    for cand in (
        resume / "config.json",
        resume.parent / "config.json",
        resume.parent.parent / "config.json",
    ):
        if cand.is_file():
            return cand
    return None


def train(
    method: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
    resume: str | Path | None = None,
    console: Any = None,
) -> TrainResult:
    """Train ``method``; see :class:`sslcli.config.RunConfig` for the override sections.

    Example: ``train("simclr", overrides={"trainer": {"epochs": 1}})``.
    """
    method_cls, run, mcfg = resolve_config(
        method, config=config, overrides=overrides, sets=sets, resume=resume
    )
    from sslcli.engine.trainer import Trainer

    resume_path = _resume_path(run, resume)
    trainer = Trainer(run, method_cls, mcfg, resume=resume_path, console=console)
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


def evaluate(protocol: str, target: str | Path | None = None, **kw: Any) -> Any:
    """Evaluate a run/checkpoint/export with ``knn``, ``linear`` or ``finetune``."""
    from sslcli.eval.api import evaluate as _evaluate

    return _evaluate(protocol, target, **kw)


def export(target: str | Path | None, out: str | Path, **kw: Any) -> Any:
    """Write ``model.safetensors`` + a timm ``config.json`` for ``target`` into ``out``."""
    from sslcli.exporter import export as _export

    return _export(target, out, **kw)


def compare(run_dirs: Any = (), **kw: Any) -> Any:
    """Collect runs (or train ``methods=[...]``) into one comparison."""
    from sslcli.comparison import compare as _compare

    return _compare(run_dirs, **kw)


__all__ = [
    "compare",
    "evaluate",
    "export",
    "ConfigError",
    "TrainResult",
    "list_methods",
    "load_method",
    "plan",
    "resolve_config",
    "train",
]
