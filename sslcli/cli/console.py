"""Consoles: results go to stdout, progress and notes to stderr (so --json stays clean)."""

from __future__ import annotations

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
