"""``ssl export``: an encoder as ``model.safetensors`` + a timm ``config.json``.

The directory loads in plain timm, without sslcli installed::

    model = timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)

and gives the same features as the encoder inside sslcli (the weights are copied bit for
bit, under timm's own parameter names: sslcli builds every encoder with
``timm.create_model(..., num_classes=0)``, and wrapper prefixes such as DDP's ``module.``
or torch.compile's ``_orig_mod.`` are stripped). ``config.json`` carries what timm needs to
rebuild the network (``architecture``, ``model_args`` such as a small ViT's ``img_size``,
``patch_size``, ``dynamic_img_size``, or ``in_chans``) and how to feed it
(``pretrained_cfg``: input size, mean/std — zeros and ones for methods trained on
un-normalised pixels — and interpolation), so ``timm.data.resolve_data_config`` reproduces
sslcli's evaluation transform.

**Small-image ResNets.** For images up to 64 px sslcli replaces a ResNet's stem with a
3x3 stride-1 convolution and drops the max-pool (the CIFAR stem of SimCLR, MoCo and
others). timm's ``ResNet`` constructor has no argument for that (``stem_type`` offers only
the 7x7/stride-2 stem and the deep 3x3 stems whose first conv has stride 2, always
followed by a stride-2 pool), and no other timm architecture shares ResNet's parameter
names with a configurable stem. So those exports keep the true ``architecture`` and
``model_args`` (``timm.create_model(cfg["architecture"], **cfg["model_args"])`` builds
everything but the stem), describe the stem under ``config.json["sslcli"]["small_stem"]``,
and :func:`load_timm` — a self-contained function that needs only timm, torch and
safetensors (copy it, or read the recipe in the directory's README.md) — applies it
before loading the weights strictly. ``ssl export`` says so in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sslcli.data.views import IMAGENET_MEAN, IMAGENET_STD
from sslcli.errors import TargetError, WriteError
from sslcli.fsutil import atomic_write_safetensors, atomic_write_text, reason
from sslcli.runs.export_readme import readme_sections
from sslcli.runs.heads import write_heads
from sslcli.runs.layout import EXPORT_CONFIG, EXPORT_WEIGHTS, HEADS_WEIGHTS, check_export_out
from sslcli.runs.rebuild import Target, strip_prefixes

# timm constructor arguments that only matter while training; an exported encoder is
# rebuilt for inference or fine-tuning, where the user chooses their own regularisation.
TRAINING_ONLY_ARGS = ("drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate",
                      "attn_drop_rate", "pos_drop_rate", "patch_drop_rate")  # fmt: skip


@dataclass
class ExportResult:
    out: Path
    which: str
    architecture: str
    files: list[Path]
    small_stem: bool
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "which": self.which,
            "architecture": self.architecture,
            "files": [str(p) for p in self.files],
            "small_stem": self.small_stem,
            "notes": self.notes,
        }


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def encoder_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's state_dict with wrapper prefixes stripped, as independent CPU tensors.

    Tensors keep their dtype and values exactly; ``clone`` gives each its own storage,
    which safetensors requires.
    """
    state = strip_prefixes(module.state_dict())
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _in_chans(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return 3


def timm_config(encoder: nn.Module, target: Target, which: str) -> dict[str, Any]:
    """The timm ``config.json`` (plus an ``sslcli`` block timm ignores) for ``encoder``."""
    spec = getattr(encoder, "sslcli_spec", None)
    if spec is None:
        raise TargetError(
            f"--which {which}: not a timm network (evaluation only, e.g. a method's "
            f"embedding head); export one of the method's encoders instead"
        )
    in_chans = _in_chans(encoder)
    model_args = {k: v for k, v in spec.kwargs.items() if k not in TRAINING_ONLY_ARGS}
    if in_chans != 3:
        model_args["in_chans"] = in_chans
    default_cfg = dict(getattr(encoder, "pretrained_cfg", {}) or {})
    size = int(spec.image_size)
    mean = list(target.mean) if target.normalize else [0.0, 0.0, 0.0]
    std = list(target.std) if target.normalize else [1.0, 1.0, 1.0]
    if in_chans != 3:
        # Per-channel statistics of RGB do not apply; keep the first ones (CMC's L channel
        # gets (x - mean) / std with the inputs the method itself built).
        mean, std = mean[:in_chans], std[:in_chans]
    pretrained_cfg: dict[str, Any] = {
        "input_size": [in_chans, size, size],
        "interpolation": "bilinear",  # sslcli.eval.features.eval_transform resizes bilinearly
        "crop_pct": 1.0,  # the evaluation transform resizes the whole (square) image
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": 0,
        "fixed_input_size": bool(
            default_cfg.get("fixed_input_size", False) and not model_args.get("dynamic_img_size")
        ),
    }
    for key in ("first_conv", "classifier"):
        if default_cfg.get(key):
            pretrained_cfg[key] = default_cfg[key]
    extra: dict[str, Any] = {
        "format": 1,
        "method": target.method_name,
        "which": which,
        "step": target.step,
        "source": str(target.weights),
        "dataset": target.dataset,
        "load_size": target.config.get("data", {}).get("load_size"),
        "small_stem": _stem_description(encoder) if spec.small_stem else None,
    }
    if target.method is not None:
        extra.update(target.method.export_metadata(which))
    return {
        "architecture": spec.timm_name,
        "num_classes": 0,
        "num_features": int(getattr(encoder, "num_features", 0)),
        "global_pool": getattr(encoder, "global_pool", None)
        if isinstance(getattr(encoder, "global_pool", None), str)
        else None,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "sslcli": extra,
    }


def _stem_description(encoder: nn.Module) -> dict[str, Any]:
    """Where the small-image stem differs from timm's constructor: the first conv (3x3,
    stride 1, padding 1, no bias) and the max-pool (removed)."""
    conv1 = getattr(encoder, "conv1", None)
    if isinstance(conv1, nn.Sequential):
        name, conv = "conv1.0", conv1[0]
    else:
        name, conv = "conv1", conv1
    assert isinstance(conv, nn.Conv2d)
    return {
        "conv": name,
        "in_channels": int(conv.in_channels),
        "out_channels": int(conv.out_channels),
        "kernel_size": 3,
        "stride": 1,
        "padding": 1,
        "maxpool": "identity",
    }


def default_export_dir(t: Target, which: str | None) -> Path:
    """Where ``ssl export`` writes without ``--out``: ``<run>/export`` (``export-WHICH`` for
    another encoder than the evaluated one), or ``<checkpoint stem>-export`` in the working
    directory for a checkpoint outside a run."""
    base = t.run_dir if t.run_dir is not None else Path.cwd()
    suffix = f"-{which}" if which and which != t.default_which else ""
    stem = "export" if t.run_dir is not None else f"{Path(t.weights).stem}-export"
    return base / f"{stem}{suffix}"


def write_export(
    t: Target, out: str | Path, *, which: str | None = None, with_heads: bool = False
) -> ExportResult:
    """Write ``t``'s encoder (``which``, default: the evaluated one) to ``out``."""
    if t.kind == "export":
        raise TargetError(f"{t.path} is already an exported model; export a run or checkpoint")
    t.check_which(which)
    which = which or t.default_which
    encoder = t.candidates[which]
    out = Path(out)
    check_export_out(out)  # never into a run directory (its config.json is the run's)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create --out {out}: {reason(e)}") from e

    cfg = timm_config(encoder, t, which)
    files = [out / EXPORT_WEIGHTS, out / EXPORT_CONFIG]
    pair = cfg["sslcli"].get("paired_views")
    if pair:
        # The representation takes a second encoder: its weights sit beside the main ones
        # and config.json describes how to rebuild it.
        other = t.candidates[pair["companion"]]
        desc = timm_config(other, t, pair["companion"])
        pair["companion"] = {
            "which": desc["sslcli"]["which"],
            "file": f"{desc['sslcli']['which']}.safetensors",
            "architecture": desc["architecture"],
            "model_args": desc["model_args"],
            "sslcli": {"small_stem": desc["sslcli"]["small_stem"]},
        }
        path = out / pair["companion"]["file"]
        atomic_write_safetensors(encoder_state(other), path, {"format": "pt"})
        files.append(path)
    atomic_write_safetensors(encoder_state(encoder), files[0], {"format": "pt"})
    atomic_write_text(out / EXPORT_CONFIG, json.dumps(cfg, indent=2) + "\n")
    notes, readme = readme_sections(cfg, t.method_name, which, out / "README.md")
    if readme is not None:
        atomic_write_text(out / "README.md", readme)
        files.append(out / "README.md")
    if with_heads:
        written = write_heads(t, which, out / HEADS_WEIGHTS)
        if written is None:
            notes.append(f"{t.method_name} has no head parameters outside its encoders")
        else:
            files.append(written)
    small = cfg["sslcli"]["small_stem"] is not None
    return ExportResult(out, which, cfg["architecture"], files, small, notes)


# ---------------------------------------------------------------------------------------------
# Reading without sslcli
# ---------------------------------------------------------------------------------------------


def load_timm(directory: "str | os.PathLike[str]") -> "torch.nn.Module":  # noqa: UP037
    """Build the timm model an ``ssl export`` directory describes and load its weights.

    Self-contained on purpose (only json, pathlib, torch, timm and safetensors, imported
    inside; string annotations): copy it into code that does not install sslcli. For
    ImageNet-stem encoders it is equivalent to
    ``timm.create_model("local-dir:DIR", pretrained=True, num_classes=0)``; for small-image
    ResNets it also replaces the stem as ``config.json["sslcli"]["small_stem"]`` describes.
    The weights load strictly: a mismatch is an error, never a silent partial load. An
    encoder whose method evaluates it over a patch grid (CPC:
    ``config.json["sslcli"]["patch_grid"]``) comes back wrapped to cut that grid and
    mean-pool the patch features (the plain network is its ``.encoder``). A two-encoder
    export (CMC: ``config.json["sslcli"]["paired_views"]``) comes back as the pair taking
    RGB; that one case imports sslcli for the colour conversion.
    """
    import json as _json
    from pathlib import Path as _Path

    import timm
    import torch as _torch
    from safetensors.torch import load_file
    from torch import nn as _nn

    def build(desc: dict, weights: _Path) -> _nn.Module:  # type: ignore[type-arg]
        # config.json is untrusted: a model name with a hub/path prefix or an argument that
        # names a file would make timm fetch or open something the directory did not ship.
        arch = desc["architecture"]
        if not isinstance(arch, str) or ":" in arch or arch not in timm.list_models():
            raise ValueError(f"{d}: unknown or non-local architecture {arch!r}")
        args = dict(desc.get("model_args") or {})
        try:
            from sslcli.backbones import FILE_SAFE_KWARGS as allowed
        except ImportError:  # copied without sslcli: refuse what names files or hubs
            allowed = None
        risky = {"checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "file",
                 "url", "hf_hub_id", "hf_hub_filename", "cache_dir", "pretrained"}  # fmt: skip
        bad = [k for k in args if (k not in allowed if allowed is not None else k in risky)]
        if bad:
            raise ValueError(f"{d}: model_args {bad} may not come from a file")
        model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
        stem = (desc.get("sslcli") or {}).get("small_stem")
        if stem:
            conv = _nn.Conv2d(stem["in_channels"], stem["out_channels"], 3, 1, 1, bias=False)
            if stem["conv"] == "conv1":
                model.conv1 = conv
            else:
                model.conv1[0] = conv
            model.maxpool = _nn.Identity()
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model

    d = _Path(directory)
    cfg = _json.loads((d / "config.json").read_text())
    model = build(cfg, d / "model.safetensors")
    pair = (cfg.get("sslcli") or {}).get("paired_views")
    if pair:
        name = pair["companion"]["file"]
        # Only a file of this directory: never ../x or an absolute path from config.json.
        if (
            not isinstance(name, str)
            or _Path(name).name != name
            or name in ("", ".", "..")
            or (d / name).resolve().parent != d.resolve()
        ):
            raise ValueError(f"{d}: companion weight file {name!r} is not a file of {d}")
        companion = build(pair["companion"], d / name)
        try:
            from sslcli.nn.colorspace import luma_chroma_views
        except ImportError as e:
            raise ImportError(
                f"{d}: this encoder's representation takes both colour-view encoders and "
                "sslcli's colour conversion (pip install sslcli); model.safetensors alone "
                "loads in plain timm"
            ) from e
        nets = {pair["which"]: model, pair["companion"]["which"]: companion}
        space = pair["color_space"]

        class ColourViewPair(_nn.Module):
            """Both colour-view encoders on their channels of [0, 1] RGB, concatenated."""

            def __init__(self) -> None:
                super().__init__()
                self.l, self.ab = nets["l"], nets["ab"]
                self.encoder = model  # the network in model.safetensors

            def forward(self, x: "torch.Tensor") -> "torch.Tensor":  # noqa: UP037
                x_l, x_ab = luma_chroma_views(x, space)
                return _torch.cat([self.l(x_l), self.ab(x_ab)], dim=1)

        return ColourViewPair().eval()
    grid = (cfg.get("sslcli") or {}).get("patch_grid")
    if grid:
        g, p, s = int(grid["grid_size"]), int(grid["patch"]), int(grid["stride"])

        class PatchGridPool(_nn.Module):
            """The encoder on each patch of a g×g grid (patch p, stride s), mean-pooled."""

            def __init__(self, encoder: _nn.Module) -> None:
                super().__init__()
                self.encoder = encoder

            def forward(self, x: "torch.Tensor") -> "torch.Tensor":  # noqa: UP037
                side = (g + 1) * s
                if x.shape[-2:] != (side, side):
                    raise ValueError(f"patch-grid encoder takes {side}x{side} images, got "
                                     f"{tuple(x.shape[-2:])}")  # fmt: skip
                b, c = x.shape[:2]
                patches = x.unfold(2, p, s).unfold(3, p, s).permute(0, 2, 3, 1, 4, 5)
                feats = self.encoder(patches.reshape(b * g * g, c, p, p))
                return feats.view(b, g * g, -1).mean(dim=1)

        model = PatchGridPool(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Reading with sslcli
# ---------------------------------------------------------------------------------------------


def check_export_config(cfg: Any, path: Path) -> dict[str, Any]:
    """An export's config.json, validated as user input is (one line per problem): the
    architecture through :func:`sslcli.backbones.resolve_name`, ``model_args`` through the
    allow-list, file names inside the directory, field types through pydantic."""
    from pydantic import BaseModel, ConfigDict, ValidationError

    from sslcli.backbones import check_kwargs, resolve_name
    from sslcli.config import format_validation_error
    from sslcli.errors import BackboneError

    class _Loose(BaseModel):
        model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    class Pretrained(_Loose):
        input_size: tuple[int, int, int] = (3, 224, 224)
        mean: tuple[float, ...] = IMAGENET_MEAN
        std: tuple[float, ...] = IMAGENET_STD

    class Companion(_Loose):
        which: str
        file: str
        architecture: str
        model_args: dict[str, Any] = {}

    class Paired(_Loose):
        which: str
        companion: Companion
        color_space: str

    class Extra(_Loose):
        method: str | None = None
        step: int | None = None
        dataset: str | None = None
        load_size: int | None = None
        paired_views: Paired | None = None

    class ExportConfig(_Loose):
        architecture: str
        model_args: dict[str, Any] = {}
        pretrained_cfg: Pretrained = Pretrained()
        sslcli: Extra = Extra()

    if not isinstance(cfg, dict):
        raise TargetError(f"{path / EXPORT_CONFIG}: not a JSON object")
    try:
        model = ExportConfig(**cfg)
    except ValidationError as e:
        raise TargetError(
            f"{path / EXPORT_CONFIG}: {'; '.join(format_validation_error(e))}"
        ) from e
    try:
        resolve_name(model.architecture)
        check_kwargs(model.model_args, f"{path / EXPORT_CONFIG}: model_args")
        pair = model.sslcli.paired_views
        if pair is not None:
            resolve_name(pair.companion.architecture)
            check_kwargs(pair.companion.model_args, f"{path / EXPORT_CONFIG}: companion")
    except BackboneError as e:
        raise TargetError(f"cannot load exported model {path}: {e}") from e
    if pair is not None:
        name = pair.companion.file
        inside = Path(name).name == name and name not in ("", ".", "..")
        if not inside or (path / name).resolve().parent != path.resolve():
            raise TargetError(
                f"cannot load exported model {path}: its companion weight file {name!r} "
                "is not a file of the directory"
            )
    return cfg




def load_export(path: Path) -> Target:
    from safetensors import SafetensorError

    try:
        cfg = json.loads((path / EXPORT_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TargetError(f"cannot load exported model {path}: {e}") from e
    cfg = check_export_config(cfg, path)
    try:
        model = load_timm(path)
    except (
        OSError, RuntimeError, KeyError, ValueError, TypeError, AssertionError, SafetensorError
    ) as e:  # fmt: skip
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TargetError(f"cannot load exported model {path}: {first}") from e
    model.eval()
    pc = cfg.get("pretrained_cfg", {})
    extra = cfg.get("sslcli", {})
    size = int(pc.get("input_size", [3, 224, 224])[-1])
    mean = tuple(pc.get("mean", IMAGENET_MEAN))
    std = tuple(pc.get("std", IMAGENET_STD))
    normalize = not (all(m == 0 for m in mean) and all(s == 1 for s in std))
    in_chans = int((cfg.get("model_args") or {}).get("in_chans", 3))
    if in_chans != 3 and not extra.get("paired_views"):
        raise TargetError(
            f"cannot evaluate exported model {path}: it takes {in_chans}-channel inputs and "
            "sslcli evaluates RGB images (a CMC run exported now writes both colour-view "
            "encoders, which take RGB together)"
        )
    if len(mean) != 3 or len(std) != 3:
        # A single colour-view encoder (CMC's L: 1 channel) records its own statistics;
        # sslcli feeds exports RGB, and such methods train on un-normalised pixels.
        if normalize:
            raise TargetError(
                f"cannot evaluate exported model {path}: its mean/std are for "
                f"{len(mean)} input channel(s) and sslcli evaluates RGB images"
            )
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    run_cfg: dict[str, Any] = {}
    if extra.get("dataset"):
        run_cfg = {"data": {"dataset": extra["dataset"], "load_size": extra.get("load_size")}}
    return Target(
        kind="export",
        path=path,
        weights=path / EXPORT_WEIGHTS,
        run_dir=None,
        method_name=extra.get("method"),
        step=extra.get("step"),
        image_size=size,
        normalize=normalize,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        candidates={"model": model},
        method=None,
        config=run_cfg,
        meta=cfg,
    )
