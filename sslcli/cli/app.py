"""The ``ssl`` command: one Typer app, one module per command, errors turned into lines.

This is the one place where known exceptions become a single line on stderr and exit
code 2 (set SSLCLI_TRACEBACK=1 to see the traceback instead).
"""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click
import typer

from sslcli.api import ConfigError, SSLError

app = typer.Typer(
    name="ssl",
    help="Train, evaluate, export and compare self-supervised image encoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
# One module per command; each exposes register(app) and imports heavy code lazily.
COMMANDS = (
    "train", "views", "methods", "backbones", "eval", "export", "compare", "embed", "report",
)
for _name in COMMANDS:
    try:
        _mod = importlib.import_module(f"sslcli.cli.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"sslcli.cli.{_name}":
            raise
        continue
    _mod.register(app)


# Typer vendors its own copy of click in recent releases; catch both families.
_EXIT: tuple[type[BaseException], ...] = tuple({click.exceptions.Exit, typer.Exit})
_ABORT: tuple[type[BaseException], ...] = tuple({click.exceptions.Abort, typer.Abort})
_USAGE: tuple[type[BaseException], ...] = tuple(
    {click.exceptions.ClickException, getattr(typer, "TyperException", click.ClickException)}
)


def _err(msg: str) -> None:
    print(f"ssl: error: {msg}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ssl`` console script; returns the exit code."""
    show_tb = os.environ.get("SSLCLI_TRACEBACK") not in (None, "", "0")
    try:
        rc = app(args=argv, prog_name="ssl", standalone_mode=False)
        if isinstance(rc, int) and rc:
            # Typer turns a Ctrl-C it catches itself into a returned 130.
            if rc == 130:
                _err(f"interrupted; {_KEPT}")
            return rc
    except _EXIT as e:
        return int(getattr(e, "exit_code", 0) or 0)
    except _ABORT:
        _err("aborted")
        return 130
    except _USAGE as e:
        # Usage errors (unknown flag, bad type, missing argument) in one line, exit 2.
        if show_tb:
            raise
        fmt = getattr(e, "format_message", None)
        msg = fmt() if callable(fmt) else str(e)
        if type(e).__name__ == "NoArgsIsHelpError":
            # Bare `ssl` (or a bare group): show the help, as a user expects.
            return main([*(argv or sys.argv[1:]), "--help"])
        _err(" ".join(msg.split()))
        return 2
    except ConfigError as e:
        if show_tb:
            raise
        for line in e.lines:
            _err(line)
        return e.exit_code
    except SSLError as e:
        if show_tb:
            raise
        if e.exit_code >= 128:
            # An orderly stop after a checkpoint is not an error; say how to go on.
            print(f"ssl: {e}", file=sys.stderr)
        else:
            _err(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _err(f"interrupted; {_KEPT}")
        return 130
    except OSError as e:
        # The machine's doing, not a bug: a full disk, a quota, a read-only mount.
        if show_tb or e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _err(f"{where}{e.strerror or e}")
        return 2
    return 0


# What an interrupted command leaves: every file sslcli writes is written atomically (or
# appended line by line), so an interrupted command leaves the previous complete versions.
_KEPT = "files already written are complete; nothing was half-written"
_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, n) for n in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EIO")
    if hasattr(errno, n)
)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
