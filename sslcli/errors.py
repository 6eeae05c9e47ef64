"""User-facing errors.

Everything a user can get wrong (a config value, a method name, a data path) raises a
subclass of :class:`SSLError`. The CLI turns these into one line on stderr and exit code 2;
set ``SSLCLI_TRACEBACK=1`` to see the full traceback instead.
"""

from __future__ import annotations


class SSLError(Exception):
    """An error caused by input the user can fix; printed as one line, exit code 2."""

    exit_code: int = 2


class ConfigError(SSLError):
    """A configuration value is invalid. ``lines`` holds one message per bad field."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("; ".join(lines))


class PluginError(SSLError):
    """A method plugin could not be found, imported or validated."""


class MethodContractError(PluginError):
    """A method plugin broke the contract while running (a wrong return type, a reserved
    log key, an ``__init__`` that raised): one line naming the method, its package and
    version and what was expected; exit code 2. The plugin's author fixes it, not the user."""


class DataError(SSLError):
    """A dataset is missing, unreadable or of an unknown format."""


class BackboneError(SSLError):
    """An unknown or unusable backbone name."""


class CheckpointError(SSLError):
    """A checkpoint could not be read or written."""


class Interrupted(SSLError):
    """SIGINT/SIGTERM/SIGUSR1: the run stopped after a checkpoint; ``exit_code`` is 130,
    143 or 138 (128 + the signal number)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(SSLError):
    """The loss became NaN/inf more often than ``--skip-nonfinite`` allows."""


class NonFiniteCheckpoint(CheckpointError):
    """The weights to be saved hold NaN/inf: nothing is written."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint whose bytes no longer match its checksum."""


class WriteError(SSLError):
    """A file could not be written (a full disk, a quota, permissions)."""


class TooManyBadImagesError(DataError):
    """More than ``max_bad_fraction`` of a folder's images are unreadable."""

    def __init__(self, message: str) -> None:
        # DataLoader re-raises a worker's exception as ``type(exc)(text)`` where text is
        # "Caught ... in DataLoader worker ...\nOriginal Traceback ..." and ends with
        # "module.TooManyBadImagesError: <our message>". Keep only our one line so the CLI
        # still prints a one-line error, however the data was loaded.
        if "\nOriginal Traceback" in message:
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.partition(": ")[2] or last
        super().__init__(message)


class EvalError(SSLError):
    """An evaluation cannot run as asked (too few labels, no test split, ...)."""


class EmbedError(SSLError):
    """Bad ``ssl embed`` options or an unreadable embeddings file."""


class TargetError(SSLError):
    """A run directory, checkpoint or exported directory is missing or unusable."""


class ReportError(SSLError):
    """Bad ``ssl report`` options or a target that is not a run."""


class RunDirError(SSLError):
    """A run directory that may not be written to (another run's, an export, in use)."""


def suggest(name: str, choices: list[str]) -> str:
    """Return ' (did you mean X, Y?)' for close matches of ``name`` or ''."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if not close:
        # Substring matches catch 'vit' -> 'vit-s', which difflib's ratio misses.
        close = [c for c in choices if name.lower() in c.lower()][:3]
    return f" (did you mean {', '.join(close)}?)" if close else ""
