"""Run settings, validated by pydantic.

Precedence, lowest first: sslcli's defaults < the method's official recipe
(``Method.recipe``) < a recipe file (``--config``, YAML/TOML/JSON) < command-line flags <
``--set section.key=value``. The resolved result is written to the run directory.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import tomllib
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sslcli.errors import ConfigError, suggest


class _Section(BaseModel):
    # inf/nan are never meaningful settings (lr=inf trains a run of NaN weights).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataConfig(_Section):
    dataset: str = Field(
        "digits",
        description="'digits' (embedded), a directory (format detected) or 'format:DIR'.",
    )
    image_size: int = Field(16, ge=8, le=1024, description="Side of the training views.")
    load_size: int | None = Field(
        None,
        ge=8,
        description="Side of the evaluation squares (shorter side resized, centre crop) and "
        "of in-memory arrays before cropping (default: image_size); training views of image "
        "files are cut from the original image.",
    )
    num_workers: int | None = Field(
        None, ge=0, description="Decoding workers (default: 0 for in-memory data, else #cores)."
    )
    gpu_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="JPEG folders on CUDA: workers read bytes, the GPU decodes batches "
        "(nvJPEG). 'off' when workers keep up or nvJPEG fails on your files.",
    )
    cache: Literal["off", "device"] = Field(
        "off",
        description="'device': hold the decoded dataset on the training device as one "
        "uint8 tensor (data that fits in GPU memory, e.g. CIFAR).",
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Fail when more than this fraction of files is corrupt."
    )


class BackboneConfig(_Section):
    name: str = Field("resnet18", description="An alias ('ssl backbones') or any timm model.")
    small_stem: bool | None = Field(
        None, description="CIFAR-style stem / small ViT patches; default: image_size <= 64."
    )
    drop_path_rate: float = Field(0.0, ge=0, lt=1, description="Stochastic depth (ViTs).")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for timm.create_model (architecture "
        "arguments only: sslcli.backbones.FILE_SAFE_KWARGS).",
    )

    @field_validator("kwargs")
    @classmethod
    def _safe_kwargs(cls, v: dict[str, Any]) -> dict[str, Any]:
        # Configs come from files too (recipes, a run's config.json): no argument that
        # makes timm open a file may pass.
        from sslcli.backbones import FILE_SAFE_KWARGS

        bad = sorted(str(k) for k in v if k not in FILE_SAFE_KWARGS)
        if bad:
            raise ValueError(
                f"{', '.join(bad)} not allowed (architecture arguments only: "
                f"{', '.join(sorted(FILE_SAFE_KWARGS))})"
            )
        return v


class OptimConfig(_Section):
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = Field(0.03, gt=0, description="Base learning rate, before batch-size scaling.")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "linear",
        description="linear: lr*B/256; sqrt: lr*sqrt(B) (SimCLR's small-batch rule); none.",
    )
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-4, ge=0)
    exclude_norm_bias: bool = Field(
        True, description="No weight decay (and no LARS adaptation) for norms and biases."
    )
    lars_eta: float = Field(0.001, gt=0, description="LARS trust coefficient.")
    grad_clip: float | None = Field(None, gt=0, description="Gradient clipping threshold.")
    grad_clip_mode: Literal["norm", "per_tensor"] = Field(
        "norm", description="norm: global norm; per_tensor: each tensor's norm (DINO)."
    )


class ScheduleConfig(_Section):
    kind: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float | None = Field(
        None,
        ge=0,
        description="Linear warm-up, kept exactly as stated (file, flag or --set); unset: "
        "the method's built-in warm-up, capped at 10% of the run (said in one line when it is).",
    )
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="Cosine ends at lr * this.")
    milestones: list[float] = Field(
        default_factory=list,
        description="Step decays: at these epochs (>= 1), or at these fractions of the run "
        "(0 < m < 1, as method recipes state them so they fit runs of any length).",
    )
    gamma: float = Field(
        0.1, gt=0, le=1, description="Step-decay factor, applied once more at each milestone."
    )
    milestone_factors: list[float] | None = Field(
        None,
        description="One lr factor per milestone, relative to the base lr (not to the "
        "previous step), used instead of gamma: InvaSpread's [0.1, 0.05, 0.01] at epochs "
        "[120, 160, 200].",
    )
    weight_decay_end: float | None = Field(
        None, ge=0, description="Cosine weight-decay schedule to this value (DINO)."
    )


class TrainerConfig(_Section):
    epochs: int = Field(
        4, ge=1, description="Default sized for a quick CPU run on digits (about two minutes)."
    )
    batch_size: int = Field(
        128,
        ge=2,
        description="Global batch: images per step over all processes (split evenly "
        "across torchrun processes; views are extra).",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    seed: int = Field(0, ge=0, le=2**32 - 1, description="0 .. 2**32-1.")
    out: str | None = Field(None, description="Run directory (default runs/<method>-<time>).")
    log_every: int = Field(10, ge=1, description="Steps between logged lines (host syncs).")
    keep_checkpoints: int = Field(2, ge=1, description="Recent epoch checkpoints kept.")
    compile: bool = Field(False, description="torch.compile the encoder (CUDA).")
    channels_last: bool | None = Field(None, description="Default: on for convnets on CUDA.")
    skip_nonfinite: int = Field(0, ge=0, description="Non-finite steps tolerated before stop.")
    eval_knn: bool = Field(True, description="kNN top-1 vs random init at the end (labels).")
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.07, gt=0)
    knn_max_train: int | None = Field(
        100_000,
        ge=1,
        description="Reference images of the training kNN monitor: a larger labelled "
        "training split is subsampled to this many (a fixed random subset drawn from "
        "trainer.seed, the same before and after training); null: the whole split. "
        "`ssl eval knn` always uses every image.",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="Stop after this many steps; schedules still span trainer.epochs, so "
        "the run can be resumed with a larger value.",
    )
    sync_bn: bool = Field(
        False,
        description="Synchronise BatchNorm statistics across processes under torchrun "
        "(SimCLR's global BN); no effect on one process.",
    )
    tensorboard: bool = Field(
        False,
        description="Also write TensorBoard scalars to RUN_DIR/tensorboard (needs the "
        "tensorboard package).",
    )
    online_probe: bool = Field(
        False,
        description="Train a linear classifier on detached features of the evaluated "
        "encoder during training and log its accuracy each epoch (labelled data only; "
        "never changes the encoder).",
    )
    online_probe_lr: float = Field(0.1, gt=0, description="SGD learning rate of the probe.")
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Also checkpoint every N steps (long epochs: bounds the work a crash loses).",
    )
    grad_checkpointing: bool = Field(
        False,
        description="Activation checkpointing in the encoder (timm's set_grad_checkpointing; "
        "ViTs and ResNets): blocks are recomputed in backward, so activations take a "
        "fraction of the memory for about one more forward pass. Same results.",
    )


class RunConfig(_Section):
    method: str = ""
    data: DataConfig = Field(default_factory=DataConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    method_options: dict[str, Any] = Field(default_factory=dict, alias="method_config")

    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, populate_by_name=True, allow_inf_nan=False
    )

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        for m in self.schedule.milestones:
            if m <= 0:
                raise ValueError(f"milestone {m} must be > 0 (an epoch, or a fraction < 1)")
            if m > self.trainer.epochs:
                raise ValueError(f"milestone {m} is beyond trainer.epochs={self.trainer.epochs}")
        factors = self.schedule.milestone_factors
        if factors is not None:
            if len(factors) != len(self.schedule.milestones):
                raise ValueError(
                    f"schedule.milestone_factors has {len(factors)} values for "
                    f"{len(self.schedule.milestones)} milestones; give one per milestone"
                )
            if any(f <= 0 for f in factors):
                raise ValueError("schedule.milestone_factors must all be > 0")
        return self

    def to_json_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", by_alias=False)
        opts = d.pop("method_options")
        return {**d, "method": {"name": self.method, **opts}}

    @classmethod
    def from_json_dict(cls, d: dict[str, Any]) -> RunConfig:
        """The inverse of :meth:`to_json_dict`: a run's ``config.json`` as a RunConfig."""
        d = {k: v for k, v in d.items() if k not in RUN_RECORDS}
        opts = dict(d.pop("method", None) or {})
        name = opts.pop("name", "")
        return cls(method=name, method_config=opts, **d)


SECTIONS = ("data", "backbone", "optim", "schedule", "trainer")


# -- loading and merging ---------------------------------------------------------------------
def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML, TOML or JSON recipe file as a nested dict; errors are one line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        text = p.read_text()
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"cannot read config file {p}: {e}"]) from e
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError([f"cannot parse config file {p}: {first}"]) from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {p} must hold a mapping of sections"])
    return data


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.1", "method.temperature=0.2"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or "." not in key:
            raise ConfigError([f"--set {item!r}: expected section.key=value"])
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value)
    return out


def flatten_dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: nested settings as ``section.key`` paths (the
    inverse of :func:`set_dotted`); an empty dict stays one value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_dotted(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for part in parts[:-1]:
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError([f"{key}: {part!r} is a value, not a section"])
        cur = nxt
    cur[parts[-1]] = value


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def method_name_of(layer: dict[str, Any]) -> str | None:
    m = layer.get("method")
    if isinstance(m, str):
        return m
    if isinstance(m, dict) and isinstance(m.get("name"), str):
        return m["name"]
    return None


def resolve(
    method_cls: Any,
    layers: list[dict[str, Any]],
) -> tuple[RunConfig, Any]:
    """Merge ``layers`` (lowest precedence first) over the method's recipe and validate.

    Returns the run config and the method's validated ``Config`` instance. All problems are
    collected into one :class:`ConfigError` with a line per field.
    """
    layers = [_normalise_layer(layer) for layer in layers]
    recipe = method_cls.recipe_for(_backbone_name(method_cls, layers)).model_dump()
    # The recipe's warm-up stays out of the config: ``schedule.warmup_epochs`` is None unless
    # a file, a flag or --set states one, so the trainer knows a stated warm-up (kept as
    # stated) from the built-in default (capped on short runs: engine.schedule.warmup_steps).
    recipe.get("schedule", {}).pop("warmup_epochs", None)
    merged: dict[str, Any] = {k: v for k, v in recipe.items() if v}
    for layer in layers:
        merged = deep_merge(merged, layer)
    method_opts = merged.pop("method", {}) or {}
    method_opts.pop("name", None)
    errors: list[str] = []
    unknown = [k for k in merged if k not in SECTIONS]
    for k in unknown:
        errors.append(f"{k}: unknown section (expected one of {', '.join(SECTIONS)}, method)")
        merged.pop(k)
    run: RunConfig | None = None
    try:
        run = RunConfig(method=method_cls.name, **merged)
    except ValidationError as e:
        errors.extend(format_validation_error(e, model=RunConfig))
    mcfg = None
    try:
        mcfg = method_cls.Config(**method_opts)
    except ValidationError as e:
        errors.extend(format_validation_error(e, prefix="method", model=method_cls.Config))
    if errors or run is None:
        raise ConfigError(errors)
    run.method_options = mcfg.model_dump(mode="json")
    return run, mcfg


def _backbone_name(method_cls: Any, layers: list[dict[str, Any]]) -> str:
    """The backbone the run will use, known before the recipe is chosen: the last layer
    that names one, else the method's base recipe, else the default."""
    for layer in reversed(layers):
        b = layer.get("backbone")
        if isinstance(b, dict) and isinstance(b.get("name"), str):
            return b["name"]
    name = method_cls.recipe.backbone.get("name")
    return name if isinstance(name, str) else BackboneConfig.model_fields["name"].default


def _normalise_layer(layer: dict[str, Any]) -> dict[str, Any]:
    layer = dict(layer)
    m = layer.get("method")
    if isinstance(m, str):
        layer["method"] = {"name": m}
    return layer


def _fields_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The option names of the (nested) model that holds ``loc``'s last part."""
    cur = model
    for part in loc[:-1]:
        if cur is None:
            return []
        field = cur.model_fields.get(str(part))
        ann = field.annotation if field is not None else None
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return list(cur.model_fields) if cur is not None else []


# pydantic prefixes the message of a ValueError / assert raised in a validator.
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


def format_validation_error(
    e: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> list[str]:
    """One line per bad field; ``model`` (the validated class) lets an unknown option get
    a "did you mean"."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        path = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"]
        for pre in _PYDANTIC_PREFIXES:
            msg = msg.removeprefix(pre)
        if err["type"] == "extra_forbidden":
            known = _fields_at(model, tuple(err["loc"]))
            msg = "unknown option" + suggest(str(err["loc"][-1]), known)
        got = err.get("input")
        shown = (
            ""
            if err["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"{path or '<root>'}: {msg}{shown}")
    return lines


def save_json(config: RunConfig, path: Path, extra: dict[str, Any] | None = None) -> None:
    """The resolved config; ``extra`` adds top-level records that are not settings (the
    plugin that trained the run), which :func:`load_run_config` leaves out again. Written
    atomically: a full disk leaves the previous file, never an empty one."""
    from sslcli.fsutil import atomic_write_text

    text = json.dumps({**config.to_json_dict(), **(extra or {})}, indent=2) + "\n"
    atomic_write_text(path, text)


# Top-level keys of a run's config.json that are records, not settings.
RUN_RECORDS = ("plugin",)


def _read_run_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError([f"cannot read the run config {path}: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError([f"{path} does not hold a run config (a JSON object)"])
    return data


def load_run_config(path: Path) -> dict[str, Any]:
    """The resolved config of a run directory, as a recipe layer (records left out)."""
    data = _read_run_json(path)
    for key in RUN_RECORDS:
        data.pop(key, None)
    return data


def load_run_record(path: Path, key: str = "plugin") -> Any:
    """A record a run keeps in its config.json next to the settings, or None."""
    return _read_run_json(path).get(key)
