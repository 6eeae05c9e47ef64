"""The first-GPU-run check: every method a few steps on CUDA, and the CUDA-only paths once.

One prepared script for the day a GPU is lent (see benchmarks/RESULTS.md, "The GPU check",
for the exact command on the device machine). In under 8 minutes on one GPU it

1. runs every registered method a few steps in bf16 (ResNet-18 at 32 px; MoCo v3 and
   DINO also ViT-S/16 at 224 px) at batch 256 from uint8 batches already on the device,
   and reports per method: ms per step, peak memory during a step, persistent memory,
   and host syncs per step, counted twice: by the Python-level guard the CPU tests use
   (``sslcli.engine.sync_guard``, device tensors only) and by CUDA's own sync reports
   (``torch.cuda.set_sync_debug_mode``); the engine's one agreed sync per step is
   expected from both;
2. runs ``--compile`` once (SimCLR, ResNet-18 at 32 px): whether it compiled or fell back,
   the first-step time and the compiled ms per step against eager;
3. launches ``torchrun --nproc_per_node=1`` twice: ``ssl train`` end to end (data loader,
   prefetcher, checkpoint, the kNN monitor on the device), and a child that joins an
   NCCL process group and times a DDP-wrapped step eager and compiled (the wrapper is
   what ``--compile`` compiles under torchrun) and checks the collectives sslcli uses;
4. decodes generated baseline, progressive, grayscale and CMYK JPEGs with nvJPEG
   (``torchvision.io.decode_jpeg(device="cuda")``) and with PIL: which kinds nvJPEG
   accepts, how far its pixels are from PIL's, and images/s of each.

Everything goes to one folder (``$OUT`` when set, else ``--out``): ``gpu_check.json``,
``gpu_check.log`` and the torchrun logs. Each section catches its own failure and the
JSON records it, so one broken path does not hide the others. Without CUDA the script
says so and exits 0; ``--dry`` prints the plan (and generates the JPEGs) on any machine.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

BUDGET_S = 7.5 * 60
DEV = "cuda"  # "cpu" with --cpu-smoke: the methods and compile sections, to test the script


def _cuda() -> bool:
    return DEV == "cuda"


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if _cuda() else 0


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if _cuda() else 0
VIT_METHODS = ("moco-v3", "dino")
JPEG_KINDS = ("baseline", "progressive", "grayscale", "cmyk")


class Log:
    """Prints and keeps every line for gpu_check.log."""

    def __init__(self, path: Path | None) -> None:
        self.f = open(path, "a") if path else None  # noqa: SIM115 - closed in close()
        self.t0 = time.perf_counter()

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        print(line, flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else gpu-check)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per method")
    p.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--skip", default="", help="sections to skip: methods,compile,torchrun,jpeg")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting sections after")
    p.add_argument("--dry", action="store_true", help="print the plan and exit (any machine)")
    p.add_argument("--ddp-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the methods and compile sections on the CPU (tests the script)")
    return p.parse_args(argv)


def out_dir(args: argparse.Namespace) -> Path:
    return Path(args.out or os.environ.get("OUT") or "gpu-check")


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """What the run would do, in order."""
    from sslcli import registry

    names = method_names(args, registry)
    steps: list[dict[str, Any]] = []
    for n in names:
        steps.append({"section": "methods", "method": n, "backbone": "resnet18", "image_size": 32,
                      "batch_size": args.batch_size})  # fmt: skip
        if n in VIT_METHODS:
            steps.append({"section": "methods", "method": n, "backbone": "vit-s",
                          "image_size": 224, "batch_size": args.batch_size})  # fmt: skip
    steps.append({"section": "compile", "method": "simclr", "backbone": "resnet18"})
    steps.append({"section": "torchrun", "runs": ["ssl train simclr", "ddp child (NCCL)"]})
    steps.append({"section": "jpeg", "kinds": list(JPEG_KINDS)})
    skip = set(filter(None, args.skip.split(",")))
    return [s for s in steps if s["section"] not in skip]


def method_names(args: argparse.Namespace, registry: Any) -> list[str]:
    names = sorted(registry.find())
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            raise SystemExit(f"--methods: unknown {', '.join(unknown)} (have {', '.join(names)})")
        names = wanted
    return names


# --------------------------------------------------------------------------------------------
# 1. every method a few steps
# --------------------------------------------------------------------------------------------


def make_trainer(method: str, backbone: str, size: int, batch: int, out: Path, **trainer: Any):  # type: ignore[no-untyped-def]
    from sslcli.api import resolve_config
    from sslcli.engine.trainer import Trainer

    overrides = {
        "backbone": {"name": backbone},
        "data": {"dataset": "digits", "image_size": size, "num_workers": 0},
        "trainer": {"device": DEV, "precision": "bf16" if _cuda() else "fp32",
                    "batch_size": batch, "epochs": 100,
                    "eval_knn": False, "log_every": 10**9, "out": str(out), **trainer},
    }  # fmt: skip
    method_cls, run, mcfg = resolve_config(method, overrides=overrides)
    return Trainer(run, method_cls, mcfg)


def device_batches(tr: Any, n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """uint8 batches on the device at the trainer's load size (indices within the data)."""
    g = torch.Generator().manual_seed(0)
    b, s = tr.local_batch, tr.load_size
    size = len(tr.dataset)
    out = []
    for k in range(n):
        x = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g)
        idx = (torch.arange(b) + k * b) % size
        out.append((x.to(DEV), torch.zeros(b, dtype=torch.long).to(DEV), idx.to(DEV)))
    return out


def count_syncs(step: Callable[[], Any]) -> dict[str, Any]:
    """Host syncs of one step: the Python-level guard and CUDA's own sync reports."""
    from sslcli.engine.sync_guard import HostSyncGuard

    _sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if _cuda():
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with HostSyncGuard(device_only=_cuda()) as g:
                step()
        finally:
            if _cuda():
                torch.cuda.set_sync_debug_mode("default")
    cuda_reports = [str(w.message).splitlines()[0] for w in caught
                    if "synchroniz" in str(w.message).lower()]  # fmt: skip
    return {
        "guard_total": len(g.calls),
        "guard_engine": g.engine_syncs(),
        "guard_unexpected": [str(c) for c in g.unexpected()],
        "cuda_reported": len(cuda_reports),
        "cuda_reports": sorted(set(cuda_reports))[:10],
    }


def run_method(method: str, backbone: str, size: int, args: argparse.Namespace, work: Path,
               log: Log) -> dict[str, Any]:  # fmt: skip
    gc.collect()  # the previous method's trainer
    _reset_peak()
    base = _allocated()
    t0 = time.perf_counter()
    tr = make_trainer(method, backbone, size, args.batch_size, work / f"{method}-{backbone}")
    pool = device_batches(tr)
    k = {"i": 0}
    losses: list[torch.Tensor] = []

    def step() -> None:
        images, labels, index = pool[k["i"] % len(pool)]
        k["i"] += 1
        tr.schedule.apply(tr.optimizer, tr.step)
        out, ok = tr.train_step(images, labels, index)
        tr.window.add(out)
        losses.append(out.loss.detach().float())
        tr.step += 1

    step()  # warm-up: cuDNN autotuning, lazy state
    _sync()
    build_s = time.perf_counter() - t0
    persistent = _allocated() - base
    _reset_peak()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        _sync()
        times.append(time.perf_counter() - t)
    peak = _peak() - base
    syncs = count_syncs(step)
    rec = tr.window.line(tr.step, 0.0, 1.0)  # one log line (its one transfer) works on CUDA
    finite = bool(torch.isfinite(torch.stack(losses)).all())
    res = {
        "method": method, "backbone": backbone, "image_size": size,
        "batch_size": args.batch_size, "dtype": str(tr.dtype), "views": len(tr.method.views()),
        "channels_last": tr.channels_last, "ms_per_step": 1000 * statistics.median(times),
        "images_per_s": args.batch_size / statistics.median(times),
        "peak_mib": peak / 2**20, "persistent_mib": persistent / 2**20,
        "first_step_s": build_s, "losses_finite": finite, "log_keys": sorted(rec),
        "syncs_per_step": syncs,
    }  # fmt: skip
    log(f"{method:10s} {backbone:8s} {size:3d}px  {res['ms_per_step']:8.1f} ms/step  "
        f"peak {res['peak_mib']:9.0f} MiB  syncs guard {syncs['guard_total']} "
        f"(engine {syncs['guard_engine']}) cuda {syncs['cuda_reported']}"
        + ("" if finite else "  NON-FINITE LOSS"))  # fmt: skip
    if syncs["guard_unexpected"]:
        log(f"  unexpected syncs: {syncs['guard_unexpected']}")
    return res


# --------------------------------------------------------------------------------------------
# 2. --compile
# --------------------------------------------------------------------------------------------


def run_compile(args: argparse.Namespace, work: Path, log: Log) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for compiled in (False, True):
        messages: list[str] = []
        tr = make_trainer("simclr", "resnet18", 32, args.batch_size, work / f"compile-{compiled}",
                          compile=compiled)  # fmt: skip
        tr.forward.say = messages.append
        pool = device_batches(tr)
        t = time.perf_counter()
        tr.train_step(*pool[0])
        _sync()
        first = time.perf_counter() - t
        times = []
        for i in range(max(3, args.steps)):
            t = time.perf_counter()
            tr.train_step(*pool[i % 2])
            _sync()
            times.append(time.perf_counter() - t)
        key = "compiled" if compiled else "eager"
        fell_back = compiled and tr.forward.model is tr.method
        res[key] = {"first_step_s": first, "ms_per_step": 1000 * statistics.median(times),
                    "messages": messages, "fell_back": fell_back}  # fmt: skip
        log(f"compile={compiled}: first step {first:.1f} s, "
            f"{res[key]['ms_per_step']:.1f} ms/step {messages or ''}")  # fmt: skip
        del tr, pool
        gc.collect()
        _reset_peak()
    return res


# --------------------------------------------------------------------------------------------
# 3. torchrun
# --------------------------------------------------------------------------------------------


def run_torchrun(args: argparse.Namespace, out: Path, work: Path, log: Log) -> dict[str, Any]:
    res: dict[str, Any] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "4"}
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    run_dir = work / "torchrun-train"
    cmds = {
        "ssl_train": base + ["-m", "sslcli", "train", "simclr", "--data", "digits",
                             "--backbone", "resnet18", "--image-size", "32",
                             "--batch-size", str(args.batch_size), "--epochs", "2",
                             "--out", str(run_dir), "--device", "cuda",
                             "--set", "trainer.max_steps=6", "--set", "trainer.log_every=2",
                             "--set", "trainer.eval_knn=true"],
        "ddp_child": base + [str(Path(__file__).resolve()), "--ddp-child", "--out", str(out),
                             "--batch-size", str(args.batch_size)],
    }  # fmt: skip
    for name, cmd in cmds.items():
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=180)  # fmt: skip
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = -9, f"timed out after 180 s\n{e.stdout or ''}{e.stderr or ''}"
        (out / f"torchrun_{name}.log").write_text(f"$ {' '.join(cmd)}\n{text}")
        res[name] = {"rc": rc, "s": time.perf_counter() - t}
        log(f"torchrun {name}: rc {rc} in {res[name]['s']:.0f} s")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        (out / "torchrun_metrics.jsonl").write_text(metrics.read_text())
        recs = [json.loads(line) for line in metrics.read_text().splitlines()]
        end = next((r for r in recs if r.get("event") == "end"), {})
        res["ssl_train"].update(knn_top1=end.get("knn_top1"), knn_random=end.get("knn_random"),
                                peak_mem_mb=end.get("peak_mem_mb"))  # fmt: skip
    child = out / "ddp_child.json"
    if child.is_file():
        res["ddp_child"].update(json.loads(child.read_text()))
    return res


def ddp_child(args: argparse.Namespace) -> None:
    """Under torchrun (one process): NCCL, the dist helpers, a DDP step eager/compiled."""
    import torch.distributed as tdist
    from torch import nn

    from sslcli.engine.forward import StepForward
    from sslcli.engine.setup import no_buffer_sync
    from sslcli.nn import dist

    out = out_dir(args)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    tdist.init_process_group("nccl")
    res: dict[str, Any] = {"backend": tdist.get_backend(), "world": tdist.get_world_size()}
    x = torch.arange(6.0, device="cuda").view(3, 2)
    res["gather_rows_ok"] = bool(torch.equal(dist.gather_rows(x), x))
    res["all_reduce_ok"] = bool(torch.equal(dist.all_reduce_sum(x), x))
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-child-{os.getpid()}"
    tr = make_trainer("simclr", "resnet18", 32, args.batch_size, work)
    dist.broadcast_module_(tr.method)
    ddp = nn.parallel.DistributedDataParallel(tr.method, device_ids=[local], **no_buffer_sync())
    pool = device_batches(tr)
    for mode in ("eager", "compiled"):
        tr.forward = StepForward(
            ddp, tr.method, tr.say, device=tr.device, compile=mode == "compiled"
        )
        t = time.perf_counter()
        tr.train_step(*pool[0])
        _sync()
        first = time.perf_counter() - t
        times = []
        for i in range(max(3, args.steps)):
            t = time.perf_counter()
            tr.train_step(*pool[i % 2])
            _sync()
            times.append(time.perf_counter() - t)
        res[mode] = {"first_step_s": first, "ms_per_step": 1000 * statistics.median(times),
                     "fell_back": mode == "compiled" and tr.forward.model is ddp}  # fmt: skip
    (out / "ddp_child.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    tdist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# 4. JPEG decoding: nvJPEG vs PIL
# --------------------------------------------------------------------------------------------


def make_jpegs(n: int = 32, size: tuple[int, int] = (320, 240)) -> dict[str, list[bytes]]:
    """``n`` photo-like JPEGs (smooth gradients + noise) of each kind, made with PIL."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    out: dict[str, list[bytes]] = {k: [] for k in JPEG_KINDS}
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2 + i) % 256, (xx + yy) % 256], -1)
        rgb = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        img = Image.fromarray(rgb, "RGB")
        for kind in JPEG_KINDS:
            buf = io.BytesIO()
            if kind == "baseline":
                img.save(buf, "JPEG", quality=90)
            elif kind == "progressive":
                img.save(buf, "JPEG", quality=90, progressive=True)
            elif kind == "grayscale":
                img.convert("L").save(buf, "JPEG", quality=90)
            else:
                img.convert("CMYK").save(buf, "JPEG", quality=90)
            out[kind].append(buf.getvalue())
    return out


def pil_decode(data: list[bytes]) -> list[torch.Tensor]:
    import numpy as np
    from PIL import Image

    return [torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1)
            for b in data]  # fmt: skip


def run_jpeg(log: Log) -> dict[str, Any]:
    from torchvision.io import ImageReadMode, decode_jpeg

    res: dict[str, Any] = {}
    for kind, data in make_jpegs().items():
        t = time.perf_counter()
        ref = pil_decode(data)
        pil_s = time.perf_counter() - t
        r: dict[str, Any] = {"images": len(data), "pil_images_per_s": len(data) / pil_s}
        raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        try:
            decode_jpeg(raw[:2], device="cuda", mode=ImageReadMode.RGB)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            got = decode_jpeg(raw, device="cuda", mode=ImageReadMode.RGB)
            torch.cuda.synchronize()
            r["nvjpeg_images_per_s"] = len(data) / (time.perf_counter() - t)
            diffs = [(g.cpu().int() - p.int()).abs() for g, p in zip(got, ref, strict=True)]
            r["shapes_match"] = all(g.shape == p.shape for g, p in zip(got, ref, strict=True))
            r["max_abs_diff_vs_pil"] = max(int(d.max()) for d in diffs)
            r["mean_abs_diff_vs_pil"] = float(sum(d.float().mean() for d in diffs) / len(diffs))
            r["nvjpeg"] = "ok"
        except Exception as e:  # noqa: BLE001 - a kind nvJPEG refuses is a result
            r["nvjpeg"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        res[kind] = r
        log(f"jpeg {kind:11s} PIL {r['pil_images_per_s']:7.0f} img/s  nvJPEG {r['nvjpeg']}"
            + (f" {r['nvjpeg_images_per_s']:7.0f} img/s, max |diff| {r['max_abs_diff_vs_pil']}"
               if r["nvjpeg"] == "ok" else ""))  # fmt: skip
    return res


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import torchvision

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "torchvision": torchvision.__version__,
                           "cuda_available": torch.cuda.is_available()}  # fmt: skip
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_mem_gib=p.total_memory / 2**30, cuda=torch.version.cuda,
                   capability=f"{p.major}.{p.minor}",
                   cudnn=torch.backends.cudnn.version())  # fmt: skip
    return env


def main(argv: list[str] | None = None) -> dict[str, Any]:
    global DEV
    args = parse_args(argv)
    DEV = "cpu" if args.cpu_smoke else "cuda"
    if args.ddp_child:
        ddp_child(args)
        return {}
    out = out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    result: dict[str, Any] = {"args": vars(args), "environment": environment()}
    steps = plan(args)
    result["plan"] = steps
    if args.dry:
        log(f"plan ({len(steps)} items):")
        for s in steps:
            log(f"  {s}")
        jpegs = make_jpegs(n=2)
        decoded = {k: [tuple(t.shape) for t in pil_decode(v)] for k, v in jpegs.items()}
        result["dry"] = {"jpeg_kinds_pil_decoded": decoded}
        log(f"generated and PIL-decoded JPEGs: {decoded}")
        _write(out, result, log)
        return result
    if args.cpu_smoke:
        steps = [s for s in steps if s["section"] in ("methods", "compile")]
    elif not torch.cuda.is_available():
        log("no CUDA device here: the GPU check is skipped (--dry shows what it would run)")
        result["skipped"] = "no CUDA device"
        _write(out, result, log)
        return result

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def time_left() -> bool:
        return time.perf_counter() - t_start < args.budget_s

    def section(name: str, fn: Callable[[], Any]) -> Any:
        if not time_left():
            log(f"{name}: skipped, time budget spent")
            return {"skipped": "time budget"}
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - record and go on with the next section
            log(f"{name}: FAILED {type(e).__name__}: {e}")
            return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}

    log(f"environment: {result['environment']}")
    if any(s["section"] == "methods" for s in steps):
        result["methods"] = [
            section(f"{s['method']} {s['backbone']}",
                    lambda s=s: {**s, **run_method(s["method"], s["backbone"], s["image_size"],
                                                   args, work, log)})  # fmt: skip
            for s in steps if s["section"] == "methods"
        ]  # fmt: skip
        _write(out, result, log)
    if any(s["section"] == "compile" for s in steps):
        result["compile"] = section("compile", lambda: run_compile(args, work, log))
        _write(out, result, log)
    if any(s["section"] == "torchrun" for s in steps):
        result["torchrun"] = section("torchrun", lambda: run_torchrun(args, out, work, log))
        _write(out, result, log)
    if any(s["section"] == "jpeg" for s in steps):
        result["jpeg"] = section("jpeg", lambda: run_jpeg(log))
    result["wall_s"] = time.perf_counter() - t_start
    _write(out, result, log)
    log(f"done in {result['wall_s']:.0f} s; results in {out / 'gpu_check.json'}")
    log.close()
    return result


def _write(out: Path, result: dict[str, Any], log: Log) -> None:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
