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
    layers: list[dict[str, Any]] = []
    record: Any = None
    if resume is not None:
        run_json = _run_config_path(Path(resume))
        if run_json is not None:
            layers.append(cfg.load_run_config(run_json))
            record = cfg.load_run_record(run_json)
        else:
            # A bare checkpoint file carries its resolved config in its metadata.
            from sslcli.engine import checkpoint as ckpt

            meta = ckpt.read_meta(Path(resume))
            layers.append(meta["config"])
            record = meta.get("plugin")
    if config is not None:
        layers.append(cfg.read_recipe(config))
    if overrides:
        layers.append(overrides)
    if sets:
        layers.append(cfg.parse_set(sets))
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

    resume_path = None
    if resume is not None:
        resume_path = Path(resume)
        if run.trainer.out is None:
            run.trainer.out = str(
                resume_path if resume_path.is_dir() else resume_path.parent.parent
            )
    trainer = Trainer(run, method_cls, mcfg, resume=resume_path, console=console)
    return trainer.fit()


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
    "resolve_config",
    "train",
]
