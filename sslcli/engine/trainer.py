"""The training loop. It never asks which method it runs.

:meth:`Trainer.fit` reads in phases: start (resume, claim the run directory) → baseline
evaluation → epochs of steps (:meth:`Trainer.train_one_epoch`: views on the device, loss,
backward, one agreed finite/stop check, update, hooks, logs) → checkpoints (epoch ends,
``max_steps``, signals) → final evaluation. Each part lives in a module of its own beside
this one (see :mod:`sslcli.engine`).

Host syncs: one per step (the finiteness of the loss, and of the gradient norm when
clipping, read back before the optimiser may apply the update; under DDP the same tiny
all-reduce also carries "a process received SIGINT/SIGTERM", so all processes stop at the
same step), plus one per logged line.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslcli import contract
from sslcli.config import RunConfig
from sslcli.data.augment import ViewPipeline
from sslcli.data.crops import Crops
from sslcli.data.loader import to_device
from sslcli.engine import resume, setup, stopping
from sslcli.engine.batches import BatchSource
from sslcli.engine.dryrun import DryRun
from sslcli.engine.forward import StepForward
from sslcli.engine.grad_guard import BufferBackup, clip_gradients, nonfinite_error
from sslcli.engine.logger import Logger, LogWindow, peak_memory_mb, tell
from sslcli.engine.monitor import Evaluation, Monitor
from sslcli.engine.result import TrainResult
from sslcli.engine.schedule import Schedule, steps_per_epoch
from sslcli.engine.stopping import StopFlag
from sslcli.errors import CheckpointError, Interrupted, MethodContractError, WriteError
from sslcli.fsutil import reason
from sslcli.method import Batch, Method, MethodConfig, StepInfo, StepOutput
from sslcli.nn import dist
from sslcli.optim import build_optimizer, scaled_lr
from sslcli.runs import checkpoint as ckpt
from sslcli.runs import layout as rundir
from sslcli.runs import metrics
from sslcli.runtime import autocast, configure_backends, pick_device, pick_dtype, seed_everything


class Trainer:
    """One run of ``method_cls``: set up at construction, trained by :meth:`fit`.

    A dry run (``dry_run``, ``ssl train --dry-run``) goes through this same set-up, so it
    resolves and refuses exactly what a real run would; it never writes anything (the run
    directory is made in :meth:`fit`).
    """

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
        self.run, self.method_cls, self.method_config = run, method_cls, method_config
        self.console, self.force, self.dry_run = console, force, dry_run
        t = run.trainer
        self._owns_process_group = False if dry_run else setup.init_distributed(t.device)
        self.device = pick_device(t.device)
        self.dtype = pick_dtype(t.precision, self.device)
        self._cuda = self.device.type == "cuda"
        configure_backends(self.device)
        self._set_up_resume(resume)
        seed_everything(t.seed + dist.rank())
        self.run_dir = setup.pick_run_dir(run, self.resume_path, self.resume_meta)
        t.out = str(self.run_dir)
        self._run_lock: rundir.RunLock | None = None
        if dist.is_main():  # refuse another run's or an export's directory before set-up
            rundir.check_out(self.run_dir, run.method, resume=self._in_place(), force=force)
        self._set_up_data()
        self._set_up_model()
        self._set_up_optimizer()
        self._set_up_monitor()
        self.step = 0
        self.epoch = 0
        self.nonfinite = 0
        self.knn_random: float | None = None
        self.images_seen = 0
        self.window = LogWindow(self.device, self.global_batch, self.steps_per_epoch)
        self.stop = StopFlag()
        self._buffers = BufferBackup(self.method)
        self._last_saved_step: int | None = None
        self._t_log = 0.0

    # -- set-up ------------------------------------------------------------------------------------
    def _set_up_resume(self, path: Path | None) -> None:
        """Refuse an incompatible config before building anything."""
        self.resume_path: Path | None = None
        self.resume_meta: dict[str, Any] | None = None
        self._resume_loaded: tuple[resume.Groups, dict[str, Any]] | None = None
        if path is None:
            return
        # The newest checkpoint that verifies (a damaged last.safetensors falls back).
        self.resume_path, groups, meta = ckpt.find_resumable(Path(path), self.say)
        self.resume_meta, self._resume_loaded = meta, (groups, meta)
        resume.check_resumable(self.resume_path, meta, self.run, self.method_cls, self.say)

    def _set_up_data(self) -> None:
        run, dry = self.run, self.dry_run
        self.load_size = run.data.load_size or run.data.image_size
        self.dataset, decoder = setup.open_train_data(run, self.device, dry)
        self.world = dry.processes if dry is not None else dist.world_size()
        self.global_batch = run.trainer.batch_size
        self.local_batch = setup.local_batch(self.global_batch, self.world)
        spe = steps_per_epoch(len(self.dataset), self.global_batch)
        if self.resume_path is not None and self.resume_meta is not None:
            resume.check_same_data(
                self.resume_path, self.resume_meta, self.dataset, run.data.dataset
            )
        self.batches = BatchSource(
            self.dataset, run.trainer.seed, spe, self.global_batch, self.local_batch,
            self.device, decoder=decoder, workers=run.data.num_workers,
        )  # fmt: skip

    def _set_up_model(self) -> None:
        run, t, dry = self.run, self.run.trainer, self.dry_run
        self.backbone_spec = setup.backbone_spec(run, self.method_cls)
        if self.resume_path is not None and self.resume_meta is not None:
            resume.check_same_backbone(self.resume_path, self.resume_meta, self.backbone_spec)
        self.method, self.method_config = setup.build_method(
            run, self.method_cls, self.method_config, self.backbone_spec, len(self.dataset),
            self.device,
        )  # fmt: skip
        self.channels_last = setup.use_channels_last(
            t.channels_last, self.backbone_spec, self.device
        )
        setup.place_method(self.method, run, self.device, self.world, self.channels_last, dry)
        self.views = ViewPipeline(contract.check_views(self.method))
        self.aug_gen = torch.Generator(device=self.device).manual_seed(t.seed * 7919 + dist.rank())
        wrapped = self.world > 1 and dry is None
        model = setup.wrap_ddp(self.method, self.device) if wrapped else self.method
        # Every process seeded seed + rank before building the model: rank 0's random
        # state (MoCo's queue, memory banks; DDP already sent the parameters) for all.
        dist.broadcast_module_(self.method)
        self.forward = StepForward(
            model, self.method, self.say, device=self.device, compile=t.compile and dry is None
        )
        self.batches.view_specs = self.method.views

    def _set_up_optimizer(self) -> None:
        o = self.run.optim
        groups = contract.param_groups(self.method, o)
        self.base_lr = scaled_lr(o, self.global_batch)
        self.optimizer = build_optimizer(groups, o, self.base_lr)
        self.schedule = sch = Schedule.of_run(
            self.run, self.method_cls, self.batches.steps_per_epoch, self.base_lr, self.say
        )
        # (copies of a frozen schedule: read by the dry-run plan, benchmarks and tests)
        self.steps_per_epoch, self.total_steps = sch.steps_per_epoch, sch.total_steps
        self.stop_step, self.warmup_steps = sch.stop_step, sch.warmup_steps

    def _set_up_monitor(self) -> None:
        self.monitor = Monitor(
            self.run, self.method, self.dataset, self.device, self.dtype, self.load_size,
            self.batches.num_workers, self.channels_last, self.say,
        )  # fmt: skip
        self.probe = self.monitor.make_probe() if self.dry_run is None else None
        if self.probe is not None:
            dist.broadcast_module_(self.probe)
            self.batches.probe_size = self.load_size

    def say(self, msg: str) -> None:
        """One line for the user (rank 0 only)."""
        tell(self.console, msg)

    def _in_place(self) -> bool:
        return setup.continues_in_place(self.resume_path, self.run_dir)

    def close(self) -> None:
        """Leave the process group this trainer joined (no-op otherwise); unlock the run."""
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()  # type: ignore[union-attr]
            self._run_lock = None
        if self._owns_process_group:
            setup.leave_distributed()
            self._owns_process_group = False

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
                rundir.remove_unstarted_run(self.run_dir, created)
            raise
        except KeyboardInterrupt:
            # Ctrl-C outside the steps (the baseline kNN, start-up) or a second one while
            # stopping: say what is kept, exit 130.
            raise Interrupted(f"interrupted at step {self.step}; {self._kept()}", 130) from None
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        resumed = self._start()
        if self.knn_random is None and self.step == 0:
            self.knn_random = self.knn()
        # Resuming a run that already reached its last step trains nothing and must not
        # append a second (empty) end event that ``ssl compare`` would then report.
        finished = resumed and self.step >= self.stop_step
        log = self._open_log(finished)
        t_start = time.perf_counter()
        steps_run = 0
        with self.stop, log:
            log.advance(self.step)
            self._t_log = time.perf_counter()
            while self.step < self.stop_step and self.stop.stop is None:
                self.epoch = self.step // self.steps_per_epoch
                steps_run += self.train_one_epoch(self.epoch, log)
                if self.stop.stop is not None:
                    self._interrupt(log)
                self._end_epoch(self.epoch, log)
            return self._finish(log, finished, steps_run, t_start)

    def _start(self) -> bool:
        """Load the checkpoint to resume from; claim the run directory. True if resumed."""
        resumed = self.resume_path is not None
        if self.resume_path is not None:
            self.load_checkpoint(self.resume_path)
            spe = self.steps_per_epoch
            self.say(
                f"resumed from {self.resume_path} at step {self.step} "
                f"(epoch {self.step // spe}, batch {self.step % spe} of {spe})"
            )
        if dist.is_main():
            self._run_lock = rundir.claim(self.run_dir, self.run.method, resume=self._in_place(),
                                          force=self.force, say=self.say)  # fmt: skip
            setup.write_run_files(
                self.run, self.method_cls, self.run_dir, self.step if resumed else None
            )
        return resumed

    def _open_log(self, finished: bool) -> Logger:
        """The run's logger (rank 0 writes), with its first record."""
        log = Logger.of_run(self.run_dir, self.console, self.stop_step, self.run.trainer)
        log.on_error = self._write_failed
        if not dist.is_main():
            return log
        if finished:
            self.say(
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
        return log

    def train_one_epoch(self, epoch: int, log: Logger) -> int:
        """The steps of ``epoch`` from the current step on, until the epoch ends,
        ``stop_step`` or a stop signal; returns how many ran."""
        batches = self.batches.epoch(epoch, self.step - epoch * self.steps_per_epoch)
        steps = 0
        try:
            while (item := self.stop.next_batch(batches)) is not None:
                lr = self.schedule.apply(self.optimizer, self.step)
                out, ok = self.train_step(*item)
                if ok:
                    self.window.add(out)
                else:
                    self._on_nonfinite(log, epoch)
                self.step += 1
                steps += 1
                self.images_seen += self.global_batch
                self._after_step(log, lr)
                if self.stop.after_step() or self.step >= self.stop_step:
                    break
        finally:
            batches.close()  # shuts a DataLoader's workers down now
        return steps

    def _after_step(self, log: Logger, lr: float) -> None:
        """The log line at a log boundary, the progress, ``checkpoint_every``."""
        t = self.run.trainer
        boundary = self.step % t.log_every == 0 or self.step == self.total_steps
        if boundary and self.window.pending:  # (empty: only skipped steps)
            now = time.perf_counter()
            log.write(self.window.line(self.step, lr, now - self._t_log))
            self._t_log = now
        log.advance(self.step)
        every = t.checkpoint_every
        if every and self.step % every == 0 and self.step < self.stop_step:
            self.save_checkpoint()

    def _end_epoch(self, epoch: int, log: Logger) -> None:
        epoch_end = self.step % self.steps_per_epoch == 0
        # Before the checkpoint, so a run resumed from it starts a clean epoch (every
        # process takes part in the probe's all-reduce).
        probe = self.monitor.probe_epoch() if epoch_end else {}
        if (epoch_end or self.step == self.stop_step) and self._last_saved_step != self.step:
            self.save_checkpoint()
        if epoch_end and dist.is_main():
            log.write({"event": "epoch", "epoch": epoch, "step": self.step,
                       **probe, "time": time.time()})  # fmt: skip
            if probe:
                self.say(
                    f"epoch {epoch}: online probe top-1 {100 * probe['probe_top1']:.1f}% "
                    "(training images)"
                )

    def _finish(self, log: Logger, finished: bool, steps_run: int, t_start: float) -> TrainResult:
        """The partial log window, the final evaluation and the end record."""
        if self.window.pending and not finished:
            # Stopped by max_steps off a log boundary: report the partial window. The
            # checkpoint keeps these values, so a resumed run's next line is the same
            # as an uninterrupted run's.
            rec = self.window.line(
                self.step, self._last_lr(), time.perf_counter() - self._t_log, clear=False
            )
            log.write({"event": "stop", "reason": "max_steps", **rec})
        elapsed = time.perf_counter() - t_start
        ips = steps_run * self.global_batch / elapsed if elapsed > 0 and steps_run else None
        final = self.evaluate()
        probe_test = final.probe_test_top1
        if dist.is_main() and not finished:
            log.write({"event": "end", "step": self.step, "loss": log.last_loss,
                       "knn_top1": final.knn_top1, "knn_random": self.knn_random,
                       "probe_test_top1": probe_test,
                       "images_per_s": ips, "wall_s": elapsed,
                       "peak_mem_mb": peak_memory_mb(self.device),
                       "time": time.time()})  # fmt: skip
        return TrainResult(
            self.run_dir, self.step, log.last_loss, final.knn_top1, self.knn_random, ips,
            extra={"probe_test_top1": probe_test} if probe_test is not None else {},
            rank=dist.rank(),
        )  # fmt: skip

    def _last_lr(self) -> float:
        """The lr the last step ran with (the first step's before any)."""
        return self.base_lr * self.schedule.lr_factor(max(0, self.step - 1))

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, images: Tensor, labels: Tensor, index: Tensor) -> tuple[StepOutput, bool]:
        """Forward, backward and (unless the loss is not finite) the update of one step.

        Returns the method's output and whether the update was applied. The caller sets
        the step's lr first (``trainer.schedule.apply(trainer.optimizer, trainer.step)``).
        """
        spe = self.steps_per_epoch
        info = StepInfo(self.step, self.step // spe, self.total_steps, spe)
        images = to_device(images, self.device, non_blocking=self._cuda)  # a Tensor or Crops
        batch = self._views(images, labels, index)
        if self.run.trainer.skip_nonfinite > 0:
            self._buffers.save()
        # Before the forward: the previous step's gradients would otherwise stay alive
        # through the forward's activation peak.
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.dtype):
            out = contract.check_step_output(self.method, self.forward(batch, info))
        # Backward before the finiteness check: the check must precede the update, and
        # reading it after backward has been queued keeps the device busy while the host
        # waits. (Under DDP every process must run backward anyway: it holds collectives.)
        out.loss.backward()
        finite = torch.isfinite(out.loss.detach())
        norm = clip_gradients(self.method, self.run.optim)
        if norm is not None:
            finite = finite & torch.isfinite(norm)
        if not self.stop.agree(finite):
            # Discard the step: no update, and buffers (BN statistics, queues) that the
            # forward pass already changed are put back when a skip is allowed.
            self.optimizer.zero_grad(set_to_none=True)
            if self.run.trainer.skip_nonfinite > 0:
                self._buffers.restore()
            return out, False
        self.method.before_optimizer_step(info)
        self.optimizer.step()
        self.method.after_optimizer_step(info)
        if self.probe is not None:
            full = images.full if isinstance(images, Crops) else images
            assert full is not None  # the crop plan asks for it when the probe is on
            self.monitor.probe_step(full, batch.labels)  # type: ignore[arg-type]
        return out, True

    def _views(self, images: Tensor | Crops, labels: Tensor, index: Tensor) -> Batch:
        """The batch of the method's augmented views, on the device."""
        nb = self._cuda  # non_blocking only means something for pinned host memory
        views = self.views(images, generator=self.aug_gen)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return Batch(
            views=views,
            index=torch.as_tensor(index).to(self.device, non_blocking=nb),
            labels=torch.as_tensor(labels).to(self.device, non_blocking=nb),
            index_distinct=True,  # each epoch's order is a permutation
        )

    def _on_nonfinite(self, log: Logger, epoch: int) -> None:
        self.nonfinite += 1
        allowed = self.run.trainer.skip_nonfinite
        log.write({"event": "nonfinite", "step": self.step, "epoch": epoch,
                   "count": self.nonfinite, "allowed": allowed})  # fmt: skip
        if self.nonfinite > allowed:
            last = self.run_dir / "checkpoints" / ckpt.LAST
            raise nonfinite_error(self.step, epoch, last, self._last_saved_step)

    # -- evaluation --------------------------------------------------------------------------------
    def knn(self) -> float | None:
        """kNN top-1 on the labelled test split, or None (no labels, or not rank 0); every
        process takes part (see :meth:`sslcli.engine.monitor.Monitor.knn`)."""
        res = self.monitor.knn()
        return res.top1 if res is not None and dist.is_main() else None

    def evaluate(self) -> Evaluation:
        """kNN top-1 and the online probe's test top-1 at the current step."""
        return self.monitor.evaluate(self.step)

    # -- checkpoints and stopping ------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every process takes part)."""
        modules: dict[str, torch.nn.Module] = {"model": self.method}
        if self.probe is not None:
            modules["probe"] = self.probe
        path = resume.save_checkpoint(
            self.run_dir, step=self.step, steps_per_epoch=self.steps_per_epoch,
            counters={"nonfinite": self.nonfinite, "knn_random": self.knn_random,
                      "images_seen": self.images_seen},
            run=self.run, method_cls=self.method_cls, spec=self.backbone_spec,
            dataset=self.dataset, modules=modules, optimizer=self.optimizer,
            own_state=resume.rank_state(self.aug_gen, self.window.pending, self.device),
        )  # fmt: skip
        self._last_saved_step = self.step
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Continue from the checkpoint at ``path`` (after checking it fits this run)."""
        loaded, self._resume_loaded = self._resume_loaded, None
        meta, self.window.pending = resume.restore(
            path, loaded if path == self.resume_path else None, run=self.run,
            method_cls=self.method_cls, method=self.method, optimizer=self.optimizer,
            probe=self.probe, device=self.device, aug_gen=self.aug_gen, say=self.say,
        )  # fmt: skip
        self.resume_meta = meta
        self.step = int(meta["step"])
        self.epoch = self.step // self.steps_per_epoch
        self.nonfinite = int(meta.get("nonfinite", 0))
        self.knn_random = meta.get("knn_random")
        self.images_seen = int(meta.get("images_seen", 0))
        self._last_saved_step = self.step

    def _interrupt(self, log: Logger) -> None:
        signum = self.stop.stop or signal.SIGTERM
        path = self.save_checkpoint() if self._last_saved_step != self.step else None
        if path is None and dist.is_main():
            path = self.run_dir / "checkpoints" / ckpt.LAST
        if self.window.pending:
            rec = self.window.line(self.step, self._last_lr(), 0.0, clear=False)
            log.write({"event": "stop", "reason": stopping.signal_name(signum), **rec})
        # Every process waits for rank 0's checkpoint: a launcher that sees one process
        # exit may kill the others.
        dist.barrier()
        raise stopping.interrupted(signum, self.step, path, self.run.method, self.run_dir)

    def _kept(self) -> str:
        return stopping.kept(self.run_dir, self.run.method, self._last_saved_step)

    def _write_failed(self, e: OSError) -> None:
        """A log line could not be written (a full disk): checkpoint if possible, then stop
        in one line."""
        # (Alone only: under torchrun a checkpoint is a collective the others are not in.)
        if self._last_saved_step != self.step and dist.world_size() == 1:
            try:
                self.save_checkpoint()
            except CheckpointError:
                pass
        raise WriteError(
            f"cannot write {self.run_dir / metrics.FILE}: {reason(e)}; {self._kept()}"
        ) from e
