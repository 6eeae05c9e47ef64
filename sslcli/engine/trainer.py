"""The training loop. It never asks which method it runs.

Phases: set-up (device, data, model, optimiser) → resume → baseline evaluation → epochs of
steps (views on the device, loss, backward, update, hooks, logs) → checkpoint per epoch →
final evaluation.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sslcli.backbones import make_spec
from sslcli.config import RunConfig, save_json
from sslcli.data.augment import ViewPipeline
from sslcli.data.datasets import ImageDataset, available_splits, open_dataset
from sslcli.engine import checkpoint as ckpt
from sslcli.engine import schedules
from sslcli.engine.optim import build_optimizer, default_param_groups, scaled_lr
from sslcli.engine.runtime import (
    autocast,
    epoch_order,
    eval_mode,
    pick_device,
    pick_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)
from sslcli.errors import ConfigError, SSLError
from sslcli.eval.features import extract
from sslcli.eval.knn import knn_accuracy
from sslcli.method import Batch, Method, MethodConfig, StepInfo, StepOutput
from sslcli.nn import dist

# Fields whose change makes a checkpoint's tensors meaningless for the new run.
ARCH_FIELDS = ("backbone", "method", "data.image_size", "data.dataset")


class Interrupted(SSLError):
    """SIGINT/SIGTERM: the run stopped after a checkpoint; ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(SSLError):
    """The loss became NaN/inf more often than ``--skip-nonfinite`` allows."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float | None
    knn_trained: float | None = None
    knn_random: float | None = None
    images_per_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def architecture_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of architecture fields that differ between two resolved configs."""
    fo, fn = _flatten(old), _flatten(new)
    keys = sorted(set(fo) | set(fn))
    return [
        k
        for k in keys
        if any(k == f or k.startswith(f + ".") for f in ARCH_FIELDS) and fo.get(k) != fn.get(k)
    ]


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a step is never cut."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": restore the default and re-raise.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class Trainer:
    def __init__(
        self,
        run: RunConfig,
        method_cls: type[Method],
        method_config: MethodConfig,
        *,
        resume: Path | None = None,
        console: Any = None,
    ) -> None:
        self.run = run
        self.method_cls = method_cls
        self.method_config = method_config
        self.resume_path = resume
        self.console = console
        t = run.trainer
        self._init_distributed()
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.precision, self.device)
        if t.precision == "bf16" and self.device.type == "cpu":
            self.dtype = torch.bfloat16
        seed_everything(t.seed + dist.rank())
        self.run_dir = Path(t.out) if t.out else default_run_dir(run.method)

        # -- data ------------------------------------------------------------------------------
        d = run.data
        self.load_size = d.load_size or d.image_size
        self.dataset: ImageDataset = open_dataset(
            d.dataset, "train", self.load_size, max_bad_fraction=d.max_bad_fraction
        )
        world = dist.world_size()
        if t.batch_size % world:
            raise ConfigError([f"trainer.batch_size: {t.batch_size} is not divisible by {world} processes"])
        self.global_batch = t.batch_size
        self.local_batch = t.batch_size // world
        n = len(self.dataset)
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                [f"trainer.batch_size: {t.batch_size} is larger than the dataset ({n} images)"]
            )
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)

        # -- model -----------------------------------------------------------------------------
        b = run.backbone
        self.backbone_spec = make_spec(
            b.name, d.image_size, b.small_stem, b.drop_path_rate, b.kwargs
        )
        backbone = self.backbone_spec.build()
        self.method: Method = method_cls(method_config, backbone, dataset_size=n)
        self.method.to(self.device)
        if self._channels_last():
            self.method.to(memory_format=torch.channels_last)
        if t.compile:
            self._compile()
        self.views = ViewPipeline(self.method.views())
        self.aug_gen = torch.Generator(device=self.device).manual_seed(t.seed * 7919 + dist.rank())
        self.model: nn.Module = self.method
        if world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
            )

        # -- optimiser -------------------------------------------------------------------------
        o = run.optim
        groups = self.method.param_groups() or default_param_groups(self.method, o)
        self.base_lr = scaled_lr(o, self.global_batch)
        self.optimizer = build_optimizer(groups, o, self.base_lr)
        self.warmup_steps = self._warmup_steps()

        self.step = 0
        self.epoch = 0
        self.nonfinite = 0
        self.knn_random: float | None = None
        self.images_seen = 0

    # ------------------------------------------------------------------------------------------
    def _init_distributed(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_dist():
            import torch.distributed as tdist

            backend = "nccl" if torch.cuda.is_available() and self.run.trainer.device != "cpu" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            tdist.init_process_group(backend)

    def _channels_last(self) -> bool:
        cl = self.run.trainer.channels_last
        if cl is not None:
            return cl
        # Grouped convs (SK-ResNeXt) are slower in channels_last; ViTs gain nothing.
        name = self.backbone_spec.timm_name
        return self.device.type == "cuda" and not self.backbone_spec.is_vit and "resnext" not in name

    def _compile(self) -> None:
        try:
            self.method.backbone = torch.compile(self.method.backbone)  # type: ignore[assignment]
        except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
            self._say(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")

    def _warmup_steps(self) -> int:
        s = self.run.schedule
        if s.warmup_epochs is not None:
            return int(round(s.warmup_epochs * self.steps_per_epoch))
        recipe = self.method_cls.recipe.schedule.get("warmup_epochs", 0)
        # The official warm-up (often 10 epochs of 100+) would swallow a short run whole.
        return int(min(recipe * self.steps_per_epoch, 0.1 * self.total_steps))

    def _say(self, msg: str) -> None:
        if not dist.is_main():
            return
        if self.console is not None:
            self.console.print(msg)
        else:
            print(msg, file=sys.stderr)

    # -- schedules ---------------------------------------------------------------------------------
    def lr_factor(self, step: int) -> float:
        s = self.run.schedule
        if s.kind == "cosine":
            return schedules.warmup_cosine(step, self.total_steps, self.warmup_steps, s.final_lr_fraction)
        if s.kind == "step":
            return schedules.warmup_step(step, self.steps_per_epoch, self.warmup_steps, s.milestones, s.gamma)
        return schedules.warmup_constant(step, self.warmup_steps)

    def _apply_schedules(self, step: int) -> float:
        f = self.lr_factor(step)
        wd_end = self.run.schedule.weight_decay_end
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] if g.get("fixed_lr") else g["base_lr"] * f
            if wd_end is not None and g["base_wd"] > 0:
                g["weight_decay"] = schedules.cosine_between(step, self.total_steps, g["base_wd"], wd_end)
        return self.base_lr * f

    # -- checkpoints ---------------------------------------------------------------------------------
    def _meta(self, epoch_done: bool) -> dict[str, Any]:
        _, rng_meta = rng_state(self.aug_gen)
        _, opt_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
        return {
            "format": 1,
            "step": self.step,
            "epoch": self.epoch,
            "epoch_done": epoch_done,
            "nonfinite": self.nonfinite,
            "knn_random": self.knn_random,
            "dataset_size": len(self.dataset),
            "images_seen": self.images_seen,
            "config": self.run.to_json_dict(),
            "backbone": {
                "timm_name": self.backbone_spec.timm_name,
                "alias": self.backbone_spec.alias,
                "image_size": self.backbone_spec.image_size,
                "small_stem": self.backbone_spec.small_stem,
                "kwargs": self.backbone_spec.kwargs,
            },
            "optimizer": opt_meta,
            "rng": rng_meta,
        }

    def save_checkpoint(self, epoch_done: bool = True) -> Path | None:
        if not dist.is_main():
            return None
        rng_tensors, _ = rng_state(self.aug_gen)
        opt_tensors, _ = ckpt.flatten_optimizer(self.optimizer.state_dict())
        model_state = self.method.state_dict()
        return ckpt.save(
            self.run_dir / "checkpoints",
            self.step,
            {"model": model_state, "optim": opt_tensors, "rng": rng_tensors},
            self._meta(epoch_done),
            keep=self.run.trainer.keep_checkpoints,
        )

    def load_checkpoint(self, path: Path) -> None:
        groups, meta = ckpt.load(path)
        diff = architecture_diff(meta["config"], self.run.to_json_dict())
        if diff:
            raise ConfigError(
                [f"cannot resume {path}: the architecture differs in {', '.join(diff)}"]
            )
        missing, unexpected = self.method.load_state_dict(groups.get("model", {}), strict=False)
        if missing or unexpected:
            raise ConfigError(
                [f"cannot resume {path}: state mismatch (missing {missing[:3]}, unexpected {unexpected[:3]})"]
            )
        self.optimizer.load_state_dict(
            ckpt.unflatten_optimizer(groups.get("optim", {}), meta["optimizer"])
        )
        # The current config's lr/wd win over the saved ones: a resume may change them.
        set_rng_state(groups.get("rng", {}), meta["rng"], self.aug_gen)
        self.step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        self.nonfinite = int(meta.get("nonfinite", 0))
        self.knn_random = meta.get("knn_random")
        self.images_seen = int(meta.get("images_seen", 0))

    # -- data --------------------------------------------------------------------------------------
    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """This process's batches of ``epoch``, from batch ``skip`` on (exact resume)."""
        order = epoch_order(len(self.dataset), self.run.trainer.seed, epoch)
        order = order[: self.steps_per_epoch * self.global_batch]
        chunks = order.view(self.steps_per_epoch, self.global_batch)
        r, lb = dist.rank(), self.local_batch
        index_lists = [c[r * lb : (r + 1) * lb] for c in chunks[skip:]]
        get_batch = getattr(self.dataset, "get_batch", None)
        if callable(get_batch):
            for idx in index_lists:
                yield get_batch(idx)
            return
        workers = self.run.data.num_workers
        if workers is None:
            workers = min(8, os.cpu_count() or 1)
        loader = DataLoader(
            self.dataset,
            batch_sampler=[i.tolist() for i in index_lists],
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        yield from loader

    # -- one step ------------------------------------------------------------------------------------
    def train_step(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[StepOutput, bool]:
        info = StepInfo(self.step, self.epoch, self.total_steps, self.steps_per_epoch)
        images = images.to(self.device, non_blocking=True)
        views = self.views(images, generator=self.aug_gen)
        if self._channels_last():
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        batch = Batch(
            views=views,
            index=index.to(self.device, non_blocking=True),
            labels=labels.to(self.device, non_blocking=True),
        )
        with autocast(self.device, self.dtype):
            out = self.model(batch, info)
        # One host sync per step: an update from a NaN loss would poison the weights, so the
        # check must come before the optimiser step.
        finite = bool(torch.isfinite(out.loss.detach()))
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            return out, False
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        o = self.run.optim
        if o.grad_clip:
            params = [p for p in self.method.parameters() if p.grad is not None]
            if o.grad_clip_mode == "norm":
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            else:
                for p in params:
                    torch.nn.utils.clip_grad_norm_(p, o.grad_clip)
        self.method.before_optimizer_step(info)
        self.optimizer.step()
        self.method.after_optimizer_step(info)
        return out, True

    # -- evaluation ------------------------------------------------------------------------------------
    def knn(self) -> float | None:
        """kNN top-1 on the labelled test split, or None when the data has no labels."""
        t = self.run.trainer
        if not t.eval_knn or "test" not in available_splits(self.run.data.dataset):
            return None
        if self.dataset.classes is None:
            return None
        test = open_dataset(self.run.data.dataset, "test", self.load_size)
        spec = self.method.views()[0]
        kw = dict(size=self.run.data.image_size, device=self.device, normalize=spec.normalize,
                  mean=spec.mean, std=spec.std)
        with eval_mode(self.method), autocast(self.device, self.dtype):
            tr_f, tr_y = extract(self.method.embed, self.dataset, **kw)
            te_f, te_y = extract(self.method.embed, test, **kw)
        keep = tr_y >= 0
        return knn_accuracy(tr_f[keep], tr_y[keep], te_f, te_y, t.knn_k, t.knn_temperature)

    # -- the run --------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        t = self.run.trainer
        main = dist.is_main()
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
            self._say(f"resumed from {ckpt.resolve(self.resume_path)} at step {self.step}")
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_json(self.run, self.run_dir / "config.json")
        if self.knn_random is None and self.step == 0:
            self.knn_random = self.knn()

        metrics_path = self.run_dir / "metrics.jsonl"
        log = Logger(metrics_path if main else None, self.console, self.total_steps)
        if self.step == 0 and main:
            log.write({"event": "start", "method": self.run.method,
                       "backbone": self.run.backbone.name, "dataset": self.dataset.name,
                       "images": len(self.dataset), "steps": self.total_steps,
                       "knn_random": self.knn_random, "time": time.time()})
        last_loss: float | None = None
        t_start = time.perf_counter()
        steps_run = 0
        pending: list[StepOutput] = []
        with _SignalFlag() as flag, log:
            log.advance(self.step)
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                self.epoch = epoch
                skip = self.step - epoch * self.steps_per_epoch
                t_log = time.perf_counter()
                for images, labels, index in self._batches(epoch, skip):
                    if self.step >= self.total_steps:
                        break
                    lr = self._apply_schedules(self.step)
                    out, ok = self.train_step(images, labels, index)
                    if not ok:
                        self.nonfinite += 1
                        log.write({"event": "nonfinite", "step": self.step, "epoch": epoch})
                        if self.nonfinite > t.skip_nonfinite:
                            last = self.run_dir / "checkpoints" / ckpt.LAST
                            where = f"last good checkpoint: {last}" if last.exists() else "no checkpoint yet"
                            raise NonFiniteLoss(
                                f"loss became non-finite at step {self.step} (epoch {epoch}); "
                                f"{where}; try a lower --set optim.lr or --precision fp32"
                            )
                    pending.append(out)
                    self.step += 1
                    steps_run += 1
                    self.images_seen += self.global_batch
                    if self.step % t.log_every == 0 or self.step == self.total_steps:
                        now = time.perf_counter()
                        rec = self._log_record(pending, lr, epoch, now - t_log)
                        t_log = now
                        pending = []
                        if "loss" in rec:
                            last_loss = rec["loss"]
                        log.write(rec)
                    log.advance(self.step, last_loss)
                    if flag.signum is not None:
                        break
                if flag.signum is not None:
                    path = self.save_checkpoint(epoch_done=False)
                    code = 130 if flag.signum == signal.SIGINT else 143
                    raise Interrupted(
                        f"interrupted at step {self.step}; checkpoint {path}; resume with "
                        f"'ssl train {self.run.method} --resume {self.run_dir}'",
                        code,
                    )
                epoch_done = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                if epoch_done:
                    self.save_checkpoint(epoch_done=True)
                    if main:
                        log.write({"event": "epoch", "epoch": epoch, "step": self.step,
                                   "time": time.time()})
            elapsed = time.perf_counter() - t_start
            ips = steps_run * self.global_batch / elapsed if elapsed > 0 and steps_run else None
            knn_trained = self.knn()
            result = TrainResult(self.run_dir, self.step, last_loss, knn_trained, self.knn_random, ips)
            if main:
                log.write({"event": "end", "step": self.step, "loss": last_loss,
                           "knn_top1": knn_trained, "knn_random": self.knn_random,
                           "images_per_s": ips, "wall_s": elapsed,
                           "peak_mem_mb": _peak_mem_mb(self.device), "time": time.time()})
        return result

    def _log_record(self, outs: list[StepOutput], lr: float, epoch: int, dt: float) -> dict[str, Any]:
        """Average what the last steps logged; this is the only place that syncs the host."""
        rec: dict[str, Any] = {"step": self.step, "epoch": epoch, "lr": lr}
        if not outs:
            return rec
        rec["loss"] = float(torch.stack([o.loss.detach().float() for o in outs]).mean())
        keys = {k for o in outs for k in o.logs}
        for k in sorted(keys):
            vals = [o.logs[k] for o in outs if k in o.logs]
            rec[k] = float(torch.stack([torch.as_tensor(v, dtype=torch.float32).cpu() for v in vals]).mean())
        embs = [o.embedding for o in outs if o.embedding is not None]
        if embs:
            # Per-dimension std of the L2-normalised embedding; ~1/sqrt(D) when healthy,
            # ~0 when collapsed (SimSiam, Sec. 4.1).
            e = torch.nn.functional.normalize(embs[-1].detach().float(), dim=1)
            rec["emb_std"] = float(e.std(0).mean())
        rec["images_per_s"] = len(outs) * self.global_batch / dt if dt > 0 else None
        return rec


def _peak_mem_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # noqa: BLE001 - not on every platform
        return None


class Logger:
    """metrics.jsonl + a progress display (rich bar on a terminal, plain lines otherwise)."""

    def __init__(self, path: Path | None, console: Any, total: int) -> None:
        self.path = path
        self.console = console
        self.total = total
        self._f = open(path, "a") if path else None  # noqa: SIM115 - closed in __exit__
        self._progress: Any = None
        self._task: Any = None
        self._last: dict[str, Any] = {}
        self._t0 = time.perf_counter()

    def __enter__(self) -> Logger:
        if self.console is not None and self.path is not None and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._f is not None:
            self._f.close()

    def write(self, rec: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")
        self._f.flush()
        if "loss" in rec and "event" not in rec:
            self._last = rec
            if self._progress is None and self.console is not None:
                ips = rec.get("images_per_s")
                self.console.print(
                    f"step {rec['step']}/{self.total} epoch {rec['epoch']} "
                    f"loss {rec['loss']:.4f} lr {rec['lr']:.4g}"
                    + (f" {ips:.0f} img/s" if ips else ""),
                    highlight=False,
                )

    def advance(self, step: int, loss: float | None = None) -> None:
        if self._progress is None:
            return
        r = self._last
        info = ""
        if r:
            ips = r.get("images_per_s")
            info = f"loss {r['loss']:.4f} lr {r['lr']:.3g}" + (f" {ips:.0f} img/s" if ips else "")
        self._progress.update(self._task, completed=step, info=info)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
