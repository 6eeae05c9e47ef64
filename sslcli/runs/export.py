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

from sslcli.runs.targets import EXPORT_CONFIG, EXPORT_WEIGHTS, Target, strip_prefixes
from sslcli.errors import TargetError

HEADS_WEIGHTS = "heads.safetensors"
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


def head_state(method: nn.Module) -> dict[str, Tensor]:
    """Parameters (and normalisation statistics) of every module outside the encoders.

    Encoders are the timm models sslcli built (they carry ``sslcli_spec``); what remains
    are projection/prediction heads, prototypes and the like. Buffers are kept only where
    they belong to a layer with parameters or to a normalisation layer, so queues, memory
    banks and centres (training state, not network) stay out.
    """
    from torch.nn.modules.batchnorm import _NormBase

    out: dict[str, Tensor] = {}

    def walk(mod: nn.Module, prefix: str) -> None:
        if hasattr(mod, "sslcli_spec"):
            return
        own_params = dict(mod.named_parameters(recurse=False))
        for n, p in own_params.items():
            if p is not None:
                out[prefix + n] = p
        if own_params or isinstance(mod, _NormBase):
            for n, b in mod.named_buffers(recurse=False):
                if b is not None and n not in mod._non_persistent_buffers_set:
                    out[prefix + n] = b
        for n, child in mod.named_children():
            walk(child, f"{prefix}{n}.")

    for n, child in method.named_children():
        walk(child, f"{n}.")
    return {k: v.detach().cpu().contiguous().clone() for k, v in strip_prefixes(out).items()}


def _qualname(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def heads_structure(method: nn.Module, heads: dict[str, Tensor]) -> dict[str, Any]:
    """Each head's module structure: its class, every submodule's class (encoders inside
    it left out) and every tensor's shape and dtype; ``heads`` as :func:`head_state`."""
    structure: dict[str, Any] = {}
    for key, v in heads.items():
        top = key.split(".")[0]
        entry = structure.setdefault(top, {"class": "", "modules": {}, "tensors": {}})
        entry["tensors"][key[len(top) + 1 :]] = {"shape": list(v.shape), "dtype": str(v.dtype)}
    for top, entry in structure.items():
        mod = getattr(method, top)
        entry["class"] = _qualname(mod)
        entry["modules"] = {
            n: _qualname(m)
            for n, m in mod.named_modules()
            if n and not any(hasattr(a, "sslcli_spec") for a in [*_ancestors(mod, n), m])
        }
    return structure


def heads_description(t: Any, which: str, heads: dict[str, Tensor]) -> dict[str, Any]:
    """What ``heads.safetensors`` carries besides the tensors (its ``sslcli`` metadata):
    enough to rebuild the heads with :func:`sslcli.load_heads` — the method, the package
    and version that registered it, the run's resolved config (the method's options
    included), the backbone as built, the data set size, the exported encoder, and each
    head's module structure (:func:`heads_structure`) to check the rebuild by."""
    from sslcli import registry

    return {
        "method": t.method_name,
        "step": t.step,
        "which": which,
        "plugin": registry.info_of(type(t.method)).record(),
        "config": t.config,
        "backbone": t.meta.get("backbone"),
        "dataset_size": t.meta.get("dataset_size"),
        "heads": heads_structure(t.method, heads),
    }


def _ancestors(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules strictly between ``root`` and the submodule at ``path``."""
    out, cur = [], root
    for part in path.split(".")[:-1]:
        cur = getattr(cur, part)
        out.append(cur)
    return out


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


_README = """# {arch} exported by sslcli ({method}, encoder "{which}")

This ResNet uses a small-image stem: `{conv}` is a 3x3 stride-1 convolution (no bias) and
the max-pool is removed. timm's ResNet constructor cannot express that stem, so build the
model, replace the two layers, then load the weights:

```python
import json, timm, torch.nn as nn
from safetensors.torch import load_file

cfg = json.load(open("config.json"))
model = timm.create_model(cfg["architecture"], pretrained=False, num_classes=0,
                          **cfg["model_args"])
stem = cfg["sslcli"]["small_stem"]
conv = nn.Conv2d(stem["in_channels"], stem["out_channels"], 3, 1, 1, bias=False)
if stem["conv"] == "conv1":
    model.conv1 = conv
else:  # deep stem: the first conv of the conv1 Sequential
    model.conv1[0] = conv
model.maxpool = nn.Identity()
model.load_state_dict(load_file("model.safetensors"), strict=True)
```

(`sslcli.load_timm(DIR)` does the same.)
"""

_GRID_README = """
## Patch grid

The representation {method} evaluates is not this network applied to the whole image:
it is the network applied to each patch of a {g}x{g} grid of {p}x{p}-pixel patches cut
with stride {s}, and the {g}x{g} patch features averaged. `config.json["sslcli"]
["patch_grid"]` records the grid; `sslcli.load_timm(DIR)` returns the network wrapped
to do it (its `.encoder` is the plain network). By hand:

```python
patches = x.unfold(2, {p}, {s}).unfold(3, {p}, {s})          # [B, C, {g}, {g}, {p}, {p}]
patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1], {p}, {p})
features = model(patches).view(x.shape[0], {g} * {g}, -1).mean(dim=1)
```
"""

_PAIR_README = """
## Two encoders

{method} learns one encoder per colour view of an image ({space}: the luma channel "l"
and the two chroma channels "ab"), and its representation is the two encoders' features
concatenated (l first). `model.safetensors` is the "{which}" encoder (it loads in plain
timm with the `in_chans` in `config.json`); `{file}` is the "{other}" encoder, described
under `config.json["sslcli"]["paired_views"]["companion"]`. `sslcli.load_timm(DIR)`
returns the pair: it takes [0, 1] RGB, converts it with
`sslcli.nn.colorspace.luma_chroma_views(x, "{space}")` and concatenates the two features
(its `.l`, `.ab` and `.encoder` are the plain networks).
"""

_INPUT_README = """
Inputs: {size}x{size} pixels, scaled to [0, 1], minus mean {mean}, divided by std {std}.
"""


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def _write_safetensors(tensors: dict[str, Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from sslcli.fsutil import reason
    from sslcli.errors import WriteError

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        # safetensors creates its file with mode 0600; an export is meant to be shared like
        # the config.json next to it, so it gets the mode the umask gives a new file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        # safetensors reports a full disk as SafetensorError, not OSError
        raise WriteError(f"cannot write {path}: {reason(e)}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def export(
    target: str | Path | None,
    out: str | Path,
    *,
    which: str | None = None,
    with_heads: bool = False,
) -> ExportResult:
    """Write ``target``'s encoder (``which``, default: the evaluated one) to ``out``."""
    from sslcli.runs.targets import load_target

    t = load_target(target)
    if t.kind == "export":
        raise TargetError(f"{t.path} is already an exported model; export a run or checkpoint")
    t.check_which(which)
    which = which or t.default_which
    encoder = t.candidates[which]
    out = Path(out)
    from sslcli.runs.layout import check_export_out
    from sslcli.fsutil import atomic_write_text, reason
    from sslcli.errors import WriteError

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
        _write_safetensors(encoder_state(other), path, {"format": "pt"})
        files.append(path)
    _write_safetensors(encoder_state(encoder), files[0], {"format": "pt"})
    atomic_write_text(out / EXPORT_CONFIG, json.dumps(cfg, indent=2) + "\n")
    notes = []
    small = cfg["sslcli"]["small_stem"] is not None
    grid = cfg["sslcli"].get("patch_grid")
    readme = out / "README.md"
    sections = []
    if small:
        stem = cfg["sslcli"]["small_stem"]
        sections.append(
            _README.format(
                arch=cfg["architecture"], method=t.method_name, which=which, conv=stem["conv"]
            )
        )
        notes.append(
            f"small-image stem: plain timm needs model.{stem['conv']} (3x3 stride 1) and "
            f"model.maxpool (Identity) adjusted before loading; sslcli.load_timm(DIR) "
            f"or the recipe in {readme} does it"
        )
    if (grid or pair) and not sections:
        sections.append(f"# {cfg['architecture']} exported by sslcli ({t.method_name})\n")
    if grid:
        g, p, s = grid["grid_size"], grid["patch"], grid["stride"]
        sections.append(_GRID_README.format(method=t.method_name, g=g, p=p, s=s))
        notes.append(
            f"patch grid: {t.method_name}'s representation is this encoder on a {g}x{g} grid "
            f"of {p}-px patches (stride {s}), mean-pooled; sslcli.load_timm(DIR) returns "
            f"it wrapped that way, {readme} shows how by hand"
        )
    if pair:
        comp = pair["companion"]
        sections.append(_PAIR_README.format(
            method=t.method_name, which=which, other=comp["which"], file=comp["file"],
            space=pair["color_space"],
        ))  # fmt: skip
        notes.append(
            f"two encoders: {t.method_name}'s representation concatenates the {which} and "
            f"{comp['which']} encoders ({comp['file']} beside model.safetensors); "
            "sslcli.load_timm(DIR) returns the pair"
        )
    if sections:
        pc = cfg["pretrained_cfg"]
        size, mean, std = pc["input_size"][-1], pc["mean"], pc["std"]
        sections.append(_INPUT_README.format(size=size, mean=mean, std=std))
        atomic_write_text(readme, "".join(sections))
        files.append(readme)
    if with_heads:
        if t.method is None:
            raise TargetError("--with-heads needs a run or checkpoint (it has the heads)")
        heads = head_state(t.method)
        if not heads:
            notes.append(f"{t.method_name} has no head parameters outside its encoders")
        else:
            meta = {"sslcli": json.dumps(heads_description(t, which, heads))}
            _write_safetensors(heads, out / HEADS_WEIGHTS, meta)
            files.append(out / HEADS_WEIGHTS)
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
