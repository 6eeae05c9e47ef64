"""Method plugins: find (no import) → load (import, errors wrapped) → validate.

Built-in methods register through the same ``sslcli.methods`` entry-point group as
third-party packages. A plugin that fails to import or validate is reported as broken with
a one-line reason; it never stops the others from being listed or run.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points

from pydantic import BaseModel

from sslcli.errors import PluginError, suggest
from sslcli.method import Method, MethodConfig

GROUP = "sslcli.methods"


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


def _entry_points() -> list[EntryPoint]:
    return sorted(entry_points(group=GROUP), key=lambda e: e.name)


def find() -> dict[str, PluginInfo]:
    """All registered method names, without importing any plugin."""
    out: dict[str, PluginInfo] = {}
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        # The first registration of a name wins; a duplicate is shadowed, not an error.
        out.setdefault(ep.name, PluginInfo(ep.name, ep.value, package, version))
    return out


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


@cache
def _load_cached(name: str, value: str) -> type[Method]:
    ep = EntryPoint(name=name, value=value, group=GROUP)
    try:
        obj = ep.load()
    except Exception as e:  # noqa: BLE001 - any import failure makes the plugin "broken"
        raise PluginError(f"method {name!r} ({value}) failed to import: {_error_line(e)}") from e
    validate(name, value, obj)
    return obj


def validate(name: str, value: str, obj: object) -> None:
    """A loaded entry point must be a concrete Method subclass named like its entry point."""
    where = f"method {name!r} ({value})"
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
    try:
        cfg()
    except Exception as e:  # noqa: BLE001 - defaults that do not validate are a plugin bug
        raise PluginError(f"{where}: its Config defaults do not validate: {_error_line(e)}") from e


def load(name: str) -> type[Method]:
    """Import and validate the method called ``name``; PluginError (one line) otherwise."""
    plugins = find()
    info = plugins.get(name)
    if info is None:
        raise PluginError(
            f"unknown method {name!r}{suggest(name, list(plugins))}; 'ssl methods' lists them"
        )
    return _load_cached(info.name, info.value)


@dataclass(frozen=True)
class MethodStatus:
    info: PluginInfo
    cls: type[Method] | None
    error: str | None


def list_methods() -> list[MethodStatus]:
    """Every registered method, loaded; broken ones carry their one-line error."""
    out = []
    for info in find().values():
        try:
            cls = _load_cached(info.name, info.value)
            out.append(MethodStatus(info, cls, None))
        except PluginError as e:
            out.append(MethodStatus(info, None, str(e)))
    return out
