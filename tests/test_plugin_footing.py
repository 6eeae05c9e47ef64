"""Plugins on an equal footing with the built-ins: option defaults sized from the run's
backbone and data, recipe files shipped inside a plugin's package (``--config
METHOD:RECIPE``), options marked safe to change on resume, and ``heads.safetensors`` that
describe enough to rebuild the heads. Each with a throw-away plugin distribution on
sys.path (see tests/conftest.py ``write_plugin_dist``) or a built-in."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from sslcli import api, registry
from sslcli.errors import ConfigError, PluginError
from tests.helpers import cli_lines as cli
from tests.helpers import write_plugin_dist

QUICK = [
    "--backbone", "test_resnet", "--image-size", "16", "--batch-size", "8", "--epochs", "1",
    "--set", "trainer.max_steps=1", "--set", "trainer.eval_knn=false",
]  # fmt: skip


def sized_method(name: str, *, defaults: str, recipes_dir: str = '"recipes"') -> str:
    """A small real method whose projection width depends on the run (``defaults``: the
    body of ``option_defaults``) and whose loss weight may change on resume."""
    return f'''
from pydantic import Field
from torch import nn
from sslcli.plugin import (
    RESUME_SAFE, Method, MethodConfig, StepOutput, ViewSpec, depends_on, feature_dim,
    view_size,
)


class SizedConfig(MethodConfig):
    dim: int | None = Field(
        None, ge=1, description="Projection width.",
        json_schema_extra=depends_on("backbone and data set size"),
    )
    weight: float = Field(1.0, gt=0, description="Loss weight.", json_schema_extra=RESUME_SAFE)
    other: int = Field(3, ge=1, description="An architecture option.")


class Sized(Method):
    """Sized: cosine between two views' projections, width from the run (a test method)."""

    name = {name!r}
    Config = SizedConfig
    recipes_dir = {recipes_dir}

    def __init__(self, config, backbone, dataset_size=0):
        super().__init__(config, backbone, dataset_size)
        self.head = nn.Linear(feature_dim(backbone), config.dim or 2)

    @classmethod
    def option_defaults(cls, ctx):
        {defaults}

    def views(self):
        return [ViewSpec(count=2, size=view_size(self.backbone))]

    def training_step(self, batch, step):
        z1, z2 = (self.head(self.backbone(v)) for v in batch.views)
        loss = -nn.functional.cosine_similarity(z1, z2).mean() * self.config.weight
        return StepOutput(loss=loss, embedding=z1.detach())
'''


# Small on a small run, the paper's 8192 on ImageNet-sized data.
SIZED = 'return {"dim": 8192 if ctx.dataset_size > 100_000 else ctx.feature_dim // 2}'


def _config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


# ---------------------------------------------------------------------------------------------
# 1. Option defaults that depend on the backbone and the data
# ---------------------------------------------------------------------------------------------


def test_option_defaults_come_from_the_run_and_a_stated_value_wins(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_plugin_dist(
        plugin_path, "fake-sized", {"sized": "fake_sized:Sized"},
        {"fake_sized": sized_method("sized", defaults=SIZED)},
    )  # fmt: skip
    code, _, err = cli(["train", "sized", *QUICK, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    from sslcli.backbones import feature_dim, make_spec

    half = feature_dim(make_spec("test_resnet", 16).build()) // 2
    assert _config(tmp_path / "a")["method"]["dim"] == half != 2
    # A flag, --set or a recipe file always wins over the method's run-dependent default.
    recipe = tmp_path / "r.toml"
    recipe.write_text("[method]\nname = 'sized'\ndim = 5\n")
    code, _, err = cli(
        ["train", "--config", str(recipe), *QUICK, "--out", str(tmp_path / "b")], capsys
    )
    assert code == 0, err
    assert _config(tmp_path / "b")["method"]["dim"] == 5
    code, _, err = cli(
        ["train", "sized", *QUICK, "--set", "method.dim=6", "--out", str(tmp_path / "c")], capsys
    )
    assert code == 0 and _config(tmp_path / "c")["method"]["dim"] == 6
    # Resuming keeps the recorded value.
    code, _, err = cli(
        ["train", "--resume", str(tmp_path / "a"), "--set", "trainer.max_steps=2"], capsys
    )
    assert code == 0, err
    assert _config(tmp_path / "a")["method"]["dim"] == half
    # `ssl methods NAME` says what the default depends on.
    code, out, _ = cli(["methods", "sized"], capsys)
    words = " ".join(out.replace("│", " ").split())
    assert code == 0 and "depends on the backbone and data set size" in words, out


def test_option_defaults_may_only_fill_marked_options(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Checked when the plugin is loaded (for an ImageNet GPU run and a small CPU run), so
    `ssl methods` shows it broken and `ssl train` refuses it in one line."""
    write_plugin_dist(
        plugin_path, "fake-unmarked", {"unmarked": "fake_unmarked:Sized"},
        {"fake_unmarked": sized_method("unmarked", defaults='return {"other": 4}')},
    )  # fmt: skip
    code, _, err = cli(["train", "unmarked", *QUICK, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err) == 1, err
    assert "fake_unmarked:Sized" in err[0] and "option_defaults() returned other" in err[0]
    assert "marked: dim" in err[0] and not (tmp_path / "r").exists()
    code, out, _ = cli(["methods"], capsys)
    assert code == 0 and "broken" in out


def test_moco_records_the_queue_size_it_sized_from_the_data(tmp_path: Path) -> None:
    """The built-in use: MoCo's queue is sized from the data set through the same hook,
    so the run's config.json holds the number, not null; a stated size wins."""
    from sslcli.engine.trainer import Trainer

    o = {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": "digits", "image_size": 16},
        "trainer": {"batch_size": 64, "eval_knn": False, "out": str(tmp_path / "a")},
    }
    cls, run, mcfg = api.resolve_config("moco-v2", overrides=o)
    assert mcfg.queue_size is None
    tr = Trainer(run, cls, mcfg)
    assert tr.run.method_options["queue_size"] == tr.method.queue.size == 128  # 1797 // 8
    o["trainer"]["out"] = str(tmp_path / "b")
    cls, run, mcfg = api.resolve_config("moco-v2", overrides=o, sets=["method.queue_size=64"])
    tr = Trainer(run, cls, mcfg)
    assert tr.run.method_options["queue_size"] == tr.method.queue.size == 64


# ---------------------------------------------------------------------------------------------
# 2. Recipe files shipped in the plugin's package: --config METHOD:RECIPE
# ---------------------------------------------------------------------------------------------


def _write_package_plugin(root: Path) -> None:
    write_plugin_dist(root, "fake-recipes", {"reci": "fake_reci:Sized"}, {})
    pkg = root / "fake_reci"
    (pkg / "recipes").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(sized_method("reci", defaults=SIZED)))
    (pkg / "recipes" / "small.toml").write_text(
        "[trainer]\nepochs = 3\n[method]\ndim = 7\nweight = 0.5\n"
    )
    (pkg / "recipes" / "imagenet.yaml").write_text("method:\n  dim: 8192\n")


def test_a_plugin_recipe_is_named_without_a_path(
    plugin_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_package_plugin(plugin_path)
    cls, run, mcfg = api.resolve_config(config="reci:small")
    assert cls.name == "reci" and run.trainer.epochs == 3 and (mcfg.dim, mcfg.weight) == (7, 0.5)
    _, _, mcfg = api.resolve_config("reci", config="reci:imagenet")
    assert mcfg.dim == 8192
    with pytest.raises(ConfigError, match=r"ships no recipe 'smal' \(did you mean small\?\) "
                                          r"\(its recipes: imagenet, small\)"):  # fmt: skip
        api.resolve_config(config="reci:smal")
    code, out, _ = cli(["methods", "reci"], capsys)
    assert code == 0 and "--config reci:NAME" in out and "imagenet, small" in out
    # Built-ins ship no recipe files; their example recipes stay plain paths.
    with pytest.raises(ConfigError, match=r"byol ships no recipe .x.*recipes: none\); give a"):
        api.resolve_config(config="byol:x")
    code, _, err = cli(["train", "--config", "byol:x", *QUICK], capsys)
    assert code == 2 and len(err) == 1


# ---------------------------------------------------------------------------------------------
# 3. Options safe to change on resume
# ---------------------------------------------------------------------------------------------


def test_marked_options_may_change_on_resume_and_others_are_refused(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_plugin_dist(
        plugin_path, "fake-resume", {"resum": "fake_resume:Sized"},
        {"fake_resume": sized_method("resum", defaults=SIZED)},
    )  # fmt: skip
    run = tmp_path / "r"
    code, _, err = cli(["train", "resum", *QUICK, "--out", str(run)], capsys)
    assert code == 0, err
    code, _, err = cli(
        ["train", "--resume", str(run), "--set", "method.other=4", "--set", "trainer.max_steps=2"],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "architecture differs in method.other" in err[0]
    code, _, err = cli(
        ["train", "--resume", str(run), "--set", "method.weight=0.25",
         "--set", "trainer.max_steps=2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert any("method.weight 1.0 -> 0.25" in line for line in err)
    assert _config(run)["method"]["weight"] == 0.25


def test_builtin_temperatures_are_resume_safe_and_architecture_is_not() -> None:
    from sslcli.engine.resume import architecture_diff
    from sslcli.method import resume_safe_options

    safe = resume_safe_options(registry.load("simclr").Config)
    assert safe == {"temperature"}
    assert resume_safe_options(registry.load("moco-v2").Config) == {"temperature"}
    old = {"method": {"name": "simclr", "temperature": 0.1, "proj_dim": 128}}
    new = {"method": {"name": "simclr", "temperature": 0.5, "proj_dim": 64}}
    assert architecture_diff(old, new, safe) == ["method.proj_dim"]
    assert architecture_diff(old, new) == ["method.proj_dim", "method.temperature"]


# ---------------------------------------------------------------------------------------------
# 4. heads.safetensors carries enough to rebuild the heads
# ---------------------------------------------------------------------------------------------


def test_heads_rebuild_from_an_export_and_give_the_same_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors import safe_open

    import sslcli
    from sslcli.runs.targets import load_target
    from tests.helpers import make_run

    run = make_run(tmp_path / "run", "byol", "test_resnet", 16)
    out = tmp_path / "export"
    code, _, err = cli(["export", str(run), "--out", str(out), "--with-heads"], capsys)
    assert code == 0, err
    with safe_open(str(out / "heads.safetensors"), "pt") as f:
        desc = json.loads(f.metadata()["sslcli"])
    assert desc["method"] == "byol" and desc["plugin"]["package"] == "sslcli"
    assert desc["config"]["method"]["proj_dim"] == 256 and desc["which"] == "backbone"
    pred = desc["heads"]["predictor"]
    assert pred["class"] == "sslcli.nn.heads.MLP" and pred["modules"]["1"].endswith("BatchNorm1d")
    assert pred["tensors"]["0.weight"]["shape"] == [4096, 256]
    assert "backbone" not in " ".join(desc["heads"]["target"]["modules"])  # encoders left out

    original = load_target(run).method
    rebuilt = sslcli.load_heads(out)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        feats = original.embed(x)
        assert torch.equal(rebuilt.embed(x), feats)  # the exported encoder, loaded
        want = original.predictor(original.projector(feats))
        got = rebuilt.predictor(rebuilt.projector(feats))
        assert torch.equal(got, want)
        assert torch.equal(rebuilt.target.projector(feats), original.target.projector(feats))


def test_heads_from_another_architecture_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    import sslcli
    from sslcli.errors import TargetError
    from tests.helpers import make_run

    run = make_run(tmp_path / "run", "simclr", "test_resnet", 16)
    out = tmp_path / "export"
    assert cli(["export", str(run), "--out", str(out), "--with-heads"], capsys)[0] == 0
    f = out / "heads.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as h:
        desc = json.loads(h.metadata()["sslcli"])
    desc["config"]["method"]["proj_dim"] = 32  # the file's word no longer fits its tensors
    save_file(load_file(str(f)), str(f), {"sslcli": json.dumps(desc)})
    with pytest.raises(TargetError, match=r"head 'projector' differs in structure"):
        sslcli.load_heads(out)
    save_file(load_file(str(f)), str(f), {"format": "pt"})
    with pytest.raises(TargetError, match=r"does not describe its heads"):
        sslcli.load_heads(out)


def test_an_invalid_option_default_is_the_plugins_error(
    plugin_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Valid for the runs checked at load time, invalid (0) on a data set under 2000 images.
    bad = 'return {"dim": 0 if ctx.dataset_size < 2000 else 16}'
    write_plugin_dist(
        plugin_path, "fake-badval", {"badval": "fake_badval:Sized"},
        {"fake_badval": sized_method("badval", defaults=bad)},
    )  # fmt: skip
    code, _, err = cli(["train", "badval", *QUICK, "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and len(err) == 1, err
    assert "fake-badval 0.0.1" in err[0] and "option_defaults() gave an invalid value" in err[0]
    assert "method.dim" in err[0]
    # Invalid for a typical run: the plugin is broken from the start.
    write_plugin_dist(
        plugin_path / "b", "fake-badload", {"badload": "fake_badload:Sized"},
        {"fake_badload": sized_method("badload", defaults='return {"dim": -1}')},
    )  # fmt: skip
    import sys

    sys.path.insert(0, str(plugin_path / "b"))
    try:
        with pytest.raises(PluginError, match=r"option_defaults\(resnet50, 1281167 images, cuda\) "
                                              r"is invalid: method.dim"):  # fmt: skip
            registry.load("badload")
    finally:
        sys.path.remove(str(plugin_path / "b"))
