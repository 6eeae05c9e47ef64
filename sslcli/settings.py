"""Where a run's settings come from, lowest precedence first: the method's recipe, a resumed
run's saved config, a recipe file (``--config``, or ``METHOD:RECIPE`` shipped in a plugin
package), flags, ``--set``. :func:`resolve_config` merges them into the validated run and
method configs that ``ssl train`` and ``ssl train --dry-run`` both use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sslcli import config as cfg
from sslcli import registry
from sslcli.errors import ConfigError, PluginError
from sslcli.method import Method
from sslcli.runs import checkpoint as ckpt
from sslcli.runs.layout import is_export_dir, is_run_dir


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
    layers = [layer for _, layer in user_layers(config, overrides, sets, resume)]
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
    meta = ckpt.read_meta(ckpt.resolve(resume))
    saved = meta.get("config")
    if not isinstance(saved, dict):
        raise ConfigError([f"cannot resume {resume}: its checkpoint holds no run config"])
    return saved, meta.get("plugin")


def user_layers(
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
    if resume.is_dir():
        cands = [resume] if resume.name != "checkpoints" else [resume.parent]
    else:
        up = resume.parent
        cands = [up.parent] if up.name == "checkpoints" else [up]
    for d in cands:
        if (d / "config.json").is_file() and is_run_dir(d):
            return d / "config.json"
    return None


def resume_path(run: cfg.RunConfig, resume: str | Path | None) -> Path | None:
    if resume is None:
        return None
    resume_path = Path(resume)
    if run.trainer.out is None:
        run.trainer.out = str(resume_path if resume_path.is_dir() else resume_path.parent.parent)
    return resume_path
