"""``metrics.jsonl``: a run's log, one JSON object per line.

The one place that writes, reads and truncates it. Lines are appended whole and flushed,
so a crash or a full disk leaves at most a cut last line; readers skip lines that do not
parse. Non-finite floats (a NaN loss) are written as ``null``: JSON has no NaN.

Records: ``{"event": "start"|"resume"|"epoch"|"nonfinite"|"stop"|"end"|"eval", ...}`` and
step lines without an ``event`` (``step``, ``epoch``, ``lr``, ``loss``, the method's logs).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import IO, Any

from sslcli.errors import TargetError
from sslcli.fsutil import append_line, atomic_write_text

FILE = "metrics.jsonl"


def jsonable(v: Any) -> Any:
    """``v`` with every non-finite float (nested in dicts and lists too) made ``None``."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


def dumps(rec: dict[str, Any]) -> str:
    """One record as its line (without the newline)."""
    return json.dumps(jsonable(rec))


class MetricsWriter:
    """Appends records to a ``metrics.jsonl`` kept open for the length of a run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[str] | None = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, rec: dict[str, Any]) -> None:
        """One write of a whole line, flushed (an ``OSError`` propagates)."""
        assert self._f is not None, "written after close()"
        self._f.write(dumps(rec) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is None:
            return
        try:
            self._f.close()
        except OSError:  # the write that failed already said so
            pass
        self._f = None


def append_record(path: Path, rec: dict[str, Any]) -> None:
    """Append one record to a file not held open (a :class:`WriteError` on failure)."""
    append_line(path, dumps(rec))


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of ``path`` that parses (none if the file does not exist)."""
    out: list[dict[str, Any]] = []
    if not path.is_file():
        return out
    try:
        # Bytes, not text: a line damaged into invalid UTF-8 is skipped like a cut one.
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise TargetError(f"cannot read {path}: {e.strerror or e}") from e
    for line in lines:
        try:
            rec = json.loads(line.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a line cut by a crash, or damaged
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_after(path: Path, step: int) -> None:
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
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
