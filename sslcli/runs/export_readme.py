"""The README.md of an export whose encoder plain timm cannot rebuild by name alone: a
small-image stem, a patch grid, a pair of colour-view encoders. Each section says how to
rebuild it by hand (:func:`sslcli.load_timm` does the same)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


def readme_sections(
    cfg: dict[str, Any], method_name: str | None, which: str, readme: Path
) -> tuple[list[str], str | None]:
    """(one-line notes for the user, the text of ``readme`` or None when none is needed) for
    an export described by ``cfg`` (its config.json)."""
    notes: list[str] = []
    small = cfg["sslcli"]["small_stem"] is not None
    grid = cfg["sslcli"].get("patch_grid")
    pair = cfg["sslcli"].get("paired_views")
    sections = []
    if small:
        stem = cfg["sslcli"]["small_stem"]
        sections.append(
            _README.format(
                arch=cfg["architecture"], method=method_name, which=which, conv=stem["conv"]
            )
        )
        notes.append(
            f"small-image stem: plain timm needs model.{stem['conv']} (3x3 stride 1) and "
            f"model.maxpool (Identity) adjusted before loading; sslcli.load_timm(DIR) "
            f"or the recipe in {readme} does it"
        )
    if (grid or pair) and not sections:
        sections.append(f"# {cfg['architecture']} exported by sslcli ({method_name})\n")
    if grid:
        g, p, s = grid["grid_size"], grid["patch"], grid["stride"]
        sections.append(_GRID_README.format(method=method_name, g=g, p=p, s=s))
        notes.append(
            f"patch grid: {method_name}'s representation is this encoder on a {g}x{g} grid "
            f"of {p}-px patches (stride {s}), mean-pooled; sslcli.load_timm(DIR) returns "
            f"it wrapped that way, {readme} shows how by hand"
        )
    if pair:
        comp = pair["companion"]
        sections.append(_PAIR_README.format(
            method=method_name, which=which, other=comp["which"], file=comp["file"],
            space=pair["color_space"],
        ))  # fmt: skip
        notes.append(
            f"two encoders: {method_name}'s representation concatenates the {which} and "
            f"{comp['which']} encoders ({comp['file']} beside model.safetensors); "
            "sslcli.load_timm(DIR) returns the pair"
        )
    if sections:
        pc = cfg["pretrained_cfg"]
        size, mean, std = pc["input_size"][-1], pc["mean"], pc["std"]
        sections.append(_INPUT_README.format(size=size, mean=mean, std=std))
        return notes, "".join(sections)
    return notes, None
