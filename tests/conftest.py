"""Shared fixtures: tiny fake plugin distributions and fast run overrides."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# One intra-op thread: tests start subprocesses (torchrun, the CLI) next to the main one,
# and on a 2-core machine oversubscribed threads make every step many times slower.
torch.set_num_threads(1)

# Small enough for a 2-core CPU: the contract and CLI tests use these sizes.
TINY = {
    "backbone": {"name": "test_resnet"},
    "data": {"image_size": 16},
    "trainer": {"epochs": 1, "batch_size": 8, "max_steps": 2, "eval_knn": False},
}


def write_plugin_dist(
    root: Path,
    dist_name: str,
    entry_points: dict[str, str],
    modules: dict[str, str],
    version: str = "0.0.1",
) -> Path:
    """A minimal installed distribution (dist-info + modules) under ``root``.

    importlib.metadata finds it through sys.path exactly as it finds pip-installed
    packages, so registry tests exercise the real discovery path.
    """
    root.mkdir(parents=True, exist_ok=True)
    info = root / f"{dist_name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n"
    )
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[sslcli.methods]\n{eps}\n")
    for name, src in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(src))
    return root


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
