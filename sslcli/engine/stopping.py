"""Stopping a run between steps: signals, the cross-process agreement, the exit.

A stop signal (SIGINT, SIGTERM, Slurm's SIGUSR1 pre-emption warning) only sets a flag; the
loop stops after the step it arrived in, writes a checkpoint and exits with
``128 + signal`` (130 for Ctrl-C). Under torchrun the step's one host sync (may the update
be applied: is the loss finite?) also carries the highest signal a process received, so
every process stops after the same step.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from sslcli.errors import Interrupted
from sslcli.nn import dist
from sslcli.runs import checkpoint as ckpt

# Slurm's pre-emption warning (sbatch --signal=USR1@90) and batch systems' stop signal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()
)

T = TypeVar("T")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """The shell's code for a process ended by ``signum``."""
    return 130 if signum == signal.SIGINT else 128 + int(signum)


def kept(run_dir: Path, method: str, last_saved_step: int | None) -> str:
    """What an interrupted run keeps, and how to resume it."""
    last = run_dir / "checkpoints" / ckpt.LAST
    if last_saved_step is None or not last.is_file():
        return f"no checkpoint was written to {run_dir}"
    return (
        f"the last checkpoint is {last} (step {last_saved_step}); resume with: "
        f"ssl train {method} --resume {run_dir}"
    )


def interrupted(
    signum: int, step: int, checkpoint: Path | None, method: str, run_dir: Path
) -> Interrupted:
    """The orderly stop after ``signum``, with its exit code."""
    code = exit_code(signum)
    preempt = " (pre-emption warning: requeue the job)" if code not in (130, 143) else ""
    return Interrupted(
        f"interrupted by {signal_name(signum)}{preempt} at step {step}; checkpoint "
        f"{checkpoint}; resume with: ssl train {method} --resume {run_dir}",
        code,
    )


class StopFlag:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a flag checked between steps, so a step is never
    cut (handlers installed while inside ``with``).

    ``received``: the signal this process got; ``stop``: the signal the run stops for,
    once every process knows of it.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.stop: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a test runner thread)
                pass
        self._defer_worker_deaths()
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

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
                if self.received is None and callable(previous):
                    previous(signum, frame)

            self._old[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, on_child)
        except (ImportError, AttributeError, ValueError):  # other torch versions, threads
            pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            # A second Ctrl-C means "now": restore the default and re-raise.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum

    def agree(self, finite: Tensor) -> bool:
        """The step's one host sync: may this update be applied? (also: stop requested?)

        On several processes every one must take the same decision, or their collectives
        would no longer pair up; the same all-reduce carries the highest signal number a
        process has received, so all of them stop after the same step.
        """
        signum = self.received
        if dist.world_size() == 1:
            if signum is not None:
                self.stop = signum
            return bool(finite)
        # (torch.full fills on the device; torch.tensor would copy a host value there)
        flags = torch.stack(
            [(~finite).to(torch.int64),
             torch.full((), signum or 0, dtype=torch.int64, device=finite.device)]
        )  # fmt: skip
        bad, sig = dist.all_reduce_max(flags).tolist()
        if sig:
            self.stop = int(sig)
        return not bad

    def after_step(self) -> bool:
        """Whether to stop now. Alone, the run stops right after the step the signal
        arrived in (with several processes the stop is agreed in the next step's sync)."""
        if self.received is not None and dist.world_size() == 1:
            self.stop = self.received
        return self.stop is not None

    def next_batch(self, batches: Iterator[T]) -> T | None:
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
            if self.received is None or dist.world_size() > 1:
                raise
            self.stop = self.received
            return None
