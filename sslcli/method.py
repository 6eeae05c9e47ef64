"""The contract every method plugin implements.

A method is a :class:`torch.nn.Module` subclass of :class:`Method`, registered under the
entry-point group ``sslcli.methods``. The engine only ever talks to this interface, so a
third-party package can add a method without touching sslcli.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from sslcli.backbones import Backbone
from sslcli.data.views import ViewSpec

RESUME_SAFE: dict[str, Any] = {"resume_safe": True}
"""Mark of a Config option that may change when a run is resumed:
``Field(0.1, json_schema_extra=RESUME_SAFE)``. For options that only weigh or shape the
loss (temperatures, loss weights, augmentation probabilities), read from ``self.config`` at
every step and never copied into a buffer or the architecture. Unmarked options are refused
on resume: a checkpoint only fits the architecture it was saved from."""


def depends_on(what: str) -> dict[str, Any]:
    """Mark of a Config option whose default :meth:`Method.option_defaults` supplies from
    the run (``what``: e.g. ``"backbone"``, ``"data set size"``):
    ``Field(None, json_schema_extra=depends_on("data set size"))``. ``ssl methods NAME``
    shows it; only marked options may be returned by the hook."""
    return {"depends_on": what}


def _field_extra(config_cls: type[BaseModel], key: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, f in config_cls.model_fields.items():
        extra = f.json_schema_extra
        if isinstance(extra, dict) and extra.get(key) not in (None, False):
            out[name] = extra[key]
    return out


def resume_safe_options(config_cls: type[BaseModel]) -> frozenset[str]:
    """Names of ``config_cls``'s options marked :data:`RESUME_SAFE`."""
    return frozenset(_field_extra(config_cls, "resume_safe"))


def dependent_options(config_cls: type[BaseModel]) -> dict[str, str]:
    """Options marked with :func:`depends_on`, with what each depends on."""
    return {k: str(v) for k, v in _field_extra(config_cls, "depends_on").items()}


@dataclass(frozen=True)
class RunContext:
    """What :meth:`Method.option_defaults` may size options from."""

    backbone: str
    """The timm model name (aliases resolved)."""
    feature_dim: int
    """Width of the backbone's pooled features."""
    image_size: int
    """Side of the training views (``data.image_size``)."""
    dataset_size: int
    """Images in the training set."""
    device: str
    """``"cpu"`` or ``"cuda"``."""


class MethodConfig(BaseModel):
    """Base of every method's ``Config``: unknown keys are errors, defaults = official recipe.
    inf/nan are refused (no method option means anything at infinity)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Recipe(BaseModel):
    """Run-level defaults a method brings (its official optimiser and schedule).

    They sit between sslcli's generic defaults and the user's recipe file / flags, so
    ``ssl train byol`` uses LARS with BYOL's learning rate without the user saying so.
    Values are plain nested dicts over :class:`sslcli.config.RunConfig` sections.
    """

    model_config = ConfigDict(extra="forbid")

    optim: dict[str, Any] = {}
    schedule: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    backbone: dict[str, Any] = {}


@dataclass
class Batch:
    """What a training step receives."""

    views: list[Tensor]
    """One float tensor [B, 3, h, w] per expanded view, in the order of ``views()``."""
    index: Tensor
    """Dataset indices of the samples (memory-bank methods need them), int64 [B]."""
    labels: Tensor | None = None
    """Class labels when the data has them (never used by the SSL loss itself)."""
    index_distinct: bool = False
    """True when no index occurs twice in the global batch. The trainer's batches always
    are (each epoch is a permutation of the data); a memory bank then skips the check for
    repeats, which costs a host sync."""

    @property
    def size(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class StepInfo:
    """Where the run is; schedules are pure functions of these numbers."""

    step: int
    """Global optimiser step, starting at 0."""
    epoch: int
    total_steps: int
    steps_per_epoch: int

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1)."""
        return self.step / max(1, self.total_steps)


RESERVED_LOG_KEYS: frozenset[str] = frozenset(
    {"step", "epoch", "lr", "loss", "images_per_s", "emb_std", "event", "reason", "time"}
)
"""Keys the engine writes into every logged line itself; a method's ``StepOutput.logs``
may not use them (the run stops with one line naming the method)."""


@dataclass
class StepOutput:
    """A training step's result."""

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    """Scalars to log; tensors stay on the device until a log step (no host sync per step).
    Not under :data:`RESERVED_LOG_KEYS`."""
    embedding: Tensor | None = None
    """A [B, D] embedding whose per-dimension std is logged to make collapse visible."""


class Method(nn.Module, metaclass=ABCMeta):
    """Base class of every self-supervised method.

    Subclasses set ``name`` (equal to the entry-point name), ``Config`` (a
    :class:`MethodConfig`), optionally ``recipe`` (official optimiser/schedule defaults),
    and implement :meth:`views` and :meth:`training_step`. Every piece of state (momentum
    encoders, queues, memory banks, centres) must be a parameter or a registered buffer so
    ``state_dict()`` captures it and resume is exact.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    recipe: ClassVar[Recipe] = Recipe()
    recipes_dir: ClassVar[str | None] = "recipes"
    """Folder of recipe files the method's package ships, relative to the directory of the
    module that defines the class: ``recipes/imagenet.toml`` next to the module is named
    ``--config METHOD:imagenet``. Declare it as package data so it is installed."""
    needs_dataset_size: ClassVar[bool] = False
    """True for methods that keep one row per training image (memory banks)."""
    zero_init_last: ClassVar[bool | None] = None
    """How the method's official code initialises the last normalisation layer of each
    residual block: True = γ starts at 0 (timm's ``zero_init_last``, torchvision's
    ``zero_init_residual``), False = at 1 (the plain initialisation). The backbone
    factory passes it to ResNet-family timm models (only those that take the argument);
    a user's ``backbone.kwargs.zero_init_last`` wins. None (the default, for plugins that
    do not say) keeps the model's own default: timm zeroes it for its ResNets, not for
    its SK-ResNets. Built-ins state the value with the line of the official code."""

    def __init__(self, config: MethodConfig, backbone: Backbone, dataset_size: int = 0) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.dataset_size = dataset_size

    @classmethod
    def recipe_for(cls, backbone: str) -> Recipe:
        """The run-level defaults for ``backbone`` (an alias or timm name, possibly unknown).

        ``recipe`` by default. Override where the official recipe depends on the
        architecture (MoCo v3 and DINO: AdamW for ViTs, LARS / SGD for ResNets).
        """
        return cls.recipe

    @classmethod
    def option_defaults(cls, ctx: RunContext) -> dict[str, Any]:
        """Defaults of options that depend on the run's backbone or data ({} by default).

        They sit exactly where the ``Config`` defaults sit: below the method's recipe
        files, flags and ``--set``, so an option the user states always wins. Each key
        must be a Config option marked :func:`depends_on`; the values are validated as
        the user's would be and recorded in the run's ``config.json``, so a resumed run
        keeps them. Example: a projector of 8192 on a ResNet-50 over ImageNet, 512 on a
        small CPU run.
        """
        return {}

    @classmethod
    def backbone_kwargs(cls, timm_name: str) -> dict[str, Any]:
        """timm constructor arguments the method's own architecture needs for the timm
        model ``timm_name`` ({} by default).

        For a network the official code builds differently from timm's registered model,
        e.g. MoCo v3's ViT-Small with 12 attention heads (timm's has 6). The backbone
        factory merges them below the user's ``backbone.kwargs``; they end up in the
        backbone's spec, so checkpoints, ``--dry-run`` and exports (``config.json``
        ``model_args``, which plain timm rebuilds from) show and keep them. Only what
        timm's constructor takes belongs here; changes timm cannot express (a fixed
        position embedding, a frozen layer) are made on the built backbone in
        ``__init__`` and travel as weights.
        """
        return {}

    @classmethod
    def summary(cls) -> str:
        """First line of the class docstring."""
        doc = (cls.__doc__ or "").strip().splitlines()
        return doc[0].strip() if doc else ""

    # -- what the data pipeline must produce ---------------------------------------------
    @abstractmethod
    def views(self) -> list[ViewSpec]:
        """The crops the data pipeline must produce for every image."""

    # -- one optimisation step ------------------------------------------------------------
    @abstractmethod
    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        """Compute the loss for one batch (the engine does backward and the update)."""

    def forward(self, batch: Batch, step: StepInfo) -> StepOutput:  # type: ignore[override]
        """``training_step`` behind ``forward`` so DistributedDataParallel sees the call."""
        return self.training_step(batch, step)

    # -- optional hooks ---------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]] | None:
        """Custom optimiser parameter groups, or None for the engine's default grouping.

        A group may carry ``fixed_lr=True`` (learning rate not scheduled, e.g. SimSiam's
        predictor), ``weight_decay`` and ``lars_exclude``.
        """
        return None

    def before_optimizer_step(self, step: StepInfo) -> None:
        """Called after backward, before the optimiser updates (e.g. freeze a layer's grads)."""

    def after_optimizer_step(self, step: StepInfo) -> None:
        """Called after the optimiser update (EMA teachers, queue/bank/centre updates)."""

    def encoder(self) -> nn.Module:
        """The network that is evaluated and exported; the online backbone by default."""
        return self.backbone

    def export_candidates(self) -> dict[str, nn.Module]:
        """Encoders that ``ssl export --which`` and ``ssl eval --which`` can choose from;
        the first is the default export. A candidate that is not a timm network built by
        sslcli (e.g. :class:`sslcli.nn.heads.UnitEmbedding`, a method's normalised
        embedding head) can be evaluated and fine-tuned but not exported."""
        return {"backbone": self.encoder()}

    def embed(self, images: Tensor) -> Tensor:
        """Features used for kNN / linear evaluation (the encoder's pooled output)."""
        return self.encoder()(images)

    def export_metadata(self, which: str) -> dict[str, Any]:
        """What a loader needs besides the weights to reproduce :meth:`embed` from the
        exported encoder ``which`` (written under ``config.json["sslcli"]``); {} when the
        encoder applied to the whole image is the representation. CPC: its patch grid."""
        return {}

    def finetune_encoder(self, layer: int | None = None) -> nn.Module | None:
        """The network ``ssl eval finetune`` starts from when it is more than the evaluated
        encoder (SimCLR v2 keeps the first ``layer`` projection-head layers), or None.

        ``layer`` is ``--head-layer``; None asks for the method's own default.
        """
        return None


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")
