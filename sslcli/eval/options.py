"""``EvalOptions``: everything one ``ssl eval`` / :func:`sslcli.api.evaluate` call is asked to
do, checked before any model is built (a typo costs no model build).

Bad values fail as one :class:`~sslcli.errors.EvalError` line naming the flag, as the CLI
prints it. ``lrs``/``wds`` accept a list or a comma-separated string (the CLI's ``--lr``);
after validation both are lists, with the protocol's defaults filled in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from sslcli.config import format_validation_error
from sslcli.errors import EvalError
from sslcli.eval.finetune import DEFAULT_LR as DEFAULT_FT_LR
from sslcli.eval.linear import DEFAULT_LRS
from sslcli.runs.rebuild import Target

Protocol = Literal["knn", "linear", "finetune"]
PROTOCOLS: tuple[str, ...] = ("knn", "linear", "finetune")
_KNN_RULE = "--k must be >= 1 and --temperature > 0"


class EvalOptions(BaseModel):
    """One evaluation: what to measure (protocol and its settings), then where and how.

    ``target`` None: the most recent run under ./runs; ``data`` None: the data the target
    was trained on; ``epochs``/``train_batch_size`` None: the protocol's defaults.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    # Fields are validated in this order, so the first bad flag is the one reported.
    protocol: Protocol
    target: str | Path | Target | None = None
    label_fraction: float | None = None
    holdout: float = 0.1
    k: int = 200
    temperature: float = 0.07
    lrs: list[float] | None = None
    wds: list[float] | None = None
    epochs: int | None = None
    train_batch_size: int | None = None
    augment: bool = False
    head_layer: int | None = None
    seed: int = 0
    data: str | None = None
    which: str | None = None
    device: str = "auto"
    batch_size: int = 256
    num_workers: int = 0
    use_cache: bool = True
    cache_dir: str | Path | None = None
    record: bool = True
    """Append the result to the run's metrics.jsonl."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise EvalError("; ".join(format_validation_error(e, model=EvalOptions))) from None

    @field_validator("protocol", mode="before")
    @classmethod
    def _known_protocol(cls, v: Any) -> Any:
        if v not in PROTOCOLS:
            raise EvalError(f"unknown protocol {v!r}: use one of {', '.join(PROTOCOLS)}")
        return v

    @field_validator("label_fraction")
    @classmethod
    def _fraction(cls, v: float | None) -> float | None:
        if v is not None and not 0 < v <= 1:
            raise EvalError(f"--label-fraction must be in (0, 1], got {v}")
        return v

    @field_validator("holdout")
    @classmethod
    def _holdout(cls, v: float) -> float:
        if not 0 < v < 1:
            raise EvalError(f"--holdout must be in (0, 1), got {v}")
        return v

    @field_validator("k")
    @classmethod
    def _k(cls, v: int) -> int:
        if v < 1:
            raise EvalError(_KNN_RULE)
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float) -> float:
        if v <= 0:
            raise EvalError(_KNN_RULE)
        return v

    @field_validator("lrs", "wds", mode="before")
    @classmethod
    def _numbers(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return [float(x) for x in v.split(",") if x.strip()]
            except ValueError as e:
                raise EvalError(f"expected comma-separated numbers, got {v!r}") from e
        return v

    @model_validator(mode="after")
    def _protocol_settings(self) -> EvalOptions:
        if self.lrs is None:
            self.lrs = list(DEFAULT_LRS if self.protocol == "linear" else (DEFAULT_FT_LR,))
        if self.wds is None:
            self.wds = [0.0]
        if self.protocol == "finetune" and len(self.wds) != 1:
            raise EvalError("fine-tuning takes one --wd value")
        if self.head_layer is not None and (self.protocol != "finetune" or self.head_layer < 0):
            raise EvalError("--head-layer is a layer number >= 0 for fine-tuning only")
        return self
