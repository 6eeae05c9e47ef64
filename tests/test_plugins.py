"""Third-party methods as first-class citizens: each failure a plugin author or user met,
reproduced with a throw-away plugin distribution (a dist-info on sys.path, found by
importlib.metadata exactly like a pip-installed package)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sslcli import api, registry
from sslcli.cli.app import main
from sslcli.errors import ConfigError, MethodContractError, PluginError
from tests.helpers import cli_lines as cli
from tests.helpers import write_plugin_dist

QUICK = [
    "--backbone", "test_resnet", "--image-size", "16", "--batch-size", "8", "--epochs", "1",
    "--set", "trainer.max_steps=1", "--set", "trainer.eval_knn=false",
]  # fmt: skip


def tiny_method(
    name: str,
    *,
    cls: str = "Tiny",
    logs: str = "{}",
    ret: str = "StepOutput(loss=loss, logs=LOGS, embedding=z1.detach())",
    views: str = "[ViewSpec(count=2, size=view_size(self.backbone))]",
    init_extra: str = "",
    body: str = "",
    doc: str = "Tiny: cosine between the two views' projections (a test method).",
    header: str = "",
    dim_default: str = "8",
) -> str:
    """Source of a small but real method written against the public API only."""
    return f'''
from pydantic import Field
from torch import nn
from sslcli.plugin import (
    Method, MethodConfig, Recipe, StepOutput, ViewSpec, feature_dim, view_size,
)
{header}

class TinyConfig(MethodConfig):
    dim: int = Field({dim_default}, ge=1, description="Projection width.")


class {cls}(Method):
    """{doc}"""

    name = {name!r}
    Config = TinyConfig

    def __init__(self, config, backbone, dataset_size=0):
        super().__init__(config, backbone, dataset_size)
        self.head = nn.Linear(feature_dim(backbone), config.dim)
        {init_extra}

    def views(self):
        return {views}

    def training_step(self, batch, step):
        z1, z2 = (self.head(self.backbone(v)) for v in batch.views)
        loss = -nn.functional.cosine_similarity(z1, z2).mean()
        LOGS = {logs}
        return {ret}
{body}
'''


# ---------------------------------------------------------------------------------------------
# 1. Same-name plugins never shadow each other silently
# ---------------------------------------------------------------------------------------------


def test_clashing_names_are_shown_refused_and_picked_by_package(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_plugin_dist(
        plugin_path, "sslcli-other-byol", {"byol": "fake_byol:Tiny"},
        {"fake_byol": tiny_method("byol")}, version="2.0",
    )  # fmt: skip
    clash = registry.clashes()["byol"]
    assert {c.package for c in clash} == {"sslcli", "sslcli-other-byol"}

    code, out, _ = cli(["methods"], capsys)
    assert code == 0 and "name clash" in out and "sslcli-other-byol:byol" in out

    code, _, err = cli(["train", "byol", *QUICK, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err) == 1
    assert "sslcli 0.1.0" in err[0] and "sslcli-other-byol 2.0" in err[0]
    assert "PACKAGE:METHOD" in err[0] and not (tmp_path / "r").exists()

    # A qualified name picks one; the built-in is still there under its package.
    assert registry.load("sslcli:byol").__module__ == "sslcli_plugins.byol"
    assert registry.load("sslcli_other_byol:byol").__module__ == "fake_byol"
    code, _, err = cli(
        ["train", "sslcli-other-byol:byol", *QUICK, "--out", str(tmp_path / "q")], capsys
    )
    assert code == 0, err
    record = json.loads((tmp_path / "q" / "config.json").read_text())["plugin"]
    assert record["package"] == "sslcli-other-byol" and record["version"] == "2.0"
    # Resuming needs no name: the run's record says which package trained it.
    code, _, err = cli(
        ["train", "--resume", str(tmp_path / "q"), "--set", "trainer.max_steps=2"], capsys
    )
    assert code == 0, err


def test_unknown_package_in_a_qualified_name(plugin_path: Path) -> None:
    with pytest.raises(PluginError, match=r"'nope' registers no method 'byol'.*sslcli:byol"):
        registry.load("nope:byol")


# ---------------------------------------------------------------------------------------------
# 2. Log keys the engine owns are refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["lr", "step", "loss"])
def test_reserved_log_keys_are_refused_naming_the_plugin(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, key: str
) -> None:
    write_plugin_dist(
        plugin_path, "fake-logs", {"logs-" + key: "fake_logs:Tiny"},
        {"fake_logs": tiny_method("logs-" + key, logs=f"{{{key!r}: 1.0, 'fine': 2.0}}")},
    )  # fmt: skip
    out = tmp_path / "run"
    code, _, err = cli(["train", f"logs-{key}", *QUICK, "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"method 'logs-{key}' (fake-logs 0.0.1)" in err[0]
    assert f"reserved key(s) {key!r}" in err[0]
    assert not out.exists()  # nothing that looks like a run


# ---------------------------------------------------------------------------------------------
# 3. Run-time contract violations: one line naming method, package and version; exit 2
# ---------------------------------------------------------------------------------------------

VIOLATIONS = {
    "returns-tensor": (
        dict(ret="loss"),
        "training_step returned Tensor; expected sslcli.plugin.StepOutput",
    ),
    "dict-views": (
        dict(views="[{'size': 16}, {'size': 16}]"),
        "views()[0] is a dict; expected an sslcli.plugin.ViewSpec",
    ),
    "init-raises": (
        dict(init_extra="raise ValueError('no GPU, no party')"),
        "__init__(config, backbone, dataset_size) raised ValueError: no GPU, no party",
    ),
    "detached-loss": (
        dict(ret="StepOutput(loss=loss.detach())"),
        "StepOutput.loss does not require grad",
    ),
    "leaves-params-out": (
        dict(body="    def param_groups(self):\n"
                  "        return [{'params': list(self.backbone.parameters())}]\n"),
        "param_groups() leaves out the trainable parameters head.weight, head.bias",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_contract_violations_are_one_line_and_leave_no_run(
    plugin_path: Path,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    kwargs, expected = VIOLATIONS[case]
    write_plugin_dist(
        plugin_path, "fake-violations", {case: "fake_violation:Tiny"},
        {"fake_violation": tiny_method(case, **kwargs)}, version="1.2.3",
    )  # fmt: skip
    out = tmp_path / "run"
    code, _, err = cli(["train", case, *QUICK, "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"method {case!r} (fake-violations 1.2.3)" in err[0] and expected in err[0], err[0]
    assert not out.exists()
    # An existing --out directory keeps what was there and gets nothing that looks like a run.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["train", case, *QUICK, "--out", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # The traceback is there for the plugin's author.
    monkeypatch.setenv("SSLCLI_TRACEBACK", "1")
    with pytest.raises(MethodContractError):
        main(["train", case, *QUICK, "--out", str(tmp_path / "tb")])


def test_wrong_hook_signature_is_reported_at_load(
    plugin_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tiny_method("wrong-sig").replace(
        "def training_step(self, batch, step):", "def training_step(self, batch):"
    )
    write_plugin_dist(plugin_path, "fake-sig", {"wrong-sig": "fake_sig:Tiny"}, {"fake_sig": src})
    code, out, _ = cli(["methods"], capsys)
    assert code == 0 and "broken" in out
    code, _, err = cli(["train", "wrong-sig", *QUICK], capsys)
    assert code == 2 and len(err) == 1
    assert "training_step(self, batch) cannot be called as training_step(self, batch, step)" in (
        err[0]
    )


# ---------------------------------------------------------------------------------------------
# 4. A plugin's recipe typo and invalid defaults are the plugin's errors, at load time
# ---------------------------------------------------------------------------------------------


def test_recipe_typo_and_invalid_defaults_are_the_plugins(plugin_path: Path) -> None:
    typo = tiny_method("typo").replace(
        "    Config = TinyConfig\n",
        "    Config = TinyConfig\n    recipe = Recipe(schedule={'final_lr': 0.0})\n",
    )
    write_plugin_dist(
        plugin_path, "fake-recipes", {"typo": "fake_typo:Tiny", "bad-default": "fake_bad:Tiny"},
        {"fake_typo": typo, "fake_bad": tiny_method("bad-default", dim_default="-3")},
    )  # fmt: skip
    with pytest.raises(PluginError) as e:
        registry.load("typo")
    msg = str(e.value)
    assert "method typo's recipe (for backbone resnet50): schedule.final_lr: unknown option" in msg
    assert "did you mean final_lr_fraction" in msg and "fake-recipes 0.0.1" in msg
    with pytest.raises(PluginError, match=r"Config defaults do not validate: method\.dim"):
        registry.load("bad-default")
    status = {s.info.name: s for s in registry.list_methods()}
    assert status["typo"].cls is None and status["bad-default"].cls is None
    assert status["simclr"].cls is not None


# ---------------------------------------------------------------------------------------------
# 5. Runs record the plugin; without it, eval says which package the run needs
# ---------------------------------------------------------------------------------------------


def test_runs_record_the_plugin_and_eval_names_the_missing_package(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from sslcli.runs import checkpoint as ckpt

    write_plugin_dist(
        plugin_path, "sslcli-tiny", {"tiny": "fake_tiny:Tiny"},
        {"fake_tiny": tiny_method("tiny")}, version="0.4.2",
    )  # fmt: skip
    out = tmp_path / "run"
    assert main(["train", "tiny", *QUICK, "--out", str(out)]) == 0
    want = {"name": "tiny", "package": "sslcli-tiny", "version": "0.4.2",
            "entry_point": "fake_tiny:Tiny"}  # fmt: skip
    assert json.loads((out / "config.json").read_text())["plugin"] == want
    assert ckpt.read_meta(out)["plugin"] == want
    capsys.readouterr()

    # "Uninstall" the plugin: its distribution leaves sys.path.
    sys_path_entry = str(plugin_path)
    import sys

    sys.path.remove(sys_path_entry)
    try:
        registry._load_cached.cache_clear()
        code, _, err = cli(["eval", "knn", str(out)], capsys)
        assert code == 2 and len(err) == 1, err
        assert "method 'tiny' from the package sslcli-tiny 0.4.2" in err[0]
        assert "pip install 'sslcli-tiny==0.4.2'" in err[0]
        code, _, err = cli(["train", "--resume", str(out)], capsys)
        assert code == 2 and "sslcli-tiny 0.4.2" in err[0]
    finally:
        sys.path.insert(0, sys_path_entry)


# ---------------------------------------------------------------------------------------------
# param_groups(): the norm/bias exclusion applies, every parameter in exactly one group
# ---------------------------------------------------------------------------------------------


def test_param_groups_get_the_norm_bias_exclusion(plugin_path: Path, tmp_path: Path) -> None:
    from sslcli.engine.trainer import Trainer

    body = (
        "    def param_groups(self):\n"
        "        return [{'params': list(self.backbone.parameters()), 'name': 'enc'},\n"
        "                {'params': list(self.head.parameters()), 'name': 'head',\n"
        "                 'fixed_lr': True}]\n"
    )
    write_plugin_dist(
        plugin_path, "fake-groups", {"groups": "fake_groups:Tiny"},
        {"fake_groups": tiny_method("groups", body=body)},
    )  # fmt: skip
    overrides = {"backbone": {"name": "test_resnet"}, "data": {"image_size": 16},
                 "optim": {"name": "lars", "weight_decay": 0.1},
                 "trainer": {"batch_size": 8, "out": str(tmp_path / "r")}}  # fmt: skip
    cls, run, mcfg = api.resolve_config("groups", overrides=overrides)
    tr = Trainer(run, cls, mcfg)
    groups = {g["name"]: g for g in tr.optimizer.param_groups}
    assert set(groups) == {"enc", "enc/no_decay", "head", "head/no_decay"}
    bias = tr.method.head.bias
    assert any(p is bias for p in groups["head/no_decay"]["params"])
    assert groups["head/no_decay"]["weight_decay"] == 0.0
    assert groups["head/no_decay"]["lars_exclude"] and groups["head/no_decay"]["fixed_lr"]
    assert groups["head"]["weight_decay"] == 0.1
    # ... and not when the user turns it off.
    cls, run, mcfg = api.resolve_config(
        "groups", overrides=overrides, sets=["optim.exclude_norm_bias=false"]
    )
    tr = Trainer(run, cls, mcfg)
    assert {g["name"] for g in tr.optimizer.param_groups} == {"enc", "head"}


# ---------------------------------------------------------------------------------------------
# A broken plugin is one line in `ssl methods` and never stops the others
# ---------------------------------------------------------------------------------------------

EXITS = "import sys\nsys.exit(3)\n"
NAME_RAISES = """
from sslcli.method import Method

class _Meta(type(Method)):
    @property
    def name(cls):
        raise RuntimeError("name is computed from a server that is down")

class Bad(Method, metaclass=_Meta):
    def views(self): return []
    def training_step(self, batch, step): return None
"""


def test_exit_at_import_and_raising_name_are_listed_as_broken(
    plugin_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_plugin_dist(
        plugin_path, "fake-hostile",
        {"exits": "fake_exits:Anything", "name-raises": "fake_name:Bad",
         "brackets": "fake_brackets:Tiny"},
        {"fake_exits": EXITS, "fake_name": NAME_RAISES,
         "fake_brackets": tiny_method("brackets", doc="Needs pip install x[cuda] first.")},
    )  # fmt: skip
    code, out, _ = cli(["methods"], capsys)
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert "broken" in rows["exits"] and "SystemExit: 3" in out
    assert "broken" in rows["name-raises"] and "RuntimeError" in out
    assert "simclr" in rows and "broken" not in rows["simclr"]
    # rich markup in plugin text is shown as text
    assert "x[cuda]" in out.replace("│", "").replace("\n", "")
    code, _, err = cli(["train", "exits"], capsys)
    assert code == 2 and len(err) == 1 and "SystemExit: 3" in err[0]


# ---------------------------------------------------------------------------------------------
# Also found on the user path
# ---------------------------------------------------------------------------------------------


def test_unknown_option_gets_a_suggestion_and_no_pydantic_prefix() -> None:
    with pytest.raises(ConfigError) as e:
        api.resolve_config("simclr", sets=["method.temprature=0.1", "optim.lrr=1"])
    lines = " | ".join(e.value.lines)
    assert "method.temprature: unknown option (did you mean temperature?)" in lines
    assert "optim.lrr: unknown option (did you mean lr?)" in lines
    with pytest.raises(ConfigError) as e:
        api.resolve_config("simclr", sets=["schedule.milestones=[-1]"])
    assert "Value error" not in str(e.value) and "milestone -1.0 must be > 0" in str(e.value)


def test_resuming_a_finished_run_adds_no_second_end_event(tmp_path: Path) -> None:
    o = {"backbone": {"name": "test_resnet"}, "data": {"image_size": 16},
         "trainer": {"epochs": 1, "batch_size": 8, "max_steps": 1, "eval_knn": False,
                     "out": str(tmp_path / "r")}}  # fmt: skip
    run = api.train("simclr", overrides=o)
    again = api.train(resume=run.run_dir, overrides={"trainer": {"eval_knn": False}})
    assert again.steps == 1
    events = [
        json.loads(line).get("event")
        for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert events.count("end") == 1 and "resume" not in events


def test_exported_safetensors_honour_the_umask(tmp_path: Path) -> None:
    from tests.helpers import make_run

    run = make_run(tmp_path / "run")
    old = os.umask(0o027)
    try:
        api.export(run, tmp_path / "export")
    finally:
        os.umask(old)
    for f in (tmp_path / "export").iterdir():
        assert f.stat().st_mode & 0o777 == 0o640, f
