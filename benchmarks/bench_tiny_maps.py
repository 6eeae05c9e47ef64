"""CPC's patch encoder: convolutions on 1×1 maps as matrix products vs plain convolutions.

On small images CPC's 7×7 grid cuts patches of a few pixels (16 px → 4-px patches), so a
ResNet's deeper stages see 1×1 maps. ``sslcli.nn.tiny_maps.centre_tap_on_tiny_maps``
computes those layers as the equivalent matrix products. Compared, interleaved in one
process on the same weights and inputs: forward + backward of the patch encoder (the
layer-normalised ResNet CPC builds) on the patches of one batch.

    python benchmarks/bench_tiny_maps.py [--backbone resnet18] [--image-size 16]
        [--batch 8] [--threads N] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from common import Variant, hardware, interleaved, paired_ratio, table, write_json

from sslcli.backbones import make_spec
from sslcli.nn.tiny_maps import centre_tap_on_tiny_maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--grid", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8, help="images; each gives grid² patches")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    stride = a.image_size // (a.grid + 1)
    patch = 2 * stride
    spec = make_spec(a.backbone, a.image_size)
    spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "norm_layer": "groupnorm1"})
    torch.manual_seed(0)
    plain = spec.build()
    fast = centre_tap_on_tiny_maps(copy.deepcopy(plain))
    n = a.batch * a.grid * a.grid
    x = torch.randn(n, 3, patch, patch)

    def step(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    variants = [
        Variant("plain convolutions", lambda: step(plain), n),
        Variant("centre tap on 1x1 maps", lambda: step(fast), n),
    ]
    device = torch.device("cpu")
    interleaved(variants, device, steps=a.steps, rounds=a.rounds, warmup=1, log=print)
    base = variants[0]
    rows = [
        [v.name, f"{v.rate:.0f}", f"{paired_ratio(v, base):.2f}", f"{v.spread:.2f}"]
        for v in variants
    ]
    print(f"\n{a.backbone}, {n} patches of {patch}x{patch} px (batch {a.batch}), fwd+bwd")
    print(table(rows, ["variant", "patches/s", "x plain", "spread"]))
    hw = hardware(device)
    print(f"hardware: {hw}")
    write_json(
        a.json,
        {
            "args": vars(a),
            "hardware": hw,
            "results": [
                {"name": v.name, "rate": v.rate, "ratio": paired_ratio(v, base)} for v in variants
            ],
        },
    )


if __name__ == "__main__":
    main()
