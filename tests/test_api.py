"""The top-level Python API: every advertised name resolves to the callable it documents,
whatever was imported before (submodules must not shadow the functions)."""

from __future__ import annotations

import subprocess
import sys

import sslcli


def test_every_public_name_resolves() -> None:
    for name in sslcli.__all__:
        assert getattr(sslcli, name) is not None, name


def test_functions_are_not_shadowed_by_submodules() -> None:
    # Importing the implementation modules first (as the CLI does) must leave
    # sslcli.export / sslcli.compare the functions.
    code = (
        "import sslcli.runs.export, sslcli.runs.compare, sslcli.cli.app, sslcli\n"
        "for n in ('train', 'evaluate', 'export', 'compare', 'load_timm'):\n"
        "    f = getattr(sslcli, n)\n"
        "    assert callable(f) and type(f).__name__ == 'function', (n, f)\n"
        "from sslcli import compare, export\n"
        "assert type(compare).__name__ == type(export).__name__ == 'function'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compare_cli_in_a_fresh_interpreter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # In-process CLI tests import sslcli's modules in advance and hid a shadowing bug once.
    r = subprocess.run(
        [sys.executable, "-m", "sslcli", "compare", "--format", "bogus", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line == "ssl: error: --format 'bogus': use one of table, markdown, csv, json"
