"""Config precedence (defaults < method recipe < file < flags < --set) and error lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from sslcli import api
from sslcli.config import parse_set, read_recipe
from sslcli.errors import ConfigError


def test_defaults_then_method_recipe() -> None:
    _, run, mcfg = api.resolve_config("simclr")
    assert run.optim.name == "lars"  # SimCLR's recipe, over sslcli's sgd default
    assert run.optim.lr == 0.3
    assert run.data.dataset == "digits"
    assert mcfg.temperature == 0.1


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_precedence_file_flags_set(tmp_path: Path, suffix: str) -> None:
    body = {
        ".toml": "[optim]\nlr = 0.5\nweight_decay = 0.01\n[trainer]\nepochs = 7\nbatch_size = 64\n"
        '[method]\nname = "simclr"\ntemperature = 0.5\n',
        ".yaml": "optim: {lr: 0.5, weight_decay: 0.01}\ntrainer: {epochs: 7, batch_size: 64}\n"
        "method: {name: simclr, temperature: 0.5}\n",
        ".json": '{"optim": {"lr": 0.5, "weight_decay": 0.01}, "trainer": {"epochs": 7, '
        '"batch_size": 64}, "method": {"name": "simclr", "temperature": 0.5}}',
    }[suffix]
    f = tmp_path / f"recipe{suffix}"
    f.write_text(body)
    _, run, mcfg = api.resolve_config(
        None,
        config=f,
        overrides={"trainer": {"epochs": 3}, "optim": {"lr": 0.7}},
        sets=["optim.lr=0.9", "method.temperature=0.25"],
    )
    assert run.method == "simclr"  # taken from the file
    assert run.optim.weight_decay == 0.01  # file over recipe
    assert run.trainer.batch_size == 64  # file over defaults
    assert run.trainer.epochs == 3  # flag over file
    assert run.optim.lr == 0.9  # --set over flag
    assert mcfg.temperature == 0.25  # --set over file
    assert run.optim.name == "lars"  # method recipe survives where nobody overrode it


def test_errors_one_line_per_field() -> None:
    with pytest.raises(ConfigError) as e:
        api.resolve_config(
            "simclr",
            sets=["trainer.epochs=-1", "optim.name=adam", "method.temperature=0", "method.bogus=1"],
        )
    lines = e.value.lines
    joined = "\n".join(lines)
    assert len(lines) == 4, lines
    assert "trainer.epochs" in joined and "optim.name" in joined
    assert "method.temperature" in joined and "method.bogus: unknown option" in joined


def test_unknown_section_and_bad_set() -> None:
    with pytest.raises(ConfigError, match="unknown section"):
        api.resolve_config("simclr", sets=["optimiser.lr=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_set(["lr0.1"])


def test_unreadable_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = ")
    with pytest.raises(ConfigError, match="cannot parse"):
        read_recipe(bad)


def test_set_values_are_typed() -> None:
    d = parse_set(["trainer.epochs=3", "backbone.kwargs={drop_rate: 0.1}", "data.dataset=digits"])
    assert d == {
        "trainer": {"epochs": 3},
        "backbone": {"kwargs": {"drop_rate": 0.1}},
        "data": {"dataset": "digits"},
    }
