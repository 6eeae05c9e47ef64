"""Training-step throughput: sslcli's real step against a bare hand-written loop.

What is compared, interleaved in one process (see common.py), on the same device, batch,
backbone, precision and optimiser (AdamW on both sides, so the optimiser is not what is
measured):

* ``sslcli``       -- ``Trainer.train_step`` of the registered method (default moco-v3) from
                      a uint8 batch already on the device: view generation (the real batched
                      augmentation pipeline), forward, loss, backward, hooks, optimiser step,
                      EMA, the engine's NaN check. ``trainer.schedule.apply`` runs first, as
                      in ``fit``.
* ``views only``   -- just ``Trainer.views`` on the same batch, to split the cost.
* ``reference``    -- the same method written plainly in this file (MoCo v3 or SimCLR): two
                      views from one per-sample affine crop + flip (``affine_grid`` /
                      ``grid_sample``, no torchvision), both encoders, the same loss,
                      backward, ``AdamW.step``, EMA.
* ``+ compile``    -- with ``--compile``: both, each with its whole forward under
                      ``torch.compile`` (the trainer's ``compile=True`` compiles the module
                      each step calls, the method; the reference compiles its ``loss``:
                      encoders, heads, EMA, loss). Meant for CUDA; on a CPU it works but
                      compiling takes minutes.
* ``lightly``      -- with ``--lightly`` and lightly installed (``pip install lightly``): the
                      reference loop with lightly's MoCo v3 parts (``MoCoProjectionHead``,
                      ``BYOLPredictionHead``, ``update_momentum``, ``cosine_schedule``).

On CUDA the table also shows each variant's memory: the persistent state it added (weights,
optimiser state, EMA copy) plus the peak above that during a step, i.e. roughly what it
would need alone.

Example::

    python benchmarks/bench_train_step.py --device cuda --backbone vit-s --image-size 224 \\
        --batch-size 128 --compile
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from common import Variant, hardware, interleaved, mib, paired_ratio, sync, table, write_json
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SUPPORTED_REFERENCE = ("moco-v3", "simclr")


# --------------------------------------------------------------------------------------------
# The plain reference: views, heads, losses, written without sslcli
# --------------------------------------------------------------------------------------------


def plain_views(x: Tensor, size: int, gen: torch.Generator, count: int = 2) -> list[Tensor]:
    """``count`` views of a uint8 batch: per-sample random-resized crop (scale 0.08-1, ratio
    3/4-4/3) and horizontal flip as one affine warp, then mean/std normalisation."""
    b = x.shape[0]
    dev = x.device
    xf = x.float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    out = []
    for _ in range(count):
        u = torch.rand(b, 5, device=dev, generator=gen)
        area = 0.08 + 0.92 * u[:, 0]
        log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
        r = torch.exp(log_r)
        w = torch.sqrt(area * r).clamp(max=1.0)
        h = torch.sqrt(area / r).clamp(max=1.0)
        cx = (1 - w) * (2 * u[:, 2] - 1)
        cy = (1 - h) * (2 * u[:, 3] - 1)
        flip = torch.where(u[:, 4] < 0.5, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
        v = F.grid_sample(xf, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out.append((v - mean) / std)
    return out


def mlp(dims: list[int], last_bn: bool) -> nn.Sequential:
    """Linear(no bias) -> BN -> ReLU hidden layers; last Linear(no bias) [-> BN(affine=False)]
    (MoCo v3's ``_build_mlp``)."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=False))
        if not last:
            layers += [nn.BatchNorm1d(dims[i + 1]), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


def moco_v3_ctr(q: Tensor, k: Tensor, tau: float) -> Tensor:
    """MoCo v3: CE(n(q) n(k)^T / tau, arange) * 2 tau (one process, so no gather)."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    logits = q @ k.T / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * (2 * tau)


def nt_xent_plain(z1: Tensor, z2: Tensor, tau: float) -> Tensor:
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / tau
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


class RefMoCoV3(nn.Module):
    """MoCo v3 as in METHODS.md: projector 2 layers (ResNet) or 3 (ViT), predictor 2 layers,
    momentum encoder + projector, cosine momentum 0.99 -> 1 updated before the keys."""

    def __init__(
        self,
        backbone: nn.Module,
        width: int,
        is_vit: bool,
        tau: float,
        total: int,
        head_dims: tuple[int, int] = (4096, 256),
    ) -> None:
        super().__init__()
        hid, out = head_dims
        self.backbone = backbone
        proj = [width, hid, hid, out] if is_vit else [width, hid, out]
        self.projector = mlp(proj, last_bn=True)
        self.predictor = mlp([out, hid, out], last_bn=is_vit)
        if is_vit:
            # The paper's stability trick: a frozen random patch projection; the position
            # embedding is fixed too.
            for name, p in backbone.named_parameters():
                if name.startswith("patch_embed") or name == "pos_embed":
                    p.requires_grad_(False)
        self.m_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.m_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.tau, self.total, self.step_no = tau, total, 0

    @torch.no_grad()
    def ema(self) -> None:
        m = 1 - 0.5 * (1 + math.cos(math.pi * self.step_no / self.total)) * (1 - 0.99)
        for t, o in ((self.m_backbone, self.backbone), (self.m_projector, self.projector)):
            tp = list(t.parameters())
            torch._foreach_mul_(tp, m)
            torch._foreach_add_(tp, [p.detach() for p in o.parameters()], alpha=1 - m)

    def loss(self, x1: Tensor, x2: Tensor) -> Tensor:
        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            self.ema()
            k1 = self.m_projector(self.m_backbone(x1))
            k2 = self.m_projector(self.m_backbone(x2))
        self.step_no += 1
        return moco_v3_ctr(q1, k2, self.tau) + moco_v3_ctr(q2, k1, self.tau)


class RefSimCLR(nn.Module):
    """SimCLR v1: one forward over both views, projector D -> D -> 128 with BN, NT-Xent."""

    def __init__(self, backbone: nn.Module, width: int, tau: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(
            nn.Linear(width, width, bias=False),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, 128, bias=False),
            nn.BatchNorm1d(128),
        )
        self.tau = tau

    def loss(self, x1: Tensor, x2: Tensor) -> Tensor:
        z1, z2 = self.projector(self.backbone(torch.cat([x1, x2]))).chunk(2)
        return nt_xent_plain(z1, z2, self.tau)


class LightlyMoCoV3(nn.Module):
    """The reference loop with lightly's MoCo v3 parts instead of the plain ones."""

    def __init__(
        self, backbone: nn.Module, width: int, is_vit: bool, tau: float, total: int
    ) -> None:
        super().__init__()
        from lightly.models.modules.heads import BYOLPredictionHead, MoCoProjectionHead

        self.backbone = backbone
        self.projector = MoCoProjectionHead(width, 4096, 256, 3 if is_vit else 2, True)
        self.predictor = BYOLPredictionHead(256, 4096, 256)
        self.m_backbone = copy.deepcopy(backbone).requires_grad_(False)
        self.m_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.tau, self.total, self.step_no = tau, total, 0

    def loss(self, x1: Tensor, x2: Tensor) -> Tensor:
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        q1 = self.predictor(self.projector(self.backbone(x1)))
        q2 = self.predictor(self.projector(self.backbone(x2)))
        with torch.no_grad():
            m = cosine_schedule(self.step_no, self.total, 0.99, 1.0)
            update_momentum(self.backbone, self.m_backbone, m)
            update_momentum(self.projector, self.m_projector, m)
            k1 = self.m_projector(self.m_backbone(x1))
            k2 = self.m_projector(self.m_backbone(x2))
        self.step_no += 1
        return moco_v3_ctr(q1, k2, self.tau) + moco_v3_ctr(q2, k1, self.tau)


# --------------------------------------------------------------------------------------------
# Building the variants
# --------------------------------------------------------------------------------------------


def trainable(m: nn.Module) -> int:
    """Trainable parameters outside momentum copies (comparable across variants)."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


class MemoryProbe:
    """CUDA memory a variant adds: persistent state + the peak above it during a step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.start = torch.cuda.memory_allocated(device) if self.cuda else 0

    def after_warmup_step(self, step: Callable[[], object]) -> float | None:
        if not self.cuda:
            return None
        sync(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return float(before - self.start + (peak - before))


def build_sslcli(args: argparse.Namespace, device: torch.device, compile_: bool) -> dict[str, Any]:
    """A real Trainer for ``args.method``; returns its step, views-only step and facts."""
    from sslcli.api import resolve_config
    from sslcli.engine.trainer import Trainer

    overrides = {
        "backbone": {"name": args.backbone},
        "data": {"dataset": "digits", "image_size": args.image_size},
        "optim": {"name": "adamw", "lr": 1.5e-4, "lr_scaling": "linear", "weight_decay": 0.1},
        "trainer": {
            "device": device.type,
            "precision": args.precision,
            "batch_size": args.batch_size,
            "epochs": 10_000,
            "eval_knn": False,
            "compile": compile_,
            "log_every": 10**9,
            "out": tempfile.mkdtemp(prefix="bench-train-step-"),
        },
    }
    method_cls, run, mcfg = resolve_config(args.method, overrides=overrides)
    trainer = Trainer(run, method_cls, mcfg)
    pool = batches(args, device)
    counter = {"k": 0}

    def step() -> None:
        images, labels, index = pool[counter["k"] % len(pool)]
        counter["k"] += 1
        trainer.schedule.apply(trainer.optimizer, trainer.step)
        trainer.train_step(images, labels, index)
        trainer.step += 1

    def views_only() -> None:
        trainer.views(pool[0][0], generator=trainer.aug_gen)

    return {
        "step": step,
        "views": views_only,
        "params": trainable(trainer.method),
        "dtype": trainer.dtype,
        "channels_last": trainer.channels_last,
        "is_vit": trainer.backbone_spec.is_vit,
        "tau": getattr(mcfg, "temperature", None),
        "total": trainer.total_steps,
        "spec": trainer.backbone_spec,
    }


def fallback_facts(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What the trainer would decide, for timing the reference when sslcli's step cannot
    be built (e.g. a method or engine part still missing)."""
    from sslcli.backbones import make_spec
    from sslcli.runtime import pick_dtype

    spec = make_spec(args.backbone, args.image_size)
    dtype = pick_dtype(args.precision, device)
    if args.precision == "bf16":
        dtype = torch.bfloat16
    cl = device.type == "cuda" and not spec.is_vit and "resnext" not in spec.timm_name
    total = 10_000 * (1438 // args.batch_size)  # digits train split, as build_sslcli uses
    return {"spec": spec, "dtype": dtype, "channels_last": cl, "total": total, "tau": None}


def build_reference(
    args: argparse.Namespace, device: torch.device, facts: dict[str, Any], kind: str, compile_: bool
) -> dict[str, Any]:
    from sslcli.backbones import feature_dim

    spec = facts["spec"]
    backbone = spec.build()
    width = feature_dim(backbone)
    is_vit = spec.is_vit
    default_tau = {"moco-v3": 0.2 if is_vit else 1.0, "simclr": 0.1}[args.method]
    tau = facts.get("tau") or default_tau
    model: nn.Module
    if kind == "lightly":
        model = LightlyMoCoV3(backbone, width, is_vit, tau, facts["total"])
    elif args.method == "moco-v3":
        model = RefMoCoV3(backbone, width, is_vit, tau, facts["total"])
    else:
        model = RefSimCLR(backbone, width, tau)
    model.to(device)
    channels_last = facts["channels_last"]
    if channels_last:
        model.to(memory_format=torch.channels_last)
    params = trainable(model)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=1.5e-4 * args.batch_size / 256,
        weight_decay=0.1,
        foreach=True,
    )
    gen = torch.Generator(device=device).manual_seed(0)
    pool = batches(args, device)
    dtype = facts["dtype"]
    counter = {"k": 0}
    loss_fn = model.loss  # type: ignore[operator]
    if compile_:
        loss_fn = torch.compile(loss_fn)

    def step() -> None:
        images = pool[counter["k"] % len(pool)][0]
        counter["k"] += 1
        x1, x2 = plain_views(images, args.image_size, gen)
        if channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        # The same order and sync point as Trainer.train_step: gradients freed before the
        # forward, backward queued, then the one host read (is the loss finite?) before
        # the optimiser step. Reading it before backward, as this loop once did, stalls
        # the device while the host waits and would flatter sslcli.
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(x1, x2)
        loss.backward()
        if not bool(torch.isfinite(loss.detach())):
            raise RuntimeError("reference loss is not finite")
        opt.step()

    return {"step": step, "params": params}


def batches(args: argparse.Namespace, device: torch.device) -> list[tuple[Tensor, Tensor, Tensor]]:
    """A few uint8 batches already on the device (load size = image size)."""
    g = torch.Generator().manual_seed(0)
    b, s = args.batch_size, args.image_size
    out = []
    for k in range(4):
        x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
        out.append(
            (
                x.to(device),
                torch.zeros(b, dtype=torch.long, device=device),
                torch.arange(k * b, (k + 1) * b, device=device),
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="moco-v3", help="registered method (default moco-v3)")
    p.add_argument("--backbone", default="resnet18", help="sslcli alias or timm name")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 autocast on CUDA, fp32 on CPU (the trainer's rule)",
    )
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--compile", action="store_true", help="add torch.compile'd variants")
    p.add_argument("--lightly", action="store_true", help="add lightly's MoCo v3 parts")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    torch.manual_seed(0)
    variants: list[Variant] = []
    b = args.batch_size
    compile_modes = [False, True] if args.compile else [False]
    if args.compile and device.type != "cuda":
        print("note: --compile on a CPU compiles with Inductor's C++ backend; slow to start")
    facts: dict[str, Any] | None = None
    for c in compile_modes:
        suffix = " + compile" if c else ""
        probe = MemoryProbe(device)
        try:
            s = build_sslcli(args, device, c)
        except Exception as e:  # noqa: BLE001 - report and still time the reference
            print(f"note: sslcli {args.method} unavailable ({type(e).__name__}: {e})")
            break
        facts = facts or s
        v = Variant(f"sslcli {args.method}{suffix}", s["step"], b)
        v.extra = {"params": s["params"], "mem": probe.after_warmup_step(s["step"])}
        variants.append(v)
        if not c:
            variants.append(Variant("sslcli views only", s["views"], b, extra={"params": 0}))
    if facts is None:
        facts = fallback_facts(args, device)
    if args.method in SUPPORTED_REFERENCE:
        kinds = ["reference"]
        if args.lightly:
            if args.method != "moco-v3":
                print("note: --lightly compares MoCo v3 parts only; skipped")
            else:
                try:
                    import lightly  # noqa: F401
                except ImportError:
                    print("note: lightly is not installed ('pip install lightly'); row skipped")
                else:
                    kinds.append("lightly")
        for kind in kinds:
            for c in compile_modes:
                probe = MemoryProbe(device)
                r = build_reference(args, device, facts, kind, c)
                name = f"{kind} {args.method}" + (" + compile" if c else "")
                v = Variant(name, r["step"], b)
                v.extra = {"params": r["params"], "mem": probe.after_warmup_step(r["step"])}
                variants.append(v)
    else:
        print(f"note: no hand-written reference for {args.method} (have: {SUPPORTED_REFERENCE})")

    interleaved(
        variants, device, steps=args.steps, rounds=args.rounds, warmup=args.warmup, log=print
    )

    base = next(
        (v for v in variants if v.name.startswith("reference") and "compile" not in v.name), None
    )
    base_c = next(
        (v for v in variants if v.name.startswith("reference") and "compile" in v.name), None
    )
    rows = []
    for v in variants:
        ref = base_c if ("compile" in v.name and base_c is not None) else base
        ratio = f"{v.rate / ref.rate:.2f}" if ref is not None else "-"
        paired = f"{paired_ratio(v, ref):.2f}" if ref is not None else "-"
        v.extra["x_reference"] = v.rate / ref.rate if ref is not None else None
        v.extra["x_reference_paired"] = paired_ratio(v, ref) if ref is not None else None
        rows.append(
            [
                v.name,
                f"{v.rate:.1f}",
                ratio,
                paired,
                f"{100 * v.spread:.0f}%",
                f"{v.extra.get('params', 0):,}",
                mib(v.extra.get("mem")),
            ]
        )
    hw = hardware(device)
    dtype = facts["dtype"]
    print()
    print(
        f"# train step: {args.method}, {args.backbone} at {args.image_size}px, batch {b}, "
        f"{dtype or 'fp32'}, {args.rounds} rounds x {args.steps} steps (median)"
    )
    print(f"# {hw}")
    heads = ["variant", "images/s", "x ref", "x ref (paired)", "spread", "trainable", "MiB (CUDA)"]
    print(table(rows, heads))
    counts = {
        v.extra["params"]
        for v in variants
        if v.name.startswith(("sslcli", "reference")) and v.extra.get("params")
    }
    if len(counts) > 1:
        print(
            "note: sslcli and the reference differ in trainable parameters (see table): the "
            "reference follows METHODS.md, so the two models are not the same"
        )
    if any(v.name.startswith("lightly") for v in variants):
        print(
            "note: lightly's heads differ slightly from the official ones (affine last BN in "
            "the projector, a bias and no BN at the predictor's output), hence its count"
        )
    result = {
        "args": vars(args),
        "hardware": hw,
        "results": [
            {
                "name": v.name,
                "images_per_s": v.rate,
                "spread": v.spread,
                "blocks_s": v.blocks,
                **v.extra,
            }
            for v in variants
        ],
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
