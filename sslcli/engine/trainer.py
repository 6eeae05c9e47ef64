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

import functools
import json
import math
import os
import shutil
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

from sslcli import contract, registry
from sslcli.backbones import feature_dim, make_spec
from sslcli.config import RunConfig, flatten_dotted, save_json
from sslcli.data.augment import ViewPipeline
from sslcli.data.cache import maybe_cache
from sslcli.data.crops import CropDataset, CropPlan, Crops, collate_crops
from sslcli.data.datasets import available_splits, open_dataset
from sslcli.data.gpu_decode import JpegBytesDataset, JpegDecoder, collate_jpeg, use_gpu_decode
from sslcli.data.images import ImageDataset, LabelledSubset
from sslcli.data.loader import DevicePrefetcher, to_device
from sslcli.engine.dryrun import DryRun
from sslcli.engine.knn_monitor import knn_monitor
from sslcli.errors import (
    CheckpointError,
    ConfigError,
    Interrupted,
    MethodContractError,
    NonFiniteLoss,
)
from sslcli.eval.features import eval_transform
from sslcli.eval.online_probe import OnlineProbe
from sslcli.method import (
    Batch,
    Method,
    MethodConfig,
    RunContext,
    StepInfo,
    StepOutput,
    resume_safe_options,
)
from sslcli.nn import dist, schedules
from sslcli.optim import (
    build_optimizer,
    match_param_layout,
    scaled_lr,
)
from sslcli.runs import checkpoint as ckpt
from sslcli.runs import layout as rundir
from sslcli.runtime import (
    autocast,
    configure_backends,
    epoch_order,
    eval_mode,
    pick_device,
    pick_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
)

# Fields whose change makes a checkpoint's tensors meaningless for the new run. The data
# path may change (a dataset copied to a node's local disk); its format and size may not
# (memory banks hold one row per image), which is checked once the dataset is open.
ARCH_FIELDS = ("backbone", "method", "data.image_size")
# Fields that fix how steps map onto epochs and samples; a resume must keep them.
POSITION_FIELDS = ("trainer.batch_size",)
CHECKPOINT_FORMAT = 2


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


def _diff(old: dict[str, Any], new: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    fo, fn = flatten_dotted(old), flatten_dotted(new)
    keys = sorted(set(fo) | set(fn))
    return [
        k
        for k in keys
        if any(k == f or k.startswith(f + ".") for f in fields) and fo.get(k) != fn.get(k)
    ]


# Backbone constructor arguments that only set the initial weights: a checkpoint's weights
# replace them, so they may differ on resume.
INIT_ONLY_ARGS = ("zero_init_last", "weight_init")


def architecture_diff(
    old: dict[str, Any], new: dict[str, Any], resume_safe: frozenset[str] = frozenset()
) -> list[str]:
    """Dotted names of architecture fields that differ between two resolved configs;
    ``resume_safe``: method options marked safe to change (``method.NAME`` left out)."""
    return [
        k
        for k in _diff(old, new, ARCH_FIELDS)
        if not (k.startswith("method.") and k.split(".")[1] in resume_safe)
    ]


# Slurm's pre-emption warning (sbatch --signal=USR1@90) and batch systems' stop signal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()
)


class _SignalFlag:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag checked between steps, so a step is never
    cut."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalFlag:
        for s in _STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread)
                pass
        self._defer_worker_deaths()
        return self

    def _defer_worker_deaths(self) -> None:
        """A signal sent to the whole process group also kills the DataLoader workers, and
        torch's SIGCHLD handler would raise "worker killed" anywhere in the main process,
        even mid-update. Once a stop signal is in, a dead worker is expected: the handler
        is then skipped and the loop stops at the step's end. (Python runs pending
        handlers in signal-number order, so SIGINT/SIGUSR1/SIGTERM come before SIGCHLD.)"""
        if not hasattr(signal, "SIGCHLD") or signal.SIGCHLD in self._old:
            return
        try:
            from torch.utils.data._utils import signal_handling

            signal_handling._set_SIGCHLD_handler()  # torch's, installed now, chained below
            previous = signal.getsignal(signal.SIGCHLD)

            def on_child(signum: int, frame: Any) -> None:
                if self.signum is None and callable(previous):
                    previous(signum, frame)

            self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, on_child)
        except (ImportError, AttributeError, ValueError):  # other torch versions, threads
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": restore the default and re-raise.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def _worker_init(worker_id: int) -> None:
    # Ctrl-C reaches the whole foreground process group: a worker killed by it would crash
    # the loader before the main process could write its checkpoint, and the main process
    # shuts its workers down itself. SIGTERM keeps its default action, because that is how
    # the loader (and multiprocessing at exit) stops a worker; a SIGTERM sent to the whole
    # group is handled in Trainer._next_batch. Slurm sends its pre-emption warning
    # (--signal=USR1@T) to every process of the job step: it is the main process's to act on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


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
        force: bool = False,
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
        configure_backends(self.device)

        # -- resume: refuse an incompatible config before building anything -----------------
        self.resume_path: Path | None = None
        self._resume_meta: dict[str, Any] | None = None
        self._resume_loaded: tuple[dict[str, dict[str, Tensor]], dict[str, Any]] | None = None
        if resume is not None:
            # The newest checkpoint that verifies (a damaged last.safetensors falls back).
            self.resume_path, groups, self._resume_meta = ckpt.find_resumable(
                Path(resume), self._say
            )
            self._resume_loaded = (groups, self._resume_meta)
            self._check_resumable(self._resume_meta)
        seed_everything(t.seed + dist.rank())
        self.run_dir = self._pick_run_dir()
        t.out = str(self.run_dir)
        self.force = force
        self._run_lock: rundir.RunLock | None = None
        if dist.is_main():  # refuse another run's or an export's directory before set-up
            rundir.check_out(self.run_dir, run.method, resume=self._in_place(), force=force)

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
        # The method contributes its own architecture's arguments (initialisation, MoCo v3's
        # 12-head ViT-S) through the factory, so the spec records what was built.
        self.backbone_spec = make_spec(
            b.name, d.image_size, b.small_stem, b.drop_path_rate, b.kwargs, method=method_cls
        )
        if self._resume_meta is not None:
            self._check_same_backbone(self._resume_meta)
        backbone = self.backbone_spec.build()
        # Options the method sizes from the backbone and data, where the user stated none.
        ctx = RunContext(self.backbone_spec.timm_name, feature_dim(backbone), d.image_size, n,
                         self.device.type)  # fmt: skip
        self.method_config = method_config = contract.apply_option_defaults(
            method_cls, run, method_config, ctx
        )
        self.method: Method = contract.build_method(method_cls, method_config, backbone, n)
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
        self.views = ViewPipeline(contract.check_views(self.method))
        self.aug_gen = torch.Generator(device=self.device).manual_seed(t.seed * 7919 + dist.rank())
        self.model: nn.Module = self.method
        if world > 1 and dry_run is None:
            # DDP broadcasts rank 0's parameters here (its buffers only below).
            self.model = nn.parallel.DistributedDataParallel(
                self.method,
                device_ids=[self.device.index] if self._cuda else None,
                **_no_buffer_sync(),
            )
        # Every process seeded seed + rank before building the model: rank 0's random
        # state (MoCo's queue, memory banks; DDP already sent the parameters) for all.
        dist.broadcast_module_(self.method)
        self._eager_model: nn.Module | None = None
        if t.compile and dry_run is None:
            self._compile()

        # -- optimiser -------------------------------------------------------------------------
        o = run.optim
        groups = contract.param_groups(self.method, o)
        self.base_lr = scaled_lr(o, self.global_batch)
        self.optimizer = build_optimizer(groups, o, self.base_lr)
        self.warmup_steps = self._warmup_steps()
        self._probe_norm: tuple[Tensor, Tensor] | None = None
        self.probe = self._make_probe() if dry_run is None else None
        if self.probe is not None:
            dist.broadcast_module_(self.probe)
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
        """Leave the process group this trainer joined (no-op otherwise); unlock the run."""
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()  # type: ignore[union-attr]
            self._run_lock = None
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

    def _in_place(self) -> bool:
        """Whether this run continues its checkpoint's own run directory."""
        if self.resume_path is None:
            return False
        ck = self.resume_path
        here = ck.parent.parent if ck.parent.name == "checkpoints" else ck.parent
        return here.resolve() == self.run_dir.resolve()

    def _check_same_backbone(self, meta: dict[str, Any]) -> None:
        """Refuse a checkpoint whose backbone was built with other constructor arguments
        than the one built now (e.g. the 12 heads a newer sslcli gives MoCo v3's ViT-S):
        the parameter shapes can be the same, so loading would not notice."""
        saved = meta.get("backbone")
        if not isinstance(saved, dict):
            return
        old = {k: v for k, v in dict(saved.get("kwargs") or {}).items() if k not in INIT_ONLY_ARGS}
        new = {k: v for k, v in self.backbone_spec.kwargs.items() if k not in INIT_ONLY_ARGS}
        # Through JSON, as the checkpoint stored them (tuples become lists).
        new = json.loads(json.dumps(new))
        diff = [
            f"{k} ({old.get(k, 'unset')!r} -> {new.get(k, 'unset')!r})"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
        ]
        if saved.get("timm_name", self.backbone_spec.timm_name) != self.backbone_spec.timm_name:
            diff.insert(0, f"model ({saved['timm_name']!r} -> {self.backbone_spec.timm_name!r})")
        if diff:
            raise ConfigError(
                [f"cannot resume {self.resume_path}: this sslcli builds its backbone with "
                 f"other arguments: {', '.join(diff)}; continue it with the sslcli version "
                 "that started it"]
            )  # fmt: skip

    def _check_resumable(self, meta: dict[str, Any]) -> None:
        old, new = meta.get("config", {}), self.run.to_json_dict()
        safe = resume_safe_options(self.method_cls.Config)
        arch = architecture_diff(old, new, safe)
        fo, fn = flatten_dotted(old), flatten_dotted(new)
        if arch:
            what = ", ".join(f"{k} ({fo.get(k)!r} -> {fn.get(k)!r})" for k in arch)
            raise ConfigError(
                [f"cannot resume {self.resume_path}: the architecture differs in {what}"]
            )
        pos = _diff(old, new, POSITION_FIELDS)
        if pos:
            raise ConfigError(
                [f"cannot resume {self.resume_path}: {', '.join(pos)} differs "
                 f"({fo.get(pos[0])} -> {fn.get(pos[0])}); the step "
                 "would no longer map to the same epoch and samples"]
            )  # fmt: skip
        changed = [k for k in _diff(old, new, ("method",)) if k not in arch]
        if changed:
            self._say("resuming with changed options (marked safe to change): " + ", ".join(
                f"{k} {fo.get(k)!r} -> {fn.get(k)!r}" for k in changed))  # fmt: skip

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
        """``torch.compile`` the module each step calls: the DDP wrapper under torchrun
        (compiling the wrapper is what lets the compiler split the graph at DDP's bucket
        boundaries, so gradient all-reduces still overlap the backward pass; a compiled
        module inside DDP would deliver all its gradients at the end), the method alone
        otherwise. ``self.method`` stays the plain module: checkpoints hold its plain
        parameter names, so a run compiled or not resumes either way. The compiler only
        runs at the first call, which :meth:`_forward` guards."""
        try:
            compiled = torch.compile(self.model)
        except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
            self._say(f"torch.compile unavailable ({_first_line(e)}); running eagerly")
            return
        self._eager_model, self.model = self.model, compiled  # type: ignore[assignment]

    def _forward(self, batch: Batch, info: StepInfo) -> StepOutput:
        """The model's forward; the first compiled one falls back to eager on failure.

        Compilation errors (no C++ compiler, no Python headers, an unsupported backend)
        surface at the first call, not at ``torch.compile``. A failure there restores
        the buffers and RNG state a partly run forward may have changed, tells the user
        in one line and runs the step eagerly; an error of the model itself then recurs
        in the eager forward and propagates as it would without ``--compile``.
        """
        eager = self._eager_model
        if eager is None:
            return self.model(batch, info)  # type: ignore[no-any-return]
        self._eager_model = None
        saved = [b.detach().clone() for b in self.method.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self._cuda else None
        try:
            return self.model(batch, info)  # type: ignore[no-any-return]
        except Exception as e:  # noqa: BLE001 - whatever the compiler raised
            with torch.no_grad():
                for b, v in zip(self.method.buffers(), saved, strict=True):
                    b.copy_(v)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self.model = eager
            self._say(f"torch.compile failed at the first step ({_first_line(e)}); "
                      "running eagerly")  # fmt: skip
            return self.model(batch, info)  # type: ignore[no-any-return]

    def _warmup_steps(self) -> int:
        """Warm-up length in steps.

        A warm-up the user states (``schedule.warmup_epochs`` from a recipe file, a flag or
        --set) is used as stated: an official recipe's warm-up (MoCo v3 ViT: 40 of 300
        epochs) is part of that recipe. Only the built-in default, the method's class
        recipe when nothing states a warm-up, is capped at 10 % of the run, so a short run
        is not all warm-up; the cap says so in one line when it shortens it.
        """
        s = self.run.schedule
        spe = self.steps_per_epoch
        if s.warmup_epochs is not None:
            return int(round(s.warmup_epochs * spe))
        default = self.method_cls.recipe_for(self.run.backbone.name).schedule.get(
            "warmup_epochs"
        )
        steps = int(round((default or 0) * spe))
        cap = int(0.1 * self.total_steps)
        if steps > cap:
            self._say(
                f"warm-up: {self.method_cls.name}'s default {default:g} epochs is more than "
                f"10% of this {self.run.trainer.epochs}-epoch run; using {cap} steps "
                f"({cap / spe:.3g} epochs). Set schedule.warmup_epochs to keep a longer one."
            )
            return cap
        return steps

    def _say(self, msg: str) -> None:
        if not dist.is_main():
            return
        if self.console is not None:
            from rich.markup import escape

            # Messages carry paths and plugin text: '[...]' in them is not markup.
            self.console.print(escape(msg), highlight=False)
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
                step,
                self.steps_per_epoch,
                self.warmup_steps,
                self.milestone_epochs(),
                s.gamma,
                s.milestone_factors,
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
            "plugin": registry.info_of(self.method_cls).record(),
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
        loaded, self._resume_loaded = self._resume_loaded, None
        fresh = loaded is None or path != self.resume_path
        groups, meta = ckpt.load(path) if fresh else loaded  # type: ignore[misc]
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
        match_param_layout(self.optimizer)
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
        if self.decoder is not None:
            self.decoder.plan = self._crop_plan()
        return DevicePrefetcher(
            self._host_batches(epoch, skip),
            self.device,
            fn=None if self.decoder is None else functools.partial(self.decoder, epoch=epoch),
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
        get_batch = getattr(self.dataset, "get_batch", None)
        where = getattr(self.dataset, "device", None)
        if callable(get_batch) and isinstance(where, torch.device) and where.type != "cpu":
            # A device cache indexes on the device: one copy of the order per epoch instead
            # of a blocking host-to-device index copy per batch.
            chunks = chunks.to(where)
        index_lists = [c[r * lb : (r + 1) * lb] for c in chunks[skip:]]
        if callable(get_batch):
            # In-memory data: one gather per batch, no per-item collate, no workers.
            for idx in index_lists:
                yield get_batch(idx)
            return
        workers = self._num_workers()
        # Image files: every view is cut from the original image in the workers (or, with
        # nvJPEG, from the full decode on the device), boxes a pure function of the seed,
        # the epoch and the sample.
        source: Any = (
            JpegBytesDataset(self.dataset)  # type: ignore[arg-type]
            if self.decoder
            else CropDataset(self.dataset, self._crop_plan(), epoch)
        )
        loader = DataLoader(
            source,
            batch_sampler=[i.tolist() for i in index_lists],
            num_workers=workers,
            collate_fn=collate_jpeg if self.decoder else collate_crops,
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

    def _crop_plan(self) -> CropPlan:
        """The training crops of image files (plus the probe's evaluation square)."""
        full = self.load_size if self.probe is not None else None
        return CropPlan.of(self.method.views(), self.run.trainer.seed, full)

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
        images = to_device(images, self.device, non_blocking=nb)  # a Tensor or Crops
        views = self.views(images, generator=self.aug_gen)
        if self._channels_last():
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        batch = Batch(
            views=views,
            index=torch.as_tensor(index).to(self.device, non_blocking=nb),
            labels=torch.as_tensor(labels).to(self.device, non_blocking=nb),
            index_distinct=True,  # each epoch's order is a permutation
        )
        if self.run.trainer.skip_nonfinite > 0:
            self._backup_buffers()
        # Before the forward: the previous step's gradients would otherwise stay alive
        # through the forward's activation peak.
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.dtype):
            out = contract.check_step_output(self.method, self._forward(batch, info))
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
            full = images.full if isinstance(images, Crops) else images
            assert full is not None  # the crop plan asks for it when the probe is on
            self._probe_step(full, batch.labels)  # type: ignore[arg-type]
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
        # (on the stacked norms: a fixed number of kernels however many tensors)
        norms = torch.stack(torch._foreach_norm(grads))
        coefs = torch.clamp(o.grad_clip / (norms + 1e-6), max=1.0)
        torch._foreach_mul_(grads, list(coefs.unbind(0)))
        return norms.sum()

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
        # (torch.full fills on the device; torch.tensor would copy a host value there)
        flags = torch.stack(
            [(~finite).to(torch.int64),
             torch.full((), signum or 0, dtype=torch.int64, device=finite.device)]
        )  # fmt: skip
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
        100,000 unlabelled images are never encoded for it), at most
        ``trainer.knn_max_train`` images of it. Every process takes part (see
        :mod:`sslcli.engine.knn_monitor`): the decision to run depends only on the config
        and the data, so all of them take it alike.
        """
        t = self.run.trainer
        if not t.eval_knn or self.dataset.classes is None:
            return None
        if len(self.dataset.classes) < 2:
            # Every neighbour votes for the one class: 100% whatever the encoder learnt.
            self._say(f"kNN skipped: {self.run.data.dataset} has a single class, so its "
                      "accuracy would be 100% for any encoder")  # fmt: skip
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
            size=self.run.data.image_size, normalize=spec.normalize,
            mean=spec.mean, std=spec.std,
        )  # fmt: skip
        if not train.in_memory:
            kw["num_workers"] = self._num_workers()
        with eval_mode(self.method), autocast(self.device, self.dtype):
            res = knn_monitor(
                self.method.embed, self.method, train, test, k=t.knn_k,
                temperature=t.knn_temperature, num_classes=len(self.dataset.classes),
                max_train=t.knn_max_train, seed=t.seed, device=self.device, extract_kw=kw,
            )  # fmt: skip
        if self.probe is not None and self.step > 0:
            keep = res.query_labels >= 0
            pred = self.probe.predict(res.queries[keep]).argmax(1)
            hits = torch.stack([(pred == res.query_labels[keep]).sum(), keep.sum()]).double()
            right, n = dist.all_reduce_sum(hits).tolist()
            self.probe_test = right / max(1.0, n)
        return res.top1 if dist.is_main() else None

    # -- the run -----------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        # A run that breaks the method contract before its first checkpoint leaves nothing
        # that looks like a run (config.json, a metrics.jsonl with only a start event).
        fresh = self.resume_path is None and dist.is_main()
        created = fresh and not self.run_dir.exists()
        try:
            return self._fit()
        except MethodContractError:
            if fresh and self._last_saved_step is None:
                self._discard_unstarted_run(created)
            raise
        except KeyboardInterrupt:
            # Ctrl-C outside the steps (the baseline kNN, start-up) or a second one while
            # stopping: say what is kept, exit 130.
            raise Interrupted(f"interrupted at step {self.step}; {self._kept()}", 130) from None
        finally:
            self.close()

    def _kept(self) -> str:
        last = self.run_dir / "checkpoints" / ckpt.LAST
        if self._last_saved_step is None or not last.is_file():
            return f"no checkpoint was written to {self.run_dir}"
        return (
            f"the last checkpoint is {last} (step {self._last_saved_step}); resume with: "
            f"ssl train {self.run.method} --resume {self.run_dir}"
        )

    def _write_failed(self, e: OSError) -> None:
        """A log line could not be written (a full disk): checkpoint if possible, then stop
        in one line."""
        from sslcli.errors import WriteError
        from sslcli.fsutil import reason

        # (Alone only: under torchrun a checkpoint is a collective the others are not in.)
        if self._last_saved_step != self.step and dist.world_size() == 1:
            try:
                self.save_checkpoint()
            except CheckpointError:
                pass
        raise WriteError(
            f"cannot write {self.run_dir / 'metrics.jsonl'}: {reason(e)}; {self._kept()}"
        ) from e

    def _discard_unstarted_run(self, created: bool) -> None:
        if created:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        # The ownership marker and lock too: no run was made here.
        for name in (*rundir.RUN_FILES, rundir.LOCK):
            (self.run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "tensorboard", ignore_errors=True)

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
            self._run_lock = rundir.claim(self.run_dir, self.run.method, resume=self._in_place(),
                                          force=self.force, say=self._say)  # fmt: skip
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_json(
                self.run,
                self.run_dir / "config.json",
                extra={"plugin": registry.info_of(self.method_cls).record()},
            )
            if resumed:
                _truncate_metrics(metrics_path, self.step)
        if self.knn_random is None and self.step == 0:
            self.knn_random = self.knn()

        # Resuming a run that already reached its last step trains nothing and must not
        # append a second (empty) end event that ``ssl compare`` would then report.
        finished = resumed and self.step >= self.stop_step
        tb_dir = self.run_dir / "tensorboard" if self.run.trainer.tensorboard else None
        log = Logger(
            metrics_path if main else None,
            self.console if main else None,
            self.stop_step,
            tensorboard_dir=tb_dir if main else None,
        )
        log.on_error = self._write_failed
        if main:
            if finished:
                self._say(
                    f"{self.run_dir} already reached step {self.step} of {self.stop_step}: "
                    "nothing to train (raise trainer.epochs or trainer.max_steps to continue)"
                )
            elif self.step == 0:
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
            if self._pending and not finished:
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
            if main and not finished:
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
        code = 130 if signum == signal.SIGINT else 128 + int(signum)
        preempt = " (pre-emption warning: requeue the job)" if code not in (130, 143) else ""
        raise Interrupted(
            f"interrupted by {_signal_name(signum)}{preempt} at step {self.step}; checkpoint "
            f"{path}; resume with: ssl train {self.run.method} --resume {self.run_dir}",
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
            values = dist.all_reduce_mean(window_means(self._pending, self.device)).tolist()
            rec.update(zip(keys, values, strict=True))
        if clear:
            self._pending = {}
        if dt > 0 and n_steps:
            rec["images_per_s"] = n_steps * self.global_batch / dt
        return rec


def window_means(pending: dict[str, list[Tensor]], device: torch.device) -> Tensor:
    """The mean of each key's per-step values, one device tensor in sorted key order.

    Device values are averaged on the device; host values (Python numbers a method
    logged: a temperature, a momentum, a queue's fill) on the host, and reach the device
    in one copy, not one per value.
    """
    keys = sorted(pending)
    on_dev = [k for k in keys if all(v.device == device for v in pending[k])]
    on_host = [k for k in keys if k not in on_dev]
    means: dict[str, Tensor] = {}
    if on_dev:
        dev = torch.stack([torch.stack(pending[k]).mean() for k in on_dev])
        means.update(zip(on_dev, dev.unbind(0), strict=True))
    if on_host:
        host = torch.stack([torch.stack([v.cpu() for v in pending[k]]).mean() for k in on_host])
        means.update(zip(on_host, host.to(device).unbind(0), strict=True))
    return torch.stack([means[k] for k in keys])


def _first_line(e: BaseException) -> str:
    """``Type: first line`` of the root cause (the compiler wraps what its backend raised)."""
    while True:
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _no_buffer_sync() -> dict[str, bool]:
    """DDP keyword for "never broadcast buffers in forward": each process keeps its own
    BatchNorm statistics (queues and banks are kept equal by the methods themselves).
    Newer torch spells it ``forward_sync_buffers`` (``broadcast_buffers`` is deprecated);
    the trainer broadcasts the initial buffers itself either way."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines from beyond the checkpoint a run resumes from (written after it, by
    a run that was then killed), so the log reads as one run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line cut by a crash
        if not isinstance(rec, dict) or (rec.get("step") or 0) <= step:
            kept.append(line)
    from sslcli.fsutil import atomic_write_text

    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


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
        self.on_error: Any = None
        """Called with the OSError when a line cannot be written (a full disk)."""
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
            try:
                self._f.close()
            except OSError:  # the write that failed already said so
                pass
        if self._tb is not None:
            self._tb.close()

    def write(self, rec: dict[str, Any]) -> None:
        if self._f is None:
            return
        try:
            # One write of a whole line, flushed: a failure leaves at most a cut last line,
            # which readers skip.
            self._f.write(json.dumps({k: _jsonable(v) for k, v in rec.items()}) + "\n")
            self._f.flush()
        except OSError as e:
            if self.on_error is not None:
                self.on_error(e)
            raise
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
