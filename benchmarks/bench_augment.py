"""Batched per-sample augmentation (ViewPipeline) against torchvision v2 per-image transforms.

Both sides make the same SimCLR-style views (RandomResizedCrop 0.08-1, flip, ColorJitter
0.8/0.8/0.8/0.2 with p 0.8, grayscale p 0.2, Gaussian blur p 0.5 with a kernel of ~10 % of
the view, ToDtype + Normalize), two views per image, from the same synthetic uint8 images:

* ``torchvision v2, DataLoader xN``: the classic data path, a ``v2.Compose`` applied to one
  image at a time in N DataLoader workers (N = usable CPU cores by default), batches
  collated in the workers and handed over through shared memory;
* ``torchvision v2, main process``: the same Compose in a plain loop, one core;
* ``ViewPipeline (cpu)``: :class:`sslcli.data.augment.ViewPipeline` on a uint8 batch (the
  in-memory path: crop boxes drawn and resampled in the batch);
* ``ViewPipeline on worker crops (cpu)``: the device half of the image-file path, where
  DataLoader workers have already cut each view from the original image
  (:mod:`sslcli.data.crops`): flip, jitter, grayscale, blur, normalise on
  :class:`~sslcli.data.crops.Crops` of uint8 views;
* ``ViewPipeline (cuda)`` (``--device cuda``): the same on a GPU-resident batch, timed with
  ``torch.cuda.synchronize``; ``+ uint8 upload`` also copies each uint8 batch from pinned
  host memory first, the realistic path from a DataLoader that only decodes.

The variants are timed in interleaved rounds (each round runs every variant for about
``--seconds``; the order rotates) and the median rate over rounds is reported, so load from
other processes hits every variant alike. Each DataLoader block starts fresh workers and
consumes ``--warm`` batches untimed, so worker start-up is excluded, and its workers are
stopped before the next variant runs so they do not steal its cores.

Examples::

    python benchmarks/bench_augment.py --size 64 --batch 256 --device cpu --seconds 3
    python benchmarks/bench_augment.py --device cuda --size 224 --source 256 --batch 256 \\
        --workers 16 --interpolation bicubic
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from common import hardware, table, write_json
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import InterpolationMode, v2

from sslcli.data.augment import ViewPipeline
from sslcli.data.photometric import blur_kernel_size
from sslcli.data.views import ViewSpec, simclr_views


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def simclr_spec(size: int, interpolation: str) -> ViewSpec:
    """SimCLR's ImageNet views (two per image), normalised as torchvision pipelines are."""
    (spec,) = simclr_views(size, interpolation=interpolation, normalize=True)  # type: ignore[arg-type]
    return spec


def torchvision_transform(spec: ViewSpec) -> v2.Compose:
    """The per-image v2 equivalent of one view of ``spec``."""
    k = blur_kernel_size(spec.size, spec.blur_kernel_frac)
    jitter = v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                spec.size,
                scale=spec.scale,
                ratio=spec.ratio,
                interpolation=InterpolationMode(spec.interpolation),
                antialias=True,
            ),
            v2.RandomHorizontalFlip(spec.flip_p),
            v2.RandomApply([jitter], p=spec.jitter_p),
            v2.RandomGrayscale(spec.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(k, spec.blur_sigma)], p=spec.blur_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


class TwoViews(Dataset):
    """``count`` independently augmented views of one stored uint8 image per item."""

    def __init__(self, images: Tensor, transform: Callable[[Tensor], Tensor], count: int) -> None:
        self.images = images
        self.transform = transform
        self.count = count

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[Tensor]:
        img = self.images[i]
        return [self.transform(img) for _ in range(self.count)]


@dataclass
class Timed:
    """A variant: ``step()`` makes one batch of views (``views`` of them).

    ``min_steps``: steps a timed block needs at least (a DataLoader's batches arrive in
    bursts, one per worker, so its blocks cover whole bursts). ``cpu_ms`` records the
    main process's CPU time per 1000 views: a measure of work that, unlike wall-clock
    rates, barely moves when other processes load the machine. (DataLoader workers' CPU
    time is not in it; the main-process torchvision variant runs the same per-image code.)
    """

    name: str
    step: Callable[[], object]
    views: int
    before: Callable[[], object] | None = None
    after: Callable[[], object] | None = None
    min_steps: int = 1
    in_workers: bool = False
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpu_ms) if self.cpu_ms else float("nan")

    @property
    def spread(self) -> float:
        if len(self.rates) < 2:
            return 0.0
        return (max(self.rates) - min(self.rates)) / statistics.median(self.rates)


def run_rounds(
    variants: list[Timed], device: torch.device, seconds: float, rounds: int, warm: int
) -> None:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            if v.before is not None:
                v.before()
            for _ in range(warm):
                v.step()
            sync()
            steps, t0, c0 = 0, time.perf_counter(), time.process_time()
            while True:
                v.step()
                steps += 1
                if steps >= v.min_steps:
                    sync()  # the GPU variant: time finished work, not queued launches
                    if time.perf_counter() - t0 >= seconds:
                        break
            elapsed = time.perf_counter() - t0
            v.rates.append(steps * v.views / elapsed)
            v.cpu_ms.append(1e6 * (time.process_time() - c0) / (steps * v.views))
            if v.after is not None:
                v.after()
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{v.name} {v.rates[-1]:.0f}/s" for v in variants)
        )


class LoaderVariant:
    """Fresh DataLoader workers for every timed block (as every epoch has), over an endless
    shuffled stream so that no worker restart falls inside a timed block."""

    def __init__(self, dataset: Dataset, batch: int, workers: int) -> None:
        self.dataset, self.batch, self.workers = dataset, batch, workers
        self.it: Iterator[Any] | None = None
        self.blocks = 0

    def before(self) -> None:
        g = torch.Generator().manual_seed(self.blocks)
        self.blocks += 1
        sampler = RandomSampler(self.dataset, num_samples=1 << 40, generator=g)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch,
            sampler=sampler,
            drop_last=True,
            num_workers=self.workers,
        )
        self.it = iter(loader)

    def step(self) -> object:
        assert self.it is not None
        return next(self.it)

    def after(self) -> None:
        self.it = None  # dropping the iterator shuts its workers down


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, help="view side (and source side)")
    p.add_argument("--source", type=int, default=None, help="source image side (default: --size)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warm", type=int, default=2, help="untimed batches at each block's start")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (main)")
    p.add_argument("--images", type=int, default=2048, help="synthetic images in the pool")
    p.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear")
    p.add_argument("--no-main", action="store_true", help="skip the single-process torchvision")
    p.add_argument(
        "--cpu-pipeline",
        action="store_true",
        help="with --device cuda, also time ViewPipeline on the CPU (slow at 224 px)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    workers = args.workers if args.workers is not None else usable_cores()
    source = args.source or args.size
    b = args.batch
    spec = simclr_spec(args.size, args.interpolation)
    views_per_image = spec.count

    g = torch.Generator().manual_seed(0)
    pool = torch.randint(
        0, 256, (max(args.images, b), 3, source, source), dtype=torch.uint8, generator=g
    )
    transform = torchvision_transform(spec)
    dataset = TwoViews(pool, transform, views_per_image)

    variants: list[Timed] = []
    loader = LoaderVariant(dataset, b, workers)
    variants.append(
        Timed(
            f"torchvision v2, DataLoader x{workers}",
            loader.step,
            b * views_per_image,
            before=loader.before,
            after=loader.after,
            min_steps=max(1, workers),
            in_workers=True,
        )
    )
    if not args.no_main:
        order = iter(range(1 << 62))

        def tv_main() -> object:
            i = next(order) % (len(pool) - b)
            return [[transform(pool[i + j]) for _ in range(views_per_image)] for j in range(b)]

        variants.append(Timed("torchvision v2, main process", tv_main, b * views_per_image))

    def pipeline_step(dev: torch.device, upload: bool = False) -> Callable[[], object]:
        """ViewPipeline on ``dev``; ``upload``: the uint8 batch starts in pinned host memory
        and is copied to the device every step (the realistic path from a loader)."""
        pipe = ViewPipeline([spec])
        images = pool.pin_memory() if upload else pool.to(dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        starts = iter(range(1 << 62))

        def step() -> object:
            i = (next(starts) * b) % (len(images) - b + 1)
            batch = images[i : i + b]
            if upload:
                batch = batch.to(dev, non_blocking=True)
            return pipe(batch, gen)

        return step

    def crops_step(dev: torch.device) -> Callable[[], object]:
        """The pipeline on views the workers cropped already (the image-file path)."""
        from sslcli.data.crops import Crops

        pipe = ViewPipeline([spec])
        g = torch.Generator().manual_seed(1)
        crops = [
            torch.randint(0, 256, (b, 3, spec.size, spec.size), dtype=torch.uint8, generator=g)
            .to(dev)
            for _ in range(views_per_image)
        ]
        gen = torch.Generator(device=dev).manual_seed(0)
        return lambda: pipe(Crops(crops), gen)

    if device.type == "cpu" or args.cpu_pipeline:
        cpu = torch.device("cpu")
        variants.append(Timed("ViewPipeline (cpu)", pipeline_step(cpu), b * views_per_image))
        variants.append(
            Timed("ViewPipeline on worker crops (cpu)", crops_step(cpu), b * views_per_image)
        )
    if device.type == "cuda":
        variants.append(Timed("ViewPipeline (cuda)", pipeline_step(device), b * views_per_image))
        variants.append(
            Timed(
                "ViewPipeline (cuda) + uint8 upload",
                pipeline_step(device, upload=True),
                b * views_per_image,
            )
        )

    print(
        f"# {views_per_image} SimCLR views per image, {source}px -> {args.size}px "
        f"({args.interpolation}), batch {b}, {workers} workers, "
        f"torch threads {torch.get_num_threads()}, {args.rounds} rounds x ~{args.seconds}s"
    )
    run_rounds(variants, device, args.seconds, args.rounds, args.warm)

    base = variants[0]
    main_tv = next((v for v in variants if v.name.endswith("main process")), None)
    rows = []
    for v in variants:
        cpu = "-" if v.in_workers else f"{v.cpu:.0f}"
        on_host = not v.in_workers and "cuda" not in v.name
        eff = f"{main_tv.cpu / v.cpu:.1f}" if on_host and main_tv is not None else "-"
        rows.append(
            [
                v.name,
                f"{v.rate:.0f}",
                f"{v.rate / base.rate:.2f}",
                cpu,
                eff,
                f"{100 * v.spread:.0f}%",
            ]
        )
    hw = hardware(device)
    print()
    print(f"# {hw}")
    headers = ["variant", "views/s", "x DataLoader", "CPU ms/1k views", "x CPU eff.", "spread"]
    print(table(rows, headers))
    result = {
        "args": vars(args),
        "hardware": hw,
        "workers": workers,
        "results": [
            {
                "name": v.name,
                "views_per_s": v.rate,
                "x_dataloader": v.rate / base.rate,
                "main_cpu_ms_per_1k_views": None if v.in_workers else v.cpu,
                "rates": v.rates,
            }
            for v in variants
        ],
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
