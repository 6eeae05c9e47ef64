"""Writing files so that a crash or a full disk never leaves a half-written one behind.

Whole files (``config.json``, an export's files, the resolved config) are written under a
temporary name in the same directory, flushed to disk and renamed over the old one: a
reader sees the old file or the new one, never a prefix. Logs are appended one line per
``write`` call; a line cut by a crash is skipped by every reader. A failing write (a full
disk, a quota, a read-only file system) becomes a :class:`WriteError`: one line, exit 2.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from sslcli.errors import WriteError


def reason(e: BaseException) -> str:
    """``No space left on device`` rather than ``[Errno 28] No space left on device: 'x'``."""
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def is_disk_full(e: BaseException) -> bool:
    code = getattr(e, "errno", None)
    return code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically; a :class:`WriteError` leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        kept = "; the previous version is kept" if path.is_file() else ""
        raise WriteError(f"cannot write {path}: {reason(e)}{kept}") from e


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def append_line(path: Path, line: str) -> None:
    """Append one line (a log record) in a single write; a :class:`WriteError` on failure.

    A failed append can leave a cut line at the end of the file; readers skip lines that
    do not parse, and the next append starts on a line of its own.
    """
    try:
        with open(path, "a") as f:
            if f.tell() > 0 and not _ends_with_newline(path):
                line = "\n" + line
            f.write(line + "\n")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {reason(e)}") from e


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write_safetensors(tensors: dict[str, Tensor], path: Path, meta: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        # safetensors creates its file with mode 0600; an export is meant to be shared like
        # the config.json next to it, so it gets the mode the umask gives a new file.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        # safetensors reports a full disk as SafetensorError, not OSError
        raise WriteError(f"cannot write {path}: {reason(e)}") from e
    finally:
        if tmp.exists():
            tmp.unlink()
