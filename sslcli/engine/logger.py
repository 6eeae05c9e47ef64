"""What a run tells while it trains: the log window of per-step values, and the logger
that writes each line to ``metrics.jsonl`` (:mod:`sslcli.runs.metrics`), to TensorBoard
when asked, and to the console (a rich progress bar on a terminal, one plain line per
logged step otherwise).

Per-step values stay on the device until a line is logged: one transfer per line (under
DDP one all-reduce, so the line shows the mean over processes), never one per step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslcli.config import TrainerConfig
from sslcli.method import StepOutput
from sslcli.nn import dist
from sslcli.runs.metrics import FILE, MetricsWriter


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


def tell(console: Any, msg: str) -> None:
    """One line for the user on rank 0 (never read as rich markup: messages carry paths
    and plugin text)."""
    if not dist.is_main():
        return
    if console is not None:
        from rich.markup import escape

        console.print(escape(msg), highlight=False)
    else:
        print(msg, file=sys.stderr)


def peak_memory_mb(device: torch.device) -> float | None:
    """The process's peak memory so far: allocated on a CUDA device, resident otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:  # noqa: BLE001 - not on every platform
        return None


class LogWindow:
    """The per-step values of the steps since the last logged line.

    They belong to the checkpoint (:mod:`sslcli.engine.resume`), so a resumed run's next
    line is the same as an uninterrupted run's.
    """

    def __init__(self, device: torch.device, global_batch: int, steps_per_epoch: int) -> None:
        self.device = device
        self.global_batch = global_batch
        self.steps_per_epoch = steps_per_epoch
        self.pending: dict[str, list[Tensor]] = {}

    def add(self, out: StepOutput) -> None:
        """Keep the step's scalars on the device until the next log line (no sync)."""
        p = self.pending
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

    def line(self, step: int, lr: float, dt: float, clear: bool = True) -> dict[str, Any]:
        """The log line of the window ending at ``step``: the mean of every value, the lr,
        and images/s over ``dt`` seconds (when positive); the window is emptied unless
        ``clear`` is False."""
        rec: dict[str, Any] = {"step": step, "epoch": (step - 1) // self.steps_per_epoch,
                               "lr": lr}  # fmt: skip
        keys = sorted(self.pending)
        n_steps = len(self.pending.get("loss", []))
        if keys:
            values = dist.all_reduce_mean(window_means(self.pending, self.device)).tolist()
            rec.update(zip(keys, values, strict=True))
        if clear:
            self.pending = {}
        if dt > 0 and n_steps:
            rec["images_per_s"] = n_steps * self.global_batch / dt
        return rec


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
        self.on_error: Callable[[OSError], None] | None = None
        """Called with the OSError when a line cannot be written (a full disk)."""
        self.metrics = MetricsWriter(path) if path else None
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

    @classmethod
    def of_run(cls, run_dir: Path, console: Any, total: int, trainer: TrainerConfig) -> Logger:
        """The logger of a run in ``run_dir``: rank 0 writes and shows, the others only
        keep the last loss."""
        if not dist.is_main():
            return cls(None, None, total)
        tb_dir = run_dir / "tensorboard" if trainer.tensorboard else None
        return cls(run_dir / FILE, console, total, tensorboard_dir=tb_dir)

    def _note(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg, highlight=False)
        else:
            print(msg, file=sys.stderr)

    def __enter__(self) -> Logger:
        if self.console is not None and self.path is not None and self.console.is_terminal:
            self._start_progress()
        return self

    def _start_progress(self) -> None:
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

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self.metrics is not None:
            self.metrics.close()
        if self._tb is not None:
            self._tb.close()

    def write(self, rec: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.write(rec)
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
