"""Run-time checks of the method contract, at the points where the engine calls a plugin.

The registry checks what it can without running anything (class, name, Config, hook
signatures, defaults, recipes). What only shows once the method runs is checked here:
``__init__`` and ``views()`` raising or returning the wrong thing, ``param_groups()``
leaving a trainable parameter out, ``training_step`` returning something other than a
:class:`~sslcli.method.StepOutput` or logging under a key the engine owns. Each breach is
one :class:`~sslcli.errors.MethodContractError` line naming the method, its package and
version and what was expected (the original exception is chained, so ``SSLCLI_TRACEBACK=1``
shows where it came from).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from torch import Tensor, nn

from sslcli.backbones import Backbone
from sslcli.config import OptimConfig, RunConfig, format_validation_error
from sslcli.data.views import ViewSpec
from sslcli.errors import MethodContractError, SSLError
from sslcli.method import (
    RESERVED_LOG_KEYS,
    Method,
    MethodConfig,
    RunContext,
    StepOutput,
    dependent_options,
)
from sslcli.optim import default_param_groups, is_norm_or_bias
from sslcli.registry import PluginInfo, info_of


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _type_name(obj: object) -> str:
    return type(obj).__name__


def breach(info: PluginInfo, what: str) -> MethodContractError:
    return MethodContractError(f"{info.describe()} broke the method contract: {what}")


def build_method(
    cls: type[Method], config: MethodConfig, backbone: Backbone, dataset_size: int
) -> Method:
    """``cls(config, backbone, dataset_size=...)``; an exception from the plugin's
    ``__init__`` (other than a deliberate :class:`~sslcli.errors.SSLError` about the user's
    settings) is the plugin's bug, reported in one line."""
    info = info_of(cls)
    try:
        method = cls(config, backbone, dataset_size=dataset_size)
    except SSLError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of plugin code is reported as its own
        raise breach(
            info,
            f"__init__(config, backbone, dataset_size) raised {_error_line(e)}; expected it "
            "to build the method's modules",
        ) from e
    if not isinstance(method, Method):  # a __new__ returning something else
        raise breach(info, f"constructing it gave a {_type_name(method)}, not a Method")
    return method


def apply_option_defaults(
    cls: type[Method], run: RunConfig, config: MethodConfig, ctx: RunContext
) -> MethodConfig:
    """``config`` with :meth:`Method.option_defaults` filled in for every option the user
    did not state (recipe file, flag, ``--set`` or a resumed run's config.json), and
    ``run.method_options`` updated so the run's config.json records the values used."""
    info = info_of(cls)
    try:
        values = cls.option_defaults(ctx)
    except SSLError:
        raise
    except Exception as e:  # noqa: BLE001 - the plugin's bug, reported as its own
        raise breach(info, f"option_defaults() raised {_error_line(e)}") from e
    if not isinstance(values, dict):
        raise breach(info, f"option_defaults() returned a {_type_name(values)}, not a dict")
    marked = dependent_options(cls.Config)
    bad = sorted(str(k) for k in values if k not in marked)
    if bad:
        raise breach(
            info,
            f"option_defaults() returned {', '.join(bad)}, not Config options marked "
            f"depends_on(...) (marked: {', '.join(sorted(marked)) or 'none'})",
        )
    stated = config.model_fields_set
    fill = {k: v for k, v in values.items() if k not in stated}
    if not fill:
        return config
    kept = config.model_dump(mode="json", include=set(stated))
    try:
        new = type(config)(**{**fill, **kept})
    except ValidationError as e:
        lines = format_validation_error(e, prefix="method", model=type(config))
        raise breach(info, f"option_defaults() gave an invalid value: {lines[0]}") from e
    run.method_options = new.model_dump(mode="json")
    return new


def check_views(method: Method) -> list[ViewSpec]:
    """``method.views()``: a non-empty list of :class:`ViewSpec`."""
    info = info_of(type(method))
    try:
        specs = method.views()
    except SSLError:
        raise
    except Exception as e:  # noqa: BLE001
        raise breach(info, f"views() raised {_error_line(e)}; expected a list of ViewSpec") from e
    if not isinstance(specs, (list, tuple)) or not specs:
        raise breach(
            info, f"views() returned {_type_name(specs)}; expected a non-empty list of ViewSpec"
        )
    for i, s in enumerate(specs):
        if not isinstance(s, ViewSpec):
            raise breach(
                info,
                f"views()[{i}] is a {_type_name(s)}; expected an sslcli.plugin.ViewSpec "
                "(e.g. ViewSpec(size=..., scale=...))",
            )
    return list(specs)


def param_groups(method: Method, cfg: OptimConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the method's own (``param_groups()``) or the
    engine's default, with the norm/bias exclusion applied to both.

    ``param_groups()`` cannot see ``optim.exclude_norm_bias``, so the engine applies it:
    a method group that sets neither ``weight_decay`` nor ``lars_exclude`` is split into
    its weights and its norms/biases (weight decay 0, no LARS adaptation), as the default
    grouping does. Every trainable parameter must be in exactly one group.
    """
    info = info_of(type(method))
    try:
        custom = method.param_groups()
    except SSLError:
        raise
    except Exception as e:  # noqa: BLE001
        raise breach(
            info, f"param_groups() raised {_error_line(e)}; expected a list of dicts or None"
        ) from e
    if custom is None:
        return default_param_groups(method, cfg)
    if not isinstance(custom, (list, tuple)) or not all(
        isinstance(g, dict) and "params" in g for g in custom
    ):
        raise breach(
            info, "param_groups() must return None or a list of dicts with a 'params' list"
        )
    names = {id(p): n for n, p in method.named_parameters()}
    seen: dict[int, int] = {}
    groups: list[dict[str, Any]] = []
    for gi, g in enumerate(custom):
        params = list(g["params"])
        for p in params:
            if not isinstance(p, nn.Parameter) and not isinstance(p, Tensor):
                raise breach(info, f"param_groups()[{gi}] holds a {_type_name(p)}, not a tensor")
            if id(p) not in names:
                raise breach(info, f"param_groups()[{gi}] holds a tensor that is not a "
                                   "parameter of the method")  # fmt: skip
            if id(p) in seen:
                raise breach(
                    info,
                    f"parameter {names[id(p)]} is in param_groups() {seen[id(p)]} and {gi}; "
                    "expected every trainable parameter in exactly one group",
                )
            seen[id(p)] = gi
        groups.append({**g, "params": params})
    left = [n for n, p in method.named_parameters() if p.requires_grad and id(p) not in seen]
    if left:
        more = f" and {len(left) - 3} more" if len(left) > 3 else ""
        raise breach(
            info,
            f"param_groups() leaves out the trainable parameters {', '.join(left[:3])}{more}; "
            "expected every trainable parameter in exactly one group",
        )
    if not cfg.exclude_norm_bias:
        return groups
    out: list[dict[str, Any]] = []
    for g in groups:
        if "weight_decay" in g or "lars_exclude" in g:
            out.append(g)  # the method decided for this group
            continue
        decay = [p for p in g["params"] if not is_norm_or_bias(names[id(p)], p)]
        no_decay = [p for p in g["params"] if is_norm_or_bias(names[id(p)], p)]
        name = g.get("name", "group")
        if decay:
            out.append({**g, "params": decay})
        if no_decay:
            out.append({**g, "params": no_decay, "name": f"{name}/no_decay",
                        "weight_decay": 0.0, "lars_exclude": True})  # fmt: skip
    return out


def check_step_output(method: Method, out: Any) -> StepOutput:
    """What ``training_step`` returned must be a StepOutput with a scalar floating loss
    that requires grad, and logs of scalars under keys the engine does not own. (Only
    metadata is read: no host sync.)"""
    _check_step_output(method, out)
    return out  # type: ignore[no-any-return]


def _check_step_output(method: Method, out: Any) -> None:
    info = info_of(type(method))
    if not isinstance(out, StepOutput):
        raise breach(
            info,
            f"training_step returned {_type_name(out)}; expected "
            "sslcli.plugin.StepOutput(loss=..., logs={...}, embedding=...)",
        )
    loss = out.loss
    if not isinstance(loss, Tensor):
        raise breach(info, f"StepOutput.loss is a {_type_name(loss)}; expected a scalar tensor")
    if loss.numel() != 1 or not loss.is_floating_point():
        raise breach(
            info,
            f"StepOutput.loss has shape {tuple(loss.shape)} and dtype {loss.dtype}; expected a "
            "floating-point scalar (reduce the per-sample losses)",
        )
    if not loss.requires_grad:
        raise breach(
            info,
            "StepOutput.loss does not require grad; expected a loss computed from the "
            "trainable parameters (was it detached, or computed under torch.no_grad()?)",
        )
    if not isinstance(out.logs, dict):
        raise breach(info, f"StepOutput.logs is a {_type_name(out.logs)}; expected a dict")
    reserved = sorted(RESERVED_LOG_KEYS & out.logs.keys())
    if reserved:
        raise breach(
            info,
            f"StepOutput.logs uses the reserved key(s) {', '.join(map(repr, reserved))}; "
            "the engine writes those itself (see sslcli.plugin.RESERVED_LOG_KEYS): "
            "rename them",
        )
    for k, v in out.logs.items():
        if not (isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.numel() == 1)):
            shape = tuple(v.shape) if isinstance(v, Tensor) else _type_name(v)
            raise breach(
                info, f"StepOutput.logs[{k!r}] is {shape}; expected a number or a 1-element tensor"
            )
    emb = out.embedding
    if emb is not None and not (isinstance(emb, Tensor) and emb.ndim == 2):
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else _type_name(emb)
        raise breach(info, f"StepOutput.embedding is {shape}; expected None or a [B, D] tensor")


__all__ = [
    "breach",
    "build_method",
    "check_step_output",
    "check_views",
    "param_groups",
]
