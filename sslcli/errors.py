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


def suggest(name: str, choices: list[str]) -> str:
    """Return ' (did you mean X, Y?)' for close matches of ``name`` or ''."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    if not close:
        # Substring matches catch 'vit' -> 'vit-s', which difflib's ratio misses.
        close = [c for c in choices if name.lower() in c.lower()][:3]
    return f" (did you mean {', '.join(close)}?)" if close else ""
