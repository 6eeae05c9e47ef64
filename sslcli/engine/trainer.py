"""The training loop. It never asks which method it runs.

Phases: set-up (processes, device, data, model, optimiser) → resume → baseline evaluation
→ epochs of steps (views on the device, loss, backward, one agreed finite/stop check,
update, hooks, logs) → checkpoints (epoch ends, ``max_steps``, signals) → final evaluation.

Exact resume. Everything that shapes the rest of a run is a pure function of the global
step or lives in the checkpoint: the data order of an epoch is a permutation drawn from
``(seed, epoch)``, the position in the epoch is ``step % steps_per_epoch``, the lr / wd /
momentum schedules are functions of the step and of the schedule horizon
``epochs * steps_per_epoch`` (``trainer.max_steps`` only stops the loop early, so a run
stopped there and resumed with a larger ``max_steps`` follows the same schedule as one run
would), and the checkpoint holds the model and method buffers, the optimiser state, every
process's RNG states (Python, NumPy, torch CPU and CUDA, the augmentation generator) and the
per-step values not yet averaged into a log line. On CPU, N steps + resume + N steps give
the bit-identical weights and log of 2N steps in one go.

Host syncs: one per step (the finiteness of the loss, and of the gradient norm when
clipping, read back before the optimiser may apply the update; under DDP the same tiny
all-reduce also carries "a process received SIGINT/SIGTERM", so all processes stop at the
same step), plus one per logged line.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
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
from sslcli.data.datasets import ImageDataset, LabelledSubset, available_splits, open_dataset
from sslcli.data.gpu_decode import JpegBytesDataset, JpegDecoder, collate_jpeg, use_gpu_decode
from sslcli.data.loader import DevicePrefetcher, maybe_cache
from sslcli.engine import checkpoint as ckpt
from sslcli.engine import schedules
from sslcli.engine.optim import build_optimizer, default_param_groups, scaled_lr
from sslcli.engine.plan import DryRun
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
from sslcli.errors import CheckpointError, ConfigError, SSLError
from sslcli.eval.features import eval_transform, extract
from sslcli.eval.knn import knn_accuracies
from sslcli.eval.online_probe import OnlineProbe
from sslcli.method import Batch, Method, MethodConfig, StepInfo, StepOutput
from sslcli.nn import dist

# Fields whose change makes a checkpoint's tensors meaningless for the new run. The data
# path may change (a dataset copied to a node's local disk); its format and size may not
# (memory banks hold one row per image), which is checked once the dataset is open.
ARCH_FIELDS = ("backbone", "method", "data.image_size")
# Fields that fix how steps map onto epochs and samples; a resume must keep them.
POSITION_FIELDS = ("trainer.batch_size",)
CHECKPOINT_FORMAT = 2


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
    rank: int = 0
    """This process's rank (under torchrun, only rank 0's result carries the metrics)."""


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _diff(old: dict[str, Any], new: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    fo, fn = _flatten(old), _flatten(new)
    keys = sorted(set(fo) | set(fn))
    return [
        k
        for k in keys
        if any(k == f or k.startswith(f + ".") for f in fields) and fo.get(k) != fn.get(k)
    ]


def architecture_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted names of architecture fields that differ between two resolved configs."""
    return _diff(old, new, ARCH_FIELDS)


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


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole foreground process group: a worker killed by it would crash
    # the loader before the main process could write its checkpoint, and the main process
    # shuts its workers down itself. SIGTERM keeps its default action, because that is how
    # the loader (and multiprocessing at exit) stops a worker; a SIGTERM sent to the whole
    # group is handled in Trainer._next_batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _cpus_per_process() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(1, local))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Trainer:
    def __init__(
        self,
        run: RunConfig,
        method_cls: type[Method],
        method_config: MethodConfig,
        *,
        resume: Path | None = None,
        console: Any = None,
        dry_run: DryRun | None = None,
    ) -> None:
        self.run = run
        self.method_cls = method_cls
        self.method_config = method_config
        self.console = console
        # A dry run (``ssl train --dry-run``) goes through this same set-up, so it resolves
        # and refuses exactly what a real run would; it only skips what acts on the world:
        # joining a process group, caching data on the device, the JPEG decoder, compiling
        # and DDP wrapping. It never writes anything (the run directory is made in fit()).
        self.dry_run = dry_run
        t = run.trainer
        self._owns_process_group = False if dry_run else self._init_distributed()
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.precision, self.device)
        self._cuda = self.device.type == "cuda"

        # -- resume: refuse an incompatible config before building anything -----------------
        self.resume_path: Path | None = None
        self._resume_meta: dict[str, Any] | None = None
        if resume is not None:
            self.resume_path = ckpt.resolve(Path(resume))
            self._resume_meta = ckpt.read_meta(self.resume_path)
            self._check_resumable(self._resume_meta)
        seed_everything(t.seed + dist.rank())
        self.run_dir = self._pick_run_dir()
        t.out = str(self.run_dir)

        # -- data ------------------------------------------------------------------------------
        d = run.data
        self.load_size = d.load_size or d.image_size
        self.dataset: ImageDataset = (
            dry_run.nominal_dataset(self.load_size)
            if dry_run is not None and dry_run.images is not None
            else open_dataset(
                d.dataset, "train", self.load_size, max_bad_fraction=d.max_bad_fraction
            )
        )
        if d.cache == "device" and dry_run is None:
            self.dataset = maybe_cache(
                self.dataset, device=self.device, num_workers=self._num_workers()
            )
        gpu_ok = use_gpu_decode(self.dataset, self.device)
        if d.gpu_decode == "on" and not gpu_ok:
            raise ConfigError(
                ["data.gpu_decode: 'on' needs a folder of JPEG files and a CUDA device with nvJPEG"]
            )
        self.decoder = (
            JpegDecoder(self.dataset, self.load_size, self.device)  # type: ignore[arg-type]
            if gpu_ok and d.gpu_decode != "off" and dry_run is None
            else None
        )
        world = dry_run.processes if dry_run is not None else dist.world_size()
        if t.batch_size % world:
            raise ConfigError(
                [f"trainer.batch_size: {t.batch_size} (the global batch) is not divisible by "
                 f"{world} processes"]
            )  # fmt: skip
        self.global_batch = t.batch_size
        self.local_batch = t.batch_size // world
        n = len(self.dataset)
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise ConfigError(
                [f"trainer.batch_size: {t.batch_size} is larger than the dataset ({n} images)"]
            )
        # The schedule horizon; max_steps only stops the loop (see the module docstring).
        self.total_steps = t.epochs * self.steps_per_epoch
        self.stop_step = min(self.total_steps, t.max_steps or self.total_steps)
        if self._resume_meta is not None:
            saved = self._resume_meta.get("dataset_size")
            if saved is not None and int(saved) != n:
                raise ConfigError(
                    [f"cannot resume {self.resume_path}: it was trained on {saved} images, "
                     f"{d.dataset} now has {n}"]
                )  # fmt: skip
            old_fmt = str(self._resume_meta.get("dataset", "")).partition(":")[0]
            new_fmt = self.dataset.name.partition(":")[0]
            if old_fmt and old_fmt != new_fmt:
                raise ConfigError(
                    [f"cannot resume {self.resume_path}: it was trained on {old_fmt} data, "
                     f"{d.dataset} is {new_fmt}"]
                )  # fmt: skip

        # -- model -----------------------------------------------------------------------------
        b = run.backbone
        self.backbone_spec = make_spec(
            b.name, d.image_size, b.small_stem, b.drop_path_rate, b.kwargs
        )
        backbone = self.backbone_spec.build()
        self.method: Method = method_cls(method_config, backbone, dataset_size=n)
        if t.grad_checkpointing:
            self._grad_checkpointing()
        if world > 1 and self.run.trainer.sync_bn and dry_run is None:
            try:
                dist.convert_sync_batchnorm(self.method, self.device)
            except ValueError as e:
                raise ConfigError([str(e)]) from e
        self.method.to(self.device)
        if self._channels_last():
            self.method.to(memory_format=torch.channels_last)
        if t.compile and dry_run is None:
            self._compile()
        self.views = ViewPipeline(self.method.views())
        self.aug_gen = torch.Generator(device=self.device).manual_seed(t.seed * 7919 + dist.rank())
        self.model: nn.Module = self.method
        if world > 1 and dry_run is None:
            # DDP broadcasts rank 0's parameters and buffers here, so every process starts
            # from the same weights whatever its seed.
            self.model = nn.parallel.DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self._cuda else None,
                broadcast_buffers=False,
            )

        # -- optimiser -------------------------------------------------------------------------
        o = run.optim
        groups = self.method.param_groups() or default_param_groups(self.method, o)
        self.base_lr = scaled_lr(o, self.global_batch)
        self.optimizer = build_optimizer(groups, o, self.base_lr)
        self.warmup_steps = self._warmup_steps()
        self._probe_norm: tuple[Tensor, Tensor] | None = None
        self.probe = self._make_probe() if dry_run is None else None
        self.probe_test: float | None = None

        self.step = 0
        self.epoch = 0
        self.nonfinite = 0
        self.knn_random: float | None = None
        self.images_seen = 0
        # Per-step values of the current log window (device tensors, no sync until logged).
        self._pending: dict[str, list[Tensor]] = {}
        self._flag: _SignalFlag | None = None
        self._stop_signum: int | None = None
        self._buffer_backup: list[Tensor] | None = None
        self._last_saved_step: int | None = None

    # ------------------------------------------------------------------------------------------
    def _init_distributed(self) -> bool:
        """Join the process group torchrun describes in the environment; True if we did."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_dist():
            return False
        import torch.distributed as tdist

        use_cuda = torch.cuda.is_available() and self.run.trainer.device != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if use_cuda else "gloo")
        return True

    def close(self) -> None:
        """Leave the process group this trainer joined (no-op otherwise)."""
        if self._owns_process_group and dist.is_dist():
            import torch.distributed as tdist

            tdist.destroy_process_group()
            self._owns_process_group = False

    def _pick_run_dir(self) -> Path:
        t = self.run.trainer
        run_dir: Path
        if self.resume_path is not None and self._resume_meta is not None:
            saved_out = self._resume_meta.get("config", {}).get("trainer", {}).get("out")
            ck = self.resume_path
            here = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
            # Resuming continues the run where its checkpoint lies (even if the directory
            # was moved since); an explicitly different --out forks it into a new one.
            run_dir = here if t.out in (None, saved_out) else Path(t.out)
        else:
            run_dir = Path(t.out) if t.out else default_run_dir(self.run.method)
        # A timestamped default name could differ by a second between processes.
        return Path(dist.broadcast_object(str(run_dir)))

    def _check_resumable(self, meta: dict[str, Any]) -> None:
        old, new = meta.get("config", {}), self.run.to_json_dict()
        arch = architecture_diff(old, new)
        if arch:
            fo, fn = _flatten(old), _flatten(new)
            what = ", ".join(f"{k} ({fo.get(k)!r} -> {fn.get(k)!r})" for k in arch)
            raise ConfigError(
                [f"cannot resume {self.resume_path}: the architecture differs in {what}"]
            )
        pos = _diff(old, new, POSITION_FIELDS)
        if pos:
            raise ConfigError(
                [f"cannot resume {self.resume_path}: {', '.join(pos)} differs "
                 f"({_flatten(old).get(pos[0])} -> {_flatten(new).get(pos[0])}); the step "
                 "would no longer map to the same epoch and samples"]
            )  # fmt: skip

    def _channels_last(self) -> bool:
        cl = self.run.trainer.channels_last
        if cl is not None:
            return cl
        # Grouped convs (SK-ResNeXt) are slower in channels_last; ViTs gain nothing.
        name = self.backbone_spec.timm_name
        return self._cuda and not self.backbone_spec.is_vit and "resnext" not in name

    def _make_probe(self) -> OnlineProbe | None:
        """The online linear probe (``trainer.online_probe``), or None.

        It reads the representation that kNN, the evaluators and the export use
        (``method.embed``: the teacher for DINO, both encoders for CMC), on the batch's
        images before augmentation, in eval mode and without gradients, so the encoder, its
        BatchNorm statistics and every random stream are exactly as without the probe.
        """
        t = self.run.trainer
        if not t.online_probe:
            return None
        classes = self.dataset.classes
        if classes is None or len(classes) < 2 or not bool((self.dataset.labels >= 0).any()):
            self._say(f"trainer.online_probe: {self.run.data.dataset} has no labels; no probe")
            return None
        spec = self.method.views()[0]
        if spec.normalize:
            self._probe_norm = (
                torch.tensor(spec.mean, device=self.device),
                torch.tensor(spec.std, device=self.device),
            )
        size = self.run.data.image_size
        with torch.no_grad(), eval_mode(self.method):
            dim = self.method.embed(torch.zeros(2, 3, size, size, device=self.device)).shape[1]
        return OnlineProbe(dim, len(classes), lr=t.online_probe_lr).to(self.device)

    def _probe_step(self, images: Tensor, labels: Tensor) -> None:
        assert self.probe is not None
        if images.dtype != torch.uint8:  # float [0, 1] input: eval_transform expects 0..255
            images = images * 255
        size = self.run.data.image_size
        if self._probe_norm is None:
            x = eval_transform(images, size, normalize=False)
        else:
            x = eval_transform(images, size, True, *self._probe_norm)
        if self._channels_last():
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), eval_mode(self.method), autocast(self.device, self.dtype):
            feats = self.method.embed(x)
        self.probe.step(feats.float(), labels)

    def _grad_checkpointing(self) -> None:
        """``trainer.grad_checkpointing``: timm's activation checkpointing in every encoder
        the method built from the backbone spec (CMC's second one and momentum copies too).

        The blocks' activations are recomputed in backward instead of kept, which trades
        about one extra forward for most of the activation memory; the result is the same.
        """
        encoders = [m for m in self.method.modules() if hasattr(m, "sslcli_spec")]
        for enc in encoders:
            setter = getattr(enc, "set_grad_checkpointing", None)
            try:
                if not callable(setter):
                    raise NotImplementedError
                setter(True)
            except (NotImplementedError, AssertionError) as e:
                raise ConfigError(
                    [f"trainer.grad_checkpointing: backbone {self.run.backbone.name!r} "
                     f"({type(enc).__name__}) does not support activation checkpointing"]
                ) from e  # fmt: skip
        if not encoders:
            raise ConfigError(
                ["trainer.grad_checkpointing: this method builds no timm encoder to checkpoint"]
            )

    def _compile(self) -> None:
        try:
            self.method.backbone = torch.compile(self.method.backbone)  # type: ignore[assignment]
        except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
            self._say(f"torch.compile unavailable ({type(e).__name__}: {e}); running eagerly")

    def _warmup_steps(self) -> int:
        """Warm-up length in steps: the user's ``schedule.warmup_epochs``, or the method's
        recipe value capped at 10% of the run.

        The recipe reaches the config as its lowest layer, so a value equal to the recipe's
        is taken to be the recipe's: its warm-up (often 10 epochs, written for runs of 100+)
        would otherwise swallow a short run whole and the lr would never decay.
        """
        s = self.run.schedule
        recipe_of_run = self.method_cls.recipe_for(self.run.backbone.name)
        recipe = recipe_of_run.schedule.get("warmup_epochs")
        if s.warmup_epochs is not None and s.warmup_epochs != recipe:
            return int(round(s.warmup_epochs * self.steps_per_epoch))
        return int(min((recipe or 0) * self.steps_per_epoch, 0.1 * self.total_steps))

    def _say(self, msg: str) -> None:
        if not dist.is_main():
            return
        if self.console is not None:
            self.console.print(msg, highlight=False)
        else:
            print(msg, file=sys.stderr)

    # -- schedules ---------------------------------------------------------------------------------
    def milestone_epochs(self) -> list[float]:
        """``schedule.milestones`` in epochs: a fraction m < 1 of the run becomes the epoch
        of step round(m * total_steps), so it falls on a whole step."""
        spe = self.steps_per_epoch
        return [
            m if m >= 1 else round(m * self.total_steps) / spe for m in self.run.schedule.milestones
        ]

    def lr_factor(self, step: int) -> float:
        s = self.run.schedule
        if s.kind == "cosine":
            return schedules.warmup_cosine(
                step, self.total_steps, self.warmup_steps, s.final_lr_fraction
            )
        if s.kind == "step":
            return schedules.warmup_step(
                step, self.steps_per_epoch, self.warmup_steps, self.milestone_epochs(), s.gamma
            )
        return schedules.warmup_constant(step, self.warmup_steps)

    def _apply_schedules(self, step: int) -> float:
        f = self.lr_factor(step)
        wd_end = self.run.schedule.weight_decay_end
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] if g.get("fixed_lr") else g["base_lr"] * f
            if wd_end is not None and g["base_wd"] > 0:
                g["weight_decay"] = schedules.cosine_between(
                    step, self.total_steps, g["base_wd"], wd_end
                )
        return self.base_lr * f

    # -- checkpoints -------------------------------------------------------------------------------
    def _rank_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """This process's RNG states and unlogged per-step values."""
        tensors, meta = rng_state(self.aug_gen)
        out = {f"rng.{k}": v.detach().cpu() for k, v in tensors.items()}
        for k, vals in self._pending.items():
            out[f"log.{k}"] = torch.stack([v.detach().float().cpu() for v in vals])
        return out, {"rng": meta, "aug_device": self.device.type}

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every process takes part)."""
        rank_tensors, rank_meta = self._rank_state()
        gathered = dist.all_gather_object((rank_tensors, rank_meta))
        if not dist.is_main():
            self._last_saved_step = self.step
            return None
        per_rank: dict[str, Tensor] = {}
        for r, (tensors, _) in enumerate(gathered):
            per_rank.update({f"r{r}.{k}": v for k, v in tensors.items()})
        opt_tensors, opt_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "batch_in_epoch": self.step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": dist.world_size(),
            "nonfinite": self.nonfinite,
            "knn_random": self.knn_random,
            "dataset": self.dataset.name,
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
            "ranks": [m for _, m in gathered],
        }
        path = ckpt.save(
            self.run_dir / "checkpoints",
            self.step,
            {
                "model": self.method.state_dict(),
                "optim": opt_tensors,
                "state": per_rank,
                **({"probe": self.probe.state_dict()} if self.probe is not None else {}),
            },
            meta,
            keep=self.run.trainer.keep_checkpoints,
        )
        self._last_saved_step = self.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        groups, meta = ckpt.load(path)
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(
                f"{path} has checkpoint format {meta.get('format')}; this sslcli reads "
                f"format {CHECKPOINT_FORMAT}"
            )
        self._resume_meta = meta
        self._check_resumable(meta)
        self._load_model_state(path, groups.get("model", {}))
        # The checkpoint gives the optimiser's state (momenta, Adam moments); the current
        # config gives its hyper-parameters, so a resume may change lr or weight decay.
        current = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        try:
            self.optimizer.load_state_dict(
                ckpt.unflatten_optimizer(groups.get("optim", {}), meta["optimizer"])
            )
        except (ValueError, KeyError) as e:
            raise CheckpointError(
                f"cannot resume {path}: its optimiser state does not fit this run ({e})"
            ) from e
        for g, cur in zip(self.optimizer.param_groups, current, strict=True):
            g.update(cur)
        self._load_rank_state(groups.get("state", {}), meta)
        if self.probe is not None:
            if "probe" in groups:
                self.probe.load_state_dict(groups["probe"])
            else:
                self._say(f"{path} has no online probe: the probe starts from scratch")
        self.step = int(meta["step"])
        self.epoch = self.step // self.steps_per_epoch
        self.nonfinite = int(meta.get("nonfinite", 0))
        self.knn_random = meta.get("knn_random")
        self.images_seen = int(meta.get("images_seen", 0))
        self._last_saved_step = self.step

    def _load_model_state(self, path: Path, state: dict[str, Tensor]) -> None:
        own = self.method.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:3])}")
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:3])}")
            if shapes:
                k = shapes[0]
                parts.append(f"shape of {k} {tuple(state[k].shape)} != {tuple(own[k].shape)}")
            raise CheckpointError(f"cannot resume {path}: state mismatch ({'; '.join(parts)})")
        self.method.load_state_dict(state, strict=True)

    def _load_rank_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        r = dist.rank()
        saved_world = int(meta.get("world_size", 1))
        ranks = meta.get("ranks", [])
        prefix = f"r{r}."
        mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if saved_world != dist.world_size() and dist.is_main():
            warnings.warn(
                f"resuming a {saved_world}-process run on {dist.world_size()} processes: "
                "processes without a saved state get fresh random streams, so the run "
                "continues correctly but not bit-identically",
                stacklevel=2,
            )
        if r >= len(ranks):
            seed_everything(self.run.trainer.seed + r + 1_000_003 * int(meta["step"]))
            self._pending = {}
            return
        rng_t = {k[4:]: v for k, v in mine.items() if k.startswith("rng.")}
        aug_same_device = ranks[r].get("aug_device") == self.device.type
        set_rng_state(rng_t, ranks[r]["rng"], self.aug_gen if aug_same_device else None)
        if not aug_same_device:
            warnings.warn(
                f"the checkpoint's augmentation generator was on {ranks[r].get('aug_device')}, "
                f"this run's is on {self.device.type}: it is reseeded",
                stacklevel=2,
            )
        self._pending = {
            k[4:]: list(v.to(self.device).unbind(0))
            for k, v in mine.items()
            if k.startswith("log.")
        }

    # -- data --------------------------------------------------------------------------------------
    def _num_workers(self) -> int:
        w = self.run.data.num_workers
        if w is not None:
            return w
        # An in-memory item is a memory copy: worker processes would only add IPC.
        return 0 if self.dataset.in_memory else min(8, _cpus_per_process())

    def _batches(self, epoch: int, skip: int) -> DevicePrefetcher:
        """The epoch's batches, already on the device.

        On CUDA the next batch is copied (or JPEG-decoded) on a side stream while the
        current step computes; on CPU this is a plain pass-through.
        """
        return DevicePrefetcher(
            self._host_batches(epoch, skip),
            self.device,
            fn=self.decoder,
            transfer=self.decoder is None,
            background=self.decoder is not None,
        )

    def _host_batches(self, epoch: int, skip: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """This process's batches of ``epoch``, from batch ``skip`` on (exact resume).

        Every process computes the same permutation and takes its slice of each global
        batch, so ``trainer.batch_size`` is the global batch and the data a run sees does
        not depend on the number of processes.
        """
        order = epoch_order(len(self.dataset), self.run.trainer.seed, epoch)
        order = order[: self.steps_per_epoch * self.global_batch]
        chunks = order.view(self.steps_per_epoch, self.global_batch)
        r, lb = dist.rank(), self.local_batch
        index_lists = [c[r * lb : (r + 1) * lb] for c in chunks[skip:]]
        get_batch = getattr(self.dataset, "get_batch", None)
        if callable(get_batch):
            # In-memory data: one gather per batch, no per-item collate, no workers.
            for idx in index_lists:
                yield get_batch(idx)
            return
        workers = self._num_workers()
        loader = DataLoader(
            JpegBytesDataset(self.dataset) if self.decoder else self.dataset,  # type: ignore[arg-type]
            batch_sampler=[i.tolist() for i in index_lists],
            num_workers=workers,
            collate_fn=collate_jpeg if self.decoder else None,
            pin_memory=self._cuda and self.decoder is None,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
            worker_init_fn=_worker_init if workers else None,
            # A private generator: otherwise every new loader iterator draws its workers'
            # base seed from the global torch RNG, and a run resumed mid-epoch would draw
            # it at a different point of that stream than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.run.trainer.seed + epoch),
        )
        yield from loader

    def _next_batch(
        self, batches: Iterator[tuple[Tensor, Tensor, Tensor]]
    ) -> tuple[Tensor, Tensor, Tensor] | None:
        """The next batch, or None at the end of the epoch.

        A SIGTERM sent to the whole process group (batch schedulers do) also kills the
        DataLoader workers, and the loader then fails. The steps done so far are complete,
        so on one process that failure becomes the interruption it really is.
        """
        try:
            return next(batches)
        except StopIteration:
            return None
        except Exception:
            signum = self._flag.signum if self._flag is not None else None
            if signum is None or dist.world_size() > 1:
                raise
            self._stop_signum = signum
            return None

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[StepOutput, bool]:
        """Forward, backward and (unless the loss is not finite) the update of one step.

        Returns the method's output and whether the update was applied.
        """
        info = StepInfo(
            self.step, self.step // self.steps_per_epoch, self.total_steps, self.steps_per_epoch
        )
        nb = self._cuda  # non_blocking only means something for pinned host memory
        images = images.to(self.device, non_blocking=nb)
        views = self.views(images, generator=self.aug_gen)
        if self._channels_last():
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        batch = Batch(
            views=views,
            index=torch.as_tensor(index).to(self.device, non_blocking=nb),
            labels=torch.as_tensor(labels).to(self.device, non_blocking=nb),
        )
        if self.run.trainer.skip_nonfinite > 0:
            self._backup_buffers()
        with autocast(self.device, self.dtype):
            out = self.model(batch, info)
        self.optimizer.zero_grad(set_to_none=True)
        # Backward before the finiteness check: the check must precede the update, and
        # reading it after backward has been queued keeps the device busy while the host
        # waits. (Under DDP every process must run backward anyway: it holds collectives.)
        out.loss.backward()
        finite = torch.isfinite(out.loss.detach())
        norm = self._clip_gradients()
        if norm is not None:
            finite = finite & torch.isfinite(norm)
        if not self._agree(finite):
            # Discard the step: no update, and buffers (BN statistics, queues) that the
            # forward pass already changed are put back when a skip is allowed.
            self.optimizer.zero_grad(set_to_none=True)
            self._restore_buffers()
            return out, False
        self.method.before_optimizer_step(info)
        self.optimizer.step()
        self.method.after_optimizer_step(info)
        if self.probe is not None:
            self._probe_step(images, batch.labels)  # type: ignore[arg-type]
        return out, True

    def _clip_gradients(self) -> Tensor | None:
        o = self.run.optim
        if not o.grad_clip:
            return None
        grads = [p.grad for p in self.method.parameters() if p.grad is not None]
        if not grads:
            return None
        if o.grad_clip_mode == "norm":
            return torch.nn.utils.clip_grad_norm_(
                [p for p in self.method.parameters() if p.grad is not None], o.grad_clip
            )
        # Per tensor, as DINO's clip_gradients: g *= min(1, clip / (||g|| + 1e-6)).
        norms = torch._foreach_norm(grads)
        coefs = [torch.clamp(o.grad_clip / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, coefs)
        return torch.stack(norms).sum()

    def _agree(self, finite: Tensor) -> bool:
        """The step's one host sync: may this update be applied? (also: stop requested?)

        On several processes every one must take the same decision, or their collectives
        would no longer pair up; the same all-reduce carries the highest signal number a
        process has received, so all of them stop after the same step.
        """
        signum = self._flag.signum if self._flag is not None else None
        if dist.world_size() == 1:
            if signum is not None:
                self._stop_signum = signum
            return bool(finite)
        flags = torch.stack(
            [(~finite).to(torch.int64), torch.tensor(signum or 0, device=finite.device)]
        )
        bad, sig = dist.all_reduce_max(flags).tolist()
        if sig:
            self._stop_signum = int(sig)
        return not bad

    def _backup_buffers(self) -> None:
        bufs = list(self.method.buffers())
        if self._buffer_backup is None or len(self._buffer_backup) != len(bufs):
            self._buffer_backup = [b.detach().clone() for b in bufs]
        else:
            torch._foreach_copy_(self._buffer_backup, bufs)

    def _restore_buffers(self) -> None:
        if self._buffer_backup is None or self.run.trainer.skip_nonfinite == 0:
            return
        with torch.no_grad():
            torch._foreach_copy_(list(self.method.buffers()), self._buffer_backup)

    # -- evaluation --------------------------------------------------------------------------------
    def knn(self) -> float | None:
        """kNN top-1 on the labelled test split, or None (no labels, or not rank 0).

        The reference set is the labelled part of the training split only (STL-10's
        100,000 unlabelled images are never encoded for it).
        """
        t = self.run.trainer
        if not dist.is_main() or not t.eval_knn or self.dataset.classes is None:
            return None
        if "test" not in available_splits(self.run.data.dataset):
            return None
        train: ImageDataset = self.dataset
        if not bool((train.labels >= 0).all()):
            if not bool((train.labels >= 0).any()):
                return None
            train = LabelledSubset(train)
        test = open_dataset(self.run.data.dataset, "test", self.load_size)
        spec = self.method.views()[0]
        kw: dict[str, Any] = dict(
            size=self.run.data.image_size, device=self.device, normalize=spec.normalize,
            mean=spec.mean, std=spec.std,
        )  # fmt: skip
        if not train.in_memory:
            kw["num_workers"] = self._num_workers()
        with eval_mode(self.method), autocast(self.device, self.dtype):
            tr_f, tr_y = extract(self.method.embed, train, **kw)
            te_f, te_y = extract(self.method.embed, test, **kw)
        if self.probe is not None and self.step > 0:
            keep = te_y >= 0
            pred = self.probe.predict(te_f[keep].to(self.device)).argmax(1).cpu()
            self.probe_test = int((pred == te_y[keep]).sum()) / max(1, int(keep.sum()))
        # Similarity blocks sized to the reference set (an ImageNet-sized one never
        # materialises a 1024 x 1.28M block).
        accs = knn_accuracies(tr_f, tr_y, te_f, te_y, (t.knn_k,), t.knn_temperature)
        return accs[t.knn_k]

    # -- the run -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        t = self.run.trainer
        main = dist.is_main()
        metrics_path = self.run_dir / "metrics.jsonl"
        resumed = self.resume_path is not None
        if resumed:
            assert self.resume_path is not None
            self.load_checkpoint(self.resume_path)
            spe = self.steps_per_epoch
            self._say(
                f"resumed from {self.resume_path} at step {self.step} "
                f"(epoch {self.step // spe}, batch {self.step % spe} of {spe})"
            )
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_json(self.run, self.run_dir / "config.json")
            if resumed:
                _truncate_metrics(metrics_path, self.step)
        if self.knn_random is None and self.step == 0:
            self.knn_random = self.knn()

        tb_dir = self.run_dir / "tensorboard" if self.run.trainer.tensorboard else None
        log = Logger(
            metrics_path if main else None,
            self.console if main else None,
            self.stop_step,
            tensorboard_dir=tb_dir if main else None,
        )
        if main:
            if self.step == 0:
                log.write({"event": "start", "method": self.run.method,
                           "backbone": self.run.backbone.name, "dataset": self.dataset.name,
                           "images": len(self.dataset), "steps": self.total_steps,
                           "stop_step": self.stop_step, "world_size": dist.world_size(),
                           "knn_random": self.knn_random, "time": time.time()})  # fmt: skip
            else:
                log.write({"event": "resume", "step": self.step, "stop_step": self.stop_step,
                           "world_size": dist.world_size(), "time": time.time()})  # fmt: skip
        t_start = time.perf_counter()
        steps_run = 0
        lr = self.base_lr * self.lr_factor(max(0, self.step - 1))
        every = self.run.trainer.checkpoint_every
        with _SignalFlag() as flag, log:
            self._flag = flag
            log.advance(self.step)
            t_log = time.perf_counter()
            while self.step < self.stop_step and self._stop_signum is None:
                epoch = self.step // self.steps_per_epoch
                self.epoch = epoch
                skip = self.step - epoch * self.steps_per_epoch
                batches = self._batches(epoch, skip)
                try:
                    while (item := self._next_batch(batches)) is not None:
                        images, labels, index = item
                        lr = self._apply_schedules(self.step)
                        out, ok = self.train_step(images, labels, index)
                        if ok:
                            self._record(out)
                        else:
                            self._on_nonfinite(log, epoch)
                        self.step += 1
                        steps_run += 1
                        self.images_seen += self.global_batch
                        boundary = self.step % t.log_every == 0 or self.step == self.total_steps
                        if boundary and self._pending:  # (empty: only skipped steps)
                            now = time.perf_counter()
                            log.write(self._log_record(lr, now - t_log))
                            t_log = now
                        log.advance(self.step)
                        if every and self.step % every == 0 and self.step < self.stop_step:
                            self.save_checkpoint()
                        if self._flag.signum is not None and dist.world_size() == 1:
                            # Alone, stop right after the step the signal arrived in (with
                            # several processes the stop is agreed in the next step's sync).
                            self._stop_signum = self._flag.signum
                        if self.step >= self.stop_step or self._stop_signum is not None:
                            break
                finally:
                    batches.close()  # shuts a DataLoader's workers down now
                if self._stop_signum is not None:
                    self._interrupt(log, lr)
                epoch_end = self.step % self.steps_per_epoch == 0
                # Before the checkpoint, so a run resumed from it starts a clean epoch (every
                # process takes part in the probe's all-reduce).
                probe = self._probe_epoch() if epoch_end else {}
                if (
                    epoch_end or self.step == self.stop_step
                ) and self._last_saved_step != self.step:
                    self.save_checkpoint()
                if epoch_end and main:
                    log.write({"event": "epoch", "epoch": epoch, "step": self.step,
                               **probe, "time": time.time()})  # fmt: skip
                    if probe:
                        self._say(
                            f"epoch {epoch}: online probe top-1 {100 * probe['probe_top1']:.1f}% "
                            "(training images)"
                        )
            if self._pending:
                # Stopped by max_steps off a log boundary: report the partial window. The
                # checkpoint keeps these values, so a resumed run's next line is the same
                # as an uninterrupted run's.
                rec = self._log_record(lr, time.perf_counter() - t_log, clear=False)
                log.write({"event": "stop", "reason": "max_steps", **rec})
            elapsed = time.perf_counter() - t_start
            ips = steps_run * self.global_batch / elapsed if elapsed > 0 and steps_run else None
            knn_trained = self.knn()
            result = TrainResult(
                self.run_dir, self.step, log.last_loss, knn_trained, self.knn_random, ips,
                extra={"probe_test_top1": self.probe_test} if self.probe_test is not None else {},
                rank=dist.rank(),
            )  # fmt: skip
            if main:
                log.write({"event": "end", "step": self.step, "loss": log.last_loss,
                           "knn_top1": knn_trained, "knn_random": self.knn_random,
                           "probe_test_top1": self.probe_test,
                           "images_per_s": ips, "wall_s": elapsed,
                           "peak_mem_mb": _peak_mem_mb(self.device),
                           "time": time.time()})  # fmt: skip
            self._flag = None
        return result

    def _probe_epoch(self) -> dict[str, float]:
        """The probe's accuracy over the epoch's steps (a resumed epoch included), reset."""
        if self.probe is None:
            return {}
        stats = self.probe.compute()
        self.probe.reset()
        return stats

    def _record(self, out: StepOutput) -> None:
        """Keep the step's scalars on the device until the next log line (no sync)."""
        p = self._pending
        p.setdefault("loss", []).append(out.loss.detach().float())
        for k, v in out.logs.items():
            if isinstance(v, Tensor):
                p.setdefault(k, []).append(v.detach().float().reshape(()))
            else:  # a Python number stays on the host: a device copy would sync
                p.setdefault(k, []).append(torch.tensor(float(v)))
        if out.embedding is not None:
            # Per-dimension std of the L2-normalised embedding: ~1/sqrt(D) when healthy,
            # ~0 when collapsed (SimSiam, Sec. 4.1).
            e = torch.nn.functional.normalize(out.embedding.detach().float(), dim=1)
            p.setdefault("emb_std", []).append(e.std(0).mean())

    def _on_nonfinite(self, log: Logger, epoch: int) -> None:
        self.nonfinite += 1
        allowed = self.run.trainer.skip_nonfinite
        log.write({"event": "nonfinite", "step": self.step, "epoch": epoch,
                   "count": self.nonfinite, "allowed": allowed})  # fmt: skip
        if self.nonfinite <= allowed:
            return
        last = self.run_dir / "checkpoints" / ckpt.LAST
        if last.is_file():
            where = f"last good checkpoint: {last} (step {self._last_saved_step})"
        else:
            where = "no checkpoint was written yet"
        raise NonFiniteLoss(
            f"loss became non-finite at step {self.step} (epoch {epoch}); {where}; "
            "try a lower learning rate (--set optim.lr=...), --precision fp32, or "
            "--skip-nonfinite N to tolerate N such steps"
        )

    def _interrupt(self, log: Logger, lr: float) -> None:
        signum = self._stop_signum or signal.SIGTERM
        path = self.save_checkpoint() if self._last_saved_step != self.step else None
        if path is None and dist.is_main():
            path = self.run_dir / "checkpoints" / ckpt.LAST
        if self._pending:
            rec = self._log_record(lr, 0.0, clear=False)
            log.write({"event": "stop", "reason": _signal_name(signum), **rec})
        # Every process waits for rank 0's checkpoint: a launcher that sees one process
        # exit may kill the others.
        dist.barrier()
        code = 130 if signum == signal.SIGINT else 143
        raise Interrupted(
            f"interrupted by {_signal_name(signum)} at step {self.step}; checkpoint {path}; "
            f"resume with: ssl train {self.run.method} --resume {self.run_dir}",
            code,
        )

    def _log_record(self, lr: float, dt: float, clear: bool = True) -> dict[str, Any]:
        """Average the window's per-step values (one transfer; under DDP one all-reduce so
        the line shows the mean over processes)."""
        rec: dict[str, Any] = {"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch,
                               "lr": lr}  # fmt: skip
        keys = sorted(self._pending)
        n_steps = len(self._pending.get("loss", []))
        if keys:
            # (host-side values, Python numbers a method logged, move only here)
            dev = self.device
            means = torch.stack(
                [torch.stack([v.to(dev) for v in self._pending[k]]).mean() for k in keys]
            )
            values = dist.all_reduce_mean(means).tolist()
            rec.update(zip(keys, values, strict=True))
        if clear:
            self._pending = {}
        if dt > 0 and n_steps:
            rec["images_per_s"] = n_steps * self.global_batch / dt
        return rec


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines from beyond the checkpoint a run resumes from (written after it, by
    a run that was then killed), so the log reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        if not isinstance(rec, dict) or (rec.get("step") or 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


def _peak_mem_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # noqa: BLE001 - not on every platform
        return None


class Logger:
    """metrics.jsonl, optional TensorBoard scalars, and a progress display (a rich bar on a
    terminal, one plain line per logged step otherwise)."""

    def __init__(
        self,
        path: Path | None,
        console: Any,
        total: int,
        *,
        tensorboard_dir: Path | None = None,
    ) -> None:
        self.path = path
        self.console = console
        self.total = total
        self.last_loss: float | None = None
        self._f = open(path, "a") if path else None  # noqa: SIM115 - closed in __exit__
        self._progress: Any = None
        self._task: Any = None
        self._last: dict[str, Any] = {}
        self._tb: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._note(
                    "trainer.tensorboard: the tensorboard package is not installed "
                    "(pip install tensorboard); logging to metrics.jsonl only"
                )
            else:
                self._tb = SummaryWriter(str(tensorboard_dir))

    def _note(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, highlight=False)
        else:
            print(msg, file=sys.stderr)

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
        if self._tb is not None:
            self._tb.close()

    def write(self, rec: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")
        self._f.flush()
        if "loss" not in rec or rec["loss"] is None or "knn_top1" in rec:
            return
        self.last_loss = rec["loss"]
        if "event" not in rec:
            self._last = rec
            if self._tb is not None:
                for k, v in rec.items():
                    if k not in ("step", "epoch") and isinstance(v, (int, float)):
                        self._tb.add_scalar(f"train/{k}", v, rec["step"])
        if self._progress is None and self.console is not None:
            ips = rec.get("images_per_s")
            tag = f" ({rec['event']}: {rec.get('reason')})" if "event" in rec else ""
            self.console.print(
                f"step {rec['step']}/{self.total} epoch {rec['epoch']} "
                f"loss {rec['loss']:.4f} lr {rec['lr']:.4g}"
                + (f" {ips:.0f} img/s" if ips else "")
                + tag,
                highlight=False,
            )

    def advance(self, step: int) -> None:
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
