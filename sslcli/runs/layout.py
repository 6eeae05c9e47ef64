"""Run directories belong to one run.

A run directory holds a marker file (``.sslcli-run``: which method, when it started) and,
while ``ssl train`` writes to it, an exclusive lock (``fcntl.flock`` on ``.sslcli-lock``),
so that:

* a second ``ssl train`` on the same directory stops at once, in one line, instead of
  interleaving its metrics and checkpoints with the first one's;
* ``ssl train --out DIR`` refuses a directory that already holds another run or an
  exported model, unless it resumes that run (``--resume``) or ``--force`` starts a new
  run there (the old run's checkpoints and log are removed first, so the two never mix);
* ``ssl export`` never writes into a run directory.

The lock is advisory and local: it protects against another sslcli process, not against
a file system that does not implement ``flock`` (some network file systems ignore it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sslcli.errors import RunDirError, TargetError

RUNS_DIR = Path("runs")
"""Where runs go by default, and where a command without a target looks for the latest."""
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
HEADS_WEIGHTS = "heads.safetensors"
MARKER = ".sslcli-run"
LOCK = ".sslcli-lock"
# What a run writes: removed by --force before a new run takes the directory over.
RUN_FILES = ("metrics.jsonl", "config.json", MARKER)
RUN_DIRS = ("checkpoints", "tensorboard", "eval-cache")


def _json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_export_dir(d: Path) -> bool:
    """An ``ssl export`` directory: a timm config.json beside model.safetensors."""
    cfg = _json(d / EXPORT_CONFIG)
    return cfg is not None and "architecture" in cfg and (d / EXPORT_WEIGHTS).is_file()


def is_run_dir(d: Path) -> bool:
    """Whether ``d`` holds a run (this version's marker, or an older run's files)."""
    if (d / MARKER).is_file():
        return True
    if (d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file():
        return True
    cfg = _json(d / "config.json")
    return cfg is not None and "trainer" in cfg


def run_method(d: Path) -> str | None:
    """The method of the run in ``d`` (marker first, then its config.json)."""
    m = (_json(d / MARKER) or {}).get("method")
    if isinstance(m, str):
        return m
    cfg = _json(d / "config.json") or {}
    m = cfg.get("method")
    if isinstance(m, dict):
        m = m.get("name")
    return m if isinstance(m, str) else None


def check_out(d: Path, method: str, *, resume: bool, force: bool) -> None:
    """Refuse, in one line, a ``--out`` that is not this run's to write."""
    if d.exists() and not d.is_dir():
        raise RunDirError(f"--out {d} exists and is not a directory")
    if not d.exists() or force:
        return
    if is_export_dir(d):
        raise RunDirError(
            f"--out {d} holds an exported model, not a run; choose another --out "
            "(or --force to train there anyway)"
        )
    if is_run_dir(d) and not resume and _has_progress(d):
        other = run_method(d) or "unknown method"
        raise RunDirError(
            f"--out {d} already holds a run ({other}); continue it with --resume {d}, "
            "choose another --out, or --force to replace it with a new run"
        )


def _has_progress(d: Path) -> bool:
    """A marker alone is a run that failed before training: nothing to lose or mix."""
    return (d / "checkpoints").is_dir() or (d / "metrics.jsonl").is_file()


class RunLock:
    """The claim on a run directory while ``ssl train`` writes to it."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


def claim(
    d: Path,
    method: str,
    *,
    resume: bool,
    force: bool,
    say: Any = None,
) -> RunLock:
    """Create ``d`` if needed, lock it and write its marker; refuse it if it is another
    run's, an export's or in use (see the module docstring)."""
    check_out(d, method, resume=resume, force=force)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {d}: {e.strerror or e}") from e
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            holder = os.read(fd, 64).decode(errors="replace").strip()
        finally:
            os.close(fd)
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise RunDirError(
            f"run directory {d} is in use by another ssl train{who}; wait for it to "
            "finish or choose another --out"
        ) from None
    except OSError:
        pass  # no flock on this file system: keep going without the lock
    lock = RunLock(d, fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if force and not resume and _has_progress(d):
            removed = _clear(d)
            if say is not None and removed:
                say(f"--force: removed the previous run's {', '.join(removed)} from {d}")
        if not (d / MARKER).is_file() or not resume:
            from sslcli.fsutil import atomic_write_text

            atomic_write_text(
                d / MARKER,
                json.dumps({"kind": "run", "method": method, "created": time.time()}) + "\n",
            )
    except BaseException:
        lock.release()
        raise
    return lock


def _clear(d: Path) -> list[str]:
    import shutil

    removed = []
    for name in RUN_FILES:
        if (d / name).is_file():
            (d / name).unlink()
            removed.append(name)
    for name in RUN_DIRS:
        if (d / name).is_dir():
            shutil.rmtree(d / name)
            removed.append(f"{name}/")
    return removed


def check_export_out(out: Path) -> None:
    """``ssl export --out``: never a run directory (its config.json would be replaced)."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    if out.is_dir() and is_run_dir(out) and not is_export_dir(out):
        raise RunDirError(
            f"--out {out} is a run directory; exports go to a directory of their own "
            f"(e.g. {out / 'export'})"
        )


def latest_run(root: Path = RUNS_DIR) -> Path:
    """The run under ``root`` with the most recent checkpoint (what a bare command uses)."""
    if not root.is_dir():
        raise TargetError(
            f"no TARGET given and no {root}/ directory here: name a run directory, a "
            "checkpoint or an exported directory"
        )
    best: tuple[float, Path] | None = None
    for d in root.iterdir():
        last = d / "checkpoints" / "last.safetensors"
        if d.is_dir() and last.is_file():
            t = last.stat().st_mtime
            if best is None or t > best[0]:
                best = (t, d)
    if best is None:
        raise TargetError(f"no TARGET given and no run under {root}/ has a checkpoint")
    return best[1]


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint file lies in, if it is in one."""
    for cand in (checkpoint.parent.parent, checkpoint.parent):
        if (cand / "config.json").is_file() and (cand / "checkpoints").is_dir():
            return cand
    return None


def default_run_dir(method: str) -> Path:
    """``runs/METHOD-YYYYmmdd-HHMMSS``: where a run goes when no ``--out`` names one."""
    return Path("runs") / f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def remove_unstarted_run(run_dir: Path, created: bool) -> None:
    """Remove what a run that never got going wrote (``created``: the directory too)."""
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    # The ownership marker and lock too: no run was made here.
    for name in (*RUN_FILES, LOCK):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
