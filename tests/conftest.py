"""Shared fixtures: a directory on sys.path for fake plugin distributions (the writers and
run settings the tests share are in helpers.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# One intra-op thread: tests start subprocesses (torchrun, the CLI) next to the main one,
# and on a 2-core machine oversubscribed threads make every step many times slower.
torch.set_num_threads(1)


@pytest.fixture
def plugin_path(tmp_path: Path) -> Iterator[Path]:
    """A directory put on sys.path for the test; fake plugin dists go there."""
    root = tmp_path / "site"
    root.mkdir()
    sys.path.insert(0, str(root))
    try:
        yield root
    finally:
        sys.path.remove(str(root))
        for mod in [m for m in sys.modules if m.startswith("fake_")]:
            del sys.modules[mod]
        from sslcli import registry

        registry._load_cached.cache_clear()
