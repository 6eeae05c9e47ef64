"""Plugin discovery: find without importing, load on demand, validate, survive breakage."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslcli import registry
from sslcli.errors import PluginError
from tests.helpers import write_plugin_dist

BROKEN = {
    "fake_importerror": "import not_a_real_module_xyz\n",
    "fake_notmethod": "class Thing:\n    name = 'not-method'\n",
    "fake_wrongname": """
        from sslcli.method import Method
        class Wrong(Method):
            name = "something-else"
            def views(self): return []
            def training_step(self, batch, step): return None
    """,
    "fake_abstract": """
        from sslcli.method import Method
        class Half(Method):
            name = "half"
    """,
    "fake_badconfig": """
        from sslcli.method import Method
        class BadCfg(Method):
            name = "bad-config"
            class Config:
                pass
            def views(self): return []
            def training_step(self, batch, step): return None
    """,
}
EPS = {
    "needs-missing": "fake_importerror:Anything",
    "not-method": "fake_notmethod:Thing",
    "wrong-name": "fake_wrongname:Wrong",
    "half": "fake_abstract:Half",
    "bad-config": "fake_badconfig:BadCfg",
}


def test_builtins_found_without_import() -> None:
    import subprocess
    import sys

    # find() must not import plugin modules (a broken one could crash discovery): check in
    # a fresh interpreter, where nothing else has imported them yet.
    code = (
        "import sys; from sslcli import registry; f = registry.find(); "
        "print(len(f), sorted(m for m in sys.modules if m.startswith('sslcli_plugins.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    count, imported = out.stdout.strip().split(" ", 1)
    assert int(count) >= 1 and imported == "[]"
    found = registry.find()
    assert "simclr" in found and found["simclr"].package == "sslcli"
    assert found["simclr"].builtin
    assert registry.load("simclr").name == "simclr"


def test_unknown_method_suggests() -> None:
    with pytest.raises(PluginError, match="did you mean simclr"):
        registry.load("simclrr")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("needs-missing", "failed to import: ModuleNotFoundError"),
        ("not-method", "not a subclass of sslcli.Method"),
        ("wrong-name", "declares name 'something-else'"),
        ("half", "does not implement training_step, views"),
        ("bad-config", "Config is not a pydantic model"),
    ],
)
def test_broken_plugins_are_reported(plugin_path: Path, name: str, reason: str) -> None:
    write_plugin_dist(plugin_path, "fake-broken", EPS, BROKEN)
    with pytest.raises(PluginError, match=reason):
        registry.load(name)
    statuses = {s.info.name: s for s in registry.list_methods()}
    assert statuses[name].cls is None and reason.split(":")[0] in (statuses[name].error or "")
    assert statuses[name].info.package == "fake-broken"
    # The built-in methods still load next to the broken ones.
    assert statuses["simclr"].cls is not None


def test_broken_plugin_in_cli(plugin_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sslcli.cli.app import main

    write_plugin_dist(plugin_path, "fake-broken", EPS, BROKEN)
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "needs-missing" in listing and "broken" in listing and "simclr" in listing
    assert main(["train", "needs-missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs-missing" in err[0] and "ModuleNotFoundError" in err[0]
