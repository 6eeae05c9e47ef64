"""Method plugins: find (no import) → load (import, errors wrapped) → validate.

Built-in methods register through the same ``sslcli.methods`` entry-point group as
third-party packages. A plugin that fails to import or validate is reported as broken with
a one-line reason; it never stops the others from being listed or run.

Two packages may register the same method name. Nothing is then chosen silently (not even
for a built-in, whose name a third party could otherwise take over by being listed first
in site-packages): ``ssl methods`` shows the clash, a bare name that clashes is refused in
one line naming every package, and a qualified name ``PACKAGE:METHOD`` picks one.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sslcli.errors import ConfigError, PluginError, suggest
from sslcli.method import Method, MethodConfig, RunContext, dependent_options

GROUP = "sslcli.methods"
BUILTIN_PACKAGE = "sslcli"
# Backbones a plugin's recipe is checked for when it is loaded: a convnet, a ViT and the
# tiny test network (recipe_for may branch on the architecture).
RECIPE_CHECK_BACKBONES = ("resnet50", "vit-s", "test_resnet")


@dataclass(frozen=True)
class PluginInfo:
    name: str
    value: str
    """The entry point's ``module:Class``."""
    package: str
    version: str

    @property
    def builtin(self) -> bool:
        return self.value.startswith("sslcli_plugins.")

    @property
    def qualified(self) -> str:
        """``PACKAGE:METHOD``, the name that picks this registration when names clash."""
        return f"{self.package}:{self.name}"

    def describe(self) -> str:
        """``method 'x' (package 1.2.3)``: how every plugin error names its culprit."""
        return f"method {self.name!r} ({self.package} {self.version})"

    def record(self) -> dict[str, str]:
        """What a run stores about the plugin that trained it (config.json, checkpoints)."""
        return {
            "name": self.name,
            "package": self.package,
            "version": self.version,
            "entry_point": self.value,
        }


def normalise_package(name: str) -> str:
    """Distribution names compare like pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _entry_points() -> list[EntryPoint]:
    return sorted(entry_points(group=GROUP), key=lambda e: e.name)


def registrations() -> list[PluginInfo]:
    """Every registration of the group, clashing names included, without importing."""
    out: list[PluginInfo] = []
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        package = (dist.metadata["Name"] if dist is not None else None) or "?"
        version = (dist.version if dist is not None else None) or "?"
        info = PluginInfo(ep.name, ep.value, package, version)
        # One distribution reachable twice on sys.path is one registration, not a clash.
        if info not in out:
            out.append(info)
    return out


def clashes() -> dict[str, list[PluginInfo]]:
    """Method names registered by more than one package (or entry point)."""
    by_name: dict[str, list[PluginInfo]] = {}
    for info in registrations():
        by_name.setdefault(info.name, []).append(info)
    return {k: v for k, v in by_name.items() if len(v) > 1}


def find() -> dict[str, PluginInfo]:
    """One registration per method name, without importing any plugin.

    Where names clash the built-in's (else the first) registration stands for the name in
    this mapping; :func:`load` refuses the bare name all the same.
    """
    out: dict[str, PluginInfo] = {}
    for info in registrations():
        if info.name not in out or (info.builtin and not out[info.name].builtin):
            out[info.name] = info
    return out


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# The registration each loaded class came from (run records and contract errors name it).
_INFO: dict[type, PluginInfo] = {}


@cache
def _load_cached(info: PluginInfo) -> type[Method]:
    ep = EntryPoint(name=info.name, value=info.value, group=GROUP)
    try:
        obj = ep.load()
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - even sys.exit() at import only breaks this plugin
        raise PluginError(
            f"{info.describe()} ({info.value}) failed to import: {_error_line(e)}"
        ) from e
    try:
        validate(info.name, info.value, obj, where=f"{info.describe()} ({info.value})")
    except PluginError:
        raise
    except Exception as e:  # noqa: BLE001 - a class whose attributes raise is broken
        raise PluginError(
            f"{info.describe()} ({info.value}) failed validation: {_error_line(e)}"
        ) from e
    _INFO[obj] = info
    return obj


# What the engine calls, with the arguments it passes (self first).
_SIGNATURES: dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]] = {
    "__init__": ("__init__(self, config, backbone, dataset_size=0)", (0, 0, 0), {}),
    "views": ("views(self)", (0,), {}),
    "training_step": ("training_step(self, batch, step)", (0, 0, 0), {}),
    "param_groups": ("param_groups(self)", (0,), {}),
    "before_optimizer_step": ("before_optimizer_step(self, step)", (0, 0), {}),
    "after_optimizer_step": ("after_optimizer_step(self, step)", (0, 0), {}),
    "embed": ("embed(self, images)", (0, 0), {}),
    "encoder": ("encoder(self)", (0,), {}),
    "export_candidates": ("export_candidates(self)", (0,), {}),
}


def validate(name: str, value: str, obj: object, where: str | None = None) -> None:
    """A loaded entry point must be a concrete Method subclass named like its entry point,
    whose hooks take the engine's arguments and whose Config defaults and recipe validate."""
    where = where or f"method {name!r} ({value})"
    if not (inspect.isclass(obj) and issubclass(obj, Method)):
        raise PluginError(f"{where} is not a subclass of sslcli.Method")
    if obj.name != name:
        raise PluginError(f"{where} declares name {obj.name!r}, but is registered as {name!r}")
    cfg = getattr(obj, "Config", None)
    if not (inspect.isclass(cfg) and issubclass(cfg, BaseModel)):
        raise PluginError(f"{where}: Config is not a pydantic model")
    if not issubclass(cfg, MethodConfig):
        raise PluginError(f"{where}: Config must subclass sslcli.MethodConfig")
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(obj.__abstractmethods__))
        raise PluginError(f"{where} does not implement {missing}")
    for attr, (expected, args, kwargs) in _SIGNATURES.items():
        fn = getattr(obj, attr, None)
        if not callable(fn):
            raise PluginError(f"{where}: {attr} is not a method; expected {expected}")
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            continue  # a builtin or C function: nothing to check
        try:
            sig.bind(*args, **kwargs)
        except TypeError:
            raise PluginError(
                f"{where}: {attr}{sig} cannot be called as {expected}"
            ) from None
    _validate_defaults(cfg, where)
    _validate_recipes(obj, where)
    _validate_option_defaults(obj, where)


def _validate_defaults(cfg: type[BaseModel], where: str) -> None:
    """pydantic does not validate defaults: do it once, here, so a bad default is the
    plugin's error at load time and not the user's at train time."""
    from pydantic import ValidationError

    from sslcli.config import format_validation_error

    try:
        defaults = cfg().model_dump()
        cfg.model_validate(defaults)
    except ValidationError as e:
        lines = format_validation_error(e, prefix="method")
        raise PluginError(f"{where}: its Config defaults do not validate: {lines[0]}") from e
    except Exception as e:  # noqa: BLE001 - defaults that cannot even be built
        raise PluginError(f"{where}: its Config defaults do not validate: {_error_line(e)}") from e


def _validate_recipes(cls: type[Method], where: str) -> None:
    """The method's recipe must validate over sslcli's settings for every architecture it
    may branch on; a typo there is the plugin's error, not the user's."""
    from sslcli import config as cfg

    for backbone in RECIPE_CHECK_BACKBONES:
        try:
            cfg.resolve(cls, [{"backbone": {"name": backbone}}])
        except ConfigError as e:
            raise PluginError(
                f"{where}: method {cls.name}'s recipe (for backbone {backbone}): {e.lines[0]}"
            ) from e
        except Exception as e:  # noqa: BLE001 - recipe_for itself raised
            raise PluginError(
                f"{where}: method {cls.name}'s recipe (for backbone {backbone}): "
                f"{_error_line(e)}"
            ) from e


# Runs the option_defaults hook is tried on at load time: ImageNet on a GPU, a small CPU run.
OPTION_CHECK_RUNS = (
    RunContext("resnet50", 2048, 224, 1_281_167, "cuda"),
    RunContext("resnet18", 512, 32, 50_000, "cpu"),
)


def _validate_option_defaults(cls: type[Method], where: str) -> None:
    """What ``option_defaults`` returns for typical runs must be marked options that
    validate: a bad value is the plugin's error at load time, not a run's."""
    from pydantic import ValidationError

    from sslcli.config import format_validation_error

    marked = dependent_options(cls.Config)
    for ctx in OPTION_CHECK_RUNS:
        run = f"{ctx.backbone}, {ctx.dataset_size} images, {ctx.device}"
        try:
            values = cls.option_defaults(ctx)
        except Exception as e:  # noqa: BLE001 - the plugin's hook raised
            raise PluginError(f"{where}: option_defaults({run}) raised {_error_line(e)}") from e
        if not isinstance(values, dict):
            raise PluginError(f"{where}: option_defaults() returned a {type(values).__name__}")
        bad = sorted(str(k) for k in values if k not in marked)
        if bad:
            raise PluginError(
                f"{where}: option_defaults() returned {', '.join(bad)}, not Config options "
                f"marked depends_on(...) (marked: {', '.join(sorted(marked)) or 'none'})"
            )
        try:
            cls.Config(**values)
        except ValidationError as e:
            line = format_validation_error(e, prefix="method")[0]
            raise PluginError(f"{where}: option_defaults({run}) is invalid: {line}") from e


def _resolve(name: str) -> PluginInfo:
    """The registration ``name`` (``METHOD`` or ``PACKAGE:METHOD``) means; one line if none
    or if a bare name clashes."""
    regs = registrations()
    package, sep, method = name.rpartition(":")
    if sep:
        want = normalise_package(package)
        hits = [r for r in regs if r.name == method and normalise_package(r.package) == want]
        if hits:
            return hits[0]
        same = [r.qualified for r in regs if r.name == method]
        hint = f" (registered by: {', '.join(same)})" if same else ""
        raise PluginError(
            f"unknown method {name!r}: package {package!r} registers no method {method!r}"
            f"{hint}; 'ssl methods' lists them"
        )
    hits = [r for r in regs if r.name == name]
    if not hits:
        names = sorted({r.name for r in regs})
        raise PluginError(
            f"unknown method {name!r}{suggest(name, names)}; 'ssl methods' lists them"
        )
    if len(hits) > 1:
        who = ", ".join(f"{r.package} {r.version} ({r.value})" for r in hits)
        pick = " or ".join(repr(r.qualified) for r in hits)
        raise PluginError(
            f"method {name!r} is registered by several packages: {who}; "
            f"name one as PACKAGE:METHOD ({pick}) or uninstall one"
        )
    return hits[0]


def load(name: str) -> type[Method]:
    """Import and validate the method called ``name`` (or ``PACKAGE:METHOD``); PluginError
    (one line) otherwise."""
    return _load_cached(_resolve(name))


def info_of(cls: type[Method]) -> PluginInfo:
    """The registration ``cls`` was loaded from; for a class used directly (not through
    the registry, e.g. in a test) the distribution its module belongs to."""
    info = _INFO.get(cls)
    if info is not None:
        return info
    for reg in registrations():
        if reg.value == f"{cls.__module__}:{cls.__qualname__}":
            return reg
    package, version = "?", "?"
    try:
        from importlib.metadata import packages_distributions
        from importlib.metadata import version as dist_version

        top = cls.__module__.partition(".")[0]
        dists = packages_distributions().get(top)
        if dists:
            package, version = dists[0], dist_version(dists[0])
    except Exception:  # noqa: BLE001 - a best-effort description only
        pass
    return PluginInfo(cls.name, f"{cls.__module__}:{cls.__qualname__}", package, version)


def load_for_run(name: str, record: Any, source: str = "this run") -> type[Method]:
    """The method a saved run (config.json / checkpoint metadata) was trained with.

    ``record`` is the run's plugin record ({"package", "version", ...}, or None for runs
    from before it was kept). Where the package is not installed, the error says which
    package and version the run needs, rather than "unknown method".
    """
    if not isinstance(record, dict) or not isinstance(record.get("package"), str):
        return load(name)
    package, version = record["package"], str(record.get("version", "?"))
    regs = [r for r in registrations() if r.name == name]
    mine = [r for r in regs if normalise_package(r.package) == normalise_package(package)]
    if mine:
        return _load_cached(mine[0])
    if package == BUILTIN_PACKAGE or not regs:
        pin = f"=={version}" if version not in ("", "?") else ""
        raise PluginError(
            f"{source} was trained with method {name!r} from the package {package} {version}, "
            f"which is not installed: pip install '{package}{pin}'"
        )
    # The method now comes from another package: use it if it is the only one, but say so.
    found = _resolve(name)
    import warnings

    warnings.warn(
        f"{source} was trained with method {name!r} from {package} {version}; "
        f"using {found.package} {found.version}",
        stacklevel=2,
    )
    return _load_cached(found)


@dataclass(frozen=True)
class MethodStatus:
    info: PluginInfo
    cls: type[Method] | None
    error: str | None
    clash: tuple[PluginInfo, ...] = ()
    """Other registrations of the same name (a bare name then needs PACKAGE:METHOD)."""


def list_methods() -> list[MethodStatus]:
    """Every registration, loaded; broken ones carry their one-line error, clashing ones
    the other registrations of their name."""
    regs = registrations()
    out = []
    for info in regs:
        clash = tuple(r for r in regs if r.name == info.name and r != info)
        try:
            cls = _load_cached(info)
            out.append(MethodStatus(info, cls, None, clash))
        except PluginError as e:
            out.append(MethodStatus(info, None, str(e), clash))
    return out


RECIPE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")


def recipe_files(cls: type[Method]) -> dict[str, Path]:
    """The recipe files a method's package ships, by name (file stem): the files in
    ``cls.recipes_dir``, a folder next to the module that defines the class. Built-ins ship
    none (their ``examples/recipes/`` are not installed); {} when the folder is absent."""
    rel = getattr(cls, "recipes_dir", None)
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    if not rel or not file:
        return {}
    folder = Path(file).resolve().parent / rel
    if not folder.is_dir():
        return {}
    return {
        p.stem: p
        for p in sorted(folder.iterdir())
        if p.suffix in RECIPE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    }


def recipe_reference(ref: str) -> tuple[str, Path] | None:
    """``METHOD:RECIPE`` (or ``PACKAGE:METHOD:RECIPE``) as (method, file) when ``ref`` is
    such a name and not an existing path; None for a plain path. One line when the method
    ships no recipe of that name, listing those it ships."""
    if Path(ref).exists() or ":" not in ref:
        return None
    method, _, name = ref.rpartition(":")
    bare = method.rpartition(":")[2]
    if not method or bare not in {r.name for r in registrations()}:
        return None  # a path with a colon in it; read_recipe says it is missing
    cls = load(method)
    files = recipe_files(cls)
    if name in files:
        return method, files[name]
    have = ", ".join(files) or "none"
    # The built-ins' recipes are files in sslcli's repository, not installed package data.
    hint = "; give a recipe file's path" if info_of(cls).builtin and not files else ""
    raise ConfigError(
        [f"--config {ref}: method {method} ships no recipe {name!r}"
         f"{suggest(name, list(files))} (its recipes: {have}){hint}"]
    )  # fmt: skip
