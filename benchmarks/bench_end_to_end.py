"""End-to-end training throughput from a JPEG folder against synthetic device tensors.

A folder of N JPEGs of variable size and aspect (each side drawn independently in
0.75-1.25 x ``--jpeg-size``: 300-500 px by default) is written with PIL into a temporary
directory, opened as a dataset, and the same Trainer (same method, model, batch) runs
``train_step`` on:

* ``synthetic``         uint8 squares already on the device: the ceiling, no data loading;
* ``jpeg, PIL workers`` the trainer's own loader with the nvJPEG decoder switched off
                        (``BatchSource.epoch``: DataLoader workers decode with PIL and cut
                        every view from the original image), through
                        :class:`sslcli.data.loader.DevicePrefetcher`. On CUDA the trainer
                        would pick nvJPEG for a JPEG folder; this row never does;
* ``jpeg, batch decode`` workers only read bytes (``JpegBytesDataset``), the main process
                        decodes the batch with ``JpegDecoder`` (views cut from the full
                        decode on the device) in the prefetcher's helper thread, as the
                        trainer does: nvJPEG on CUDA; on a CPU the same code runs
                        libjpeg-turbo in the main process, which shows the path works but
                        is not where it pays;
* ``cached``            (``--cache``) the decoded dataset held as one uint8 tensor on the
                        device (``CachedDataset``), served by ``get_batch``.

Each timed block starts a fresh loader (as an epoch does) and runs ``--warm`` untimed steps
first, so worker start-up is excluded and no variant profits from batches its workers
buffered while another variant was being timed; the seconds to the first batch are shown
separately. Blocks are interleaved across variants (see common.py).

Example::

    python benchmarks/bench_end_to_end.py --device cuda --backbone resnet50 \\
        --image-size 224 --jpeg-size 400 --batch-size 128 --workers 16
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import Variant, hardware, interleaved, paired_ratio, table, write_json
from PIL import Image
from torch import Tensor


def write_jpegs(root: Path, n: int, side: int, seed: int = 0) -> None:
    """``n`` photo-like JPEGs (smooth colour fields plus noise), each side drawn on its own
    in 0.75-1.25 x ``side``: variable sizes, aspect ratios from 3:5 to 5:3."""
    rng = np.random.default_rng(seed)
    for k in range(n):
        h = int(side * rng.uniform(0.75, 1.25))
        w = int(side * rng.uniform(0.75, 1.25))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / side
        f = rng.uniform(1, 6, size=(3, 2))
        p = rng.uniform(0, 6.3, size=3)
        img = np.stack(
            [127 + 90 * np.sin(f[c, 0] * xx + f[c, 1] * yy + p[c]) for c in range(3)], -1
        )
        img += rng.normal(0, 12, size=img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / f"{k:06d}.jpg", "JPEG", quality=90
        )


def build_trainer(args: argparse.Namespace, data: str, device: torch.device) -> Any:
    from sslcli.api import resolve_config
    from sslcli.engine.trainer import Trainer

    overrides = {
        "backbone": {"name": args.backbone},
        "data": {
            "dataset": data,
            "image_size": args.image_size,
            "load_size": args.load_size,
            "num_workers": args.workers,
        },
        "trainer": {
            "device": device.type,
            "precision": args.precision,
            "batch_size": args.batch_size,
            "epochs": 10_000,
            "eval_knn": False,
            "log_every": 10**9,
            "out": tempfile.mkdtemp(prefix="bench-e2e-"),
        },
    }
    method_cls, run, mcfg = resolve_config(args.method, overrides=overrides)
    return Trainer(run, method_cls, mcfg)


def jpeg_batches(trainer: Any, epoch: int, workers: int) -> Iterator[Any]:
    """Packed JPEG bytes per batch, in exactly the order ``BatchSource.epoch`` uses."""
    from torch.utils.data import DataLoader

    from sslcli.data.gpu_decode import JpegBytesDataset, collate_jpeg
    from sslcli.runtime import epoch_order

    n, gb = len(trainer.dataset), trainer.global_batch
    order = epoch_order(n, trainer.run.trainer.seed, epoch)[: trainer.steps_per_epoch * gb]
    lists = [c.tolist() for c in order.view(trainer.steps_per_epoch, gb)]
    loader = DataLoader(
        JpegBytesDataset(trainer.dataset),
        batch_sampler=lists,
        num_workers=workers,
        collate_fn=collate_jpeg,
        prefetch_factor=4 if workers else None,
    )
    yield from loader


def _prepend(first: Any, rest: Any) -> Iterator[Any]:
    """``first`` then ``rest``, closing ``rest`` (its DataLoader workers) when closed."""
    try:
        yield first
        yield from rest
    finally:
        rest.close()


class LoaderVariant:
    """A loader-fed train step; each block starts a fresh epoch iterator."""

    def __init__(self, trainer: Any, make: Any, warm: int) -> None:
        self.trainer, self.make, self.warm = trainer, make, warm
        self.it: Any = None
        self.epoch = 0
        self.first_batch_s: list[float] = []

    def before(self) -> None:
        self.epoch += 1
        t0 = time.perf_counter()
        self.it = self.make(self.epoch)
        batch = next(self.it)
        self.first_batch_s.append(time.perf_counter() - t0)
        self._train(batch)
        for _ in range(self.warm - 1):
            self.step()

    def step(self) -> None:
        self._train(next(self.it))

    def _train(self, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        t = self.trainer
        t.schedule.apply(t.optimizer, t.step)
        t.train_step(*batch)
        t.step += 1

    def after(self) -> None:
        self.it.close()
        self.it = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="moco-v3")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--images", type=int, default=512, help="JPEGs to write (raised to fit)")
    p.add_argument(
        "--jpeg-size", type=int, default=400, help="typical side of the JPEGs (0.75-1.25x)"
    )
    p.add_argument("--image-size", type=int, default=32, help="view size")
    p.add_argument(
        "--load-size",
        type=int,
        default=None,
        help="side of the synthetic squares and the cache (default: view); views from JPEG "
        "files are cut from the original image",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (trainer rule)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--steps", type=int, default=6, help="timed steps per block")
    p.add_argument("--warm", type=int, default=2, help="untimed steps at each block's start")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cache", action="store_true", help="add the on-device cached variant")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--keep", default=None, help="write the JPEGs here and keep them")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.load_size = args.load_size or args.image_size
    per_epoch = args.warm + args.steps
    n = max(args.images, per_epoch * args.batch_size)
    tmp = tempfile.TemporaryDirectory(prefix="bench-jpegs-") if args.keep is None else None
    root = Path(args.keep or tmp.name)  # type: ignore[union-attr]
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_jpegs(root, n, args.jpeg_size)
    print(f"wrote {n} JPEGs (~{args.jpeg_size}px) to {root} in {time.perf_counter() - t0:.1f}s")

    from sslcli.data.cache import CachedDataset
    from sslcli.data.gpu_decode import JpegDecoder, use_gpu_decode
    from sslcli.data.loader import DevicePrefetcher

    trainer = build_trainer(args, f"folder:{root}", device)
    workers = args.workers
    if workers is None:
        import os

        workers = min(8, os.cpu_count() or 1)  # the trainer's default
    b = args.batch_size

    # -- synthetic: the ceiling ------------------------------------------------------------
    g = torch.Generator().manual_seed(0)
    s = args.load_size
    pool = [
        (
            torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(device),
            torch.zeros(b, dtype=torch.long, device=device),
            torch.arange(b, device=device),
        )
        for _ in range(4)
    ]
    k = {"i": 0}

    def synthetic() -> None:
        x, y, i = pool[k["i"] % len(pool)]
        k["i"] += 1
        trainer.schedule.apply(trainer.optimizer, trainer.step)
        trainer.train_step(x, y, i)
        trainer.step += 1

    variants = [Variant("synthetic (device uint8)", synthetic, b)]

    # -- the trainer's loader: PIL in workers -----------------------------------------------
    def pil_epoch(epoch: int) -> Iterator[Any]:
        """``BatchSource.epoch`` with its nvJPEG decoder off (the loader is built at the
        first batch, so the switch lasts exactly that long)."""
        source = trainer.batches
        saved, source.decoder = source.decoder, None
        try:
            batches = source.epoch(epoch, 0)
            first = next(batches)
        finally:
            source.decoder = saved
        return _prepend(first, batches)

    pil = LoaderVariant(trainer, pil_epoch, args.warm)
    variants.append(
        Variant("jpeg, PIL decode in workers", pil.step, b, before=pil.before, after=pil.after)
    )

    # -- bytes in workers, batch decode in the main process -----------------------------------
    decoder = JpegDecoder(trainer.dataset, args.load_size, device, plan=trainer.batches.crop_plan())
    where = "nvJPEG" if use_gpu_decode(trainer.dataset, device) else f"{device.type} libjpeg"

    def bytes_epoch(epoch: int) -> DevicePrefetcher[Any, Any]:
        return DevicePrefetcher(
            jpeg_batches(trainer, epoch, workers),
            device,
            fn=functools.partial(decoder, epoch=epoch),
            transfer=False,
            background=True,
        )

    raw = LoaderVariant(trainer, bytes_epoch, args.warm)
    variants.append(
        Variant(f"jpeg, batch decode ({where})", raw.step, b, before=raw.before, after=raw.after)
    )

    # -- whole dataset cached on the device -----------------------------------------------------
    cached = None
    if args.cache:
        t0 = time.perf_counter()
        cache = CachedDataset(trainer.dataset, device=device, num_workers=workers)
        fill_s = time.perf_counter() - t0
        print(f"cached {len(cache)} images ({cache.nbytes / 2**20:.1f} MiB) in {fill_s:.1f}s")
        from sslcli.runtime import epoch_order

        def cached_epoch(epoch: int) -> Iterator[Any]:
            order = epoch_order(len(cache), 0, epoch)
            for c in order[: (len(cache) // b) * b].view(-1, b):
                yield cache.get_batch(c)

        cached = LoaderVariant(trainer, cached_epoch, args.warm)
        variants.append(
            Variant("cached on device", cached.step, b, before=cached.before, after=cached.after)
        )

    interleaved(variants, device, steps=args.steps, rounds=args.rounds, warmup=0, log=print)

    base = variants[0]
    starts = {
        variants[1].name: pil.first_batch_s,
        variants[2].name: raw.first_batch_s,
    }
    if cached is not None:
        starts[variants[3].name] = cached.first_batch_s
    rows = []
    for v in variants:
        first = starts.get(v.name)
        rows.append(
            [
                v.name,
                f"{v.rate:.1f}",
                f"{v.rate / base.rate:.2f}",
                f"{paired_ratio(v, base):.2f}",
                f"{100 * v.spread:.0f}%",
                f"{np.median(first):.2f}" if first else "-",
            ]
        )
    hw = hardware(device)
    print()
    print(
        f"# end to end: {args.method}, {args.backbone}, {n} JPEGs of "
        f"{int(0.75 * args.jpeg_size)}-{int(1.25 * args.jpeg_size)}px per side -> views "
        f"{args.image_size}px (synthetic: {args.load_size}px squares), batch {b}, "
        f"{workers} workers, "
        f"{args.rounds} rounds x {args.steps} steps (median)"
    )
    print(f"# {hw}")
    print(table(rows, ["variant", "images/s", "x synth", "x synth (paired)", "spread", "s to 1st"]))
    if decoder.cpu_fallbacks or decoder.bad_files:
        print(f"note: {decoder.cpu_fallbacks} PIL fallbacks, {decoder.bad_files} bad files")
    result = {
        "args": vars(args),
        "hardware": hw,
        "images": n,
        "workers": workers,
        "results": [
            {
                "name": v.name,
                "images_per_s": v.rate,
                "x_synthetic": v.rate / base.rate,
                "x_synthetic_paired": paired_ratio(v, base),
                "spread": v.spread,
                "blocks_s": v.blocks,
                "first_batch_s": starts.get(v.name),
            }
            for v in variants
        ],
    }
    write_json(args.json, result)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
