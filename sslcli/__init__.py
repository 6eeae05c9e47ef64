"""sslcli: self-supervised visual representation learning from the command line.

The public API: :func:`train`, :func:`evaluate` (with :class:`EvalOptions`), :func:`export`,
:func:`compare`, :func:`embed`, :func:`report`, :func:`list_methods`, :func:`load_method`,
:func:`load_timm`, :func:`load_heads`, and :class:`Method` / :class:`MethodConfig` for plugin
authors. Heavy modules are imported on first use so ``import sslcli`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Method": "sslcli.method",
    "MethodConfig": "sslcli.method",
    "Recipe": "sslcli.method",
    "Batch": "sslcli.method",
    "StepInfo": "sslcli.method",
    "StepOutput": "sslcli.method",
    "ViewSpec": "sslcli.data.views",
    "TrainResult": "sslcli.engine.result",
    "train": "sslcli.api",
    "list_methods": "sslcli.api",
    "load_method": "sslcli.api",
    "resolve_config": "sslcli.api",
    "evaluate": "sslcli.api",
    "EvalOptions": "sslcli.api",
    "export": "sslcli.api",
    "compare": "sslcli.api",
    "embed": "sslcli.api",
    "report": "sslcli.api",
    "load_embeddings": "sslcli.eval.embeddings",
    "load_timm": "sslcli.runs.export",
    "load_heads": "sslcli.runs.heads",
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sslcli' has no attribute {name!r}")
