"""Exact resume: N steps + resume + N steps == 2N steps, bit for bit, mid-epoch too.

Also: a resumed run refuses a different architecture or batch size (one line, exit 2),
takes a changed learning rate, survives a checkpoint write that fails in the middle of a
real run, never unpickles, and continues in a run directory that was moved.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from sslcli import api
from sslcli.cli.app import main
from sslcli.engine.trainer import Trainer
from sslcli.errors import ConfigError
from sslcli.runs import checkpoint as ckpt
from tests.helpers import write_idx, write_image_tree

# 40 training images / batch 8 = 5 steps per epoch; 2 epochs = a 10-step schedule.
STEPS_PER_EPOCH, EPOCHS = 5, 2


def _overrides(data: Path, out: Path, max_steps: int | None, **trainer: Any) -> dict[str, Any]:
    return {
        # drop_path draws from the global torch RNG inside every step, so a wrongly restored
        # (or wrongly consumed) RNG shows up in the weights.
        "backbone": {"name": "test_resnet", "drop_path_rate": 0.1},
        "data": {"dataset": str(data), "image_size": 16, "num_workers": 0},
        "trainer": {"epochs": EPOCHS, "batch_size": 8, "max_steps": max_steps,
                    "log_every": 2, "eval_knn": False, "out": str(out), **trainer},
    }  # fmt: skip


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _step_logs(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, loss, emb_std) of the regular log lines (events excluded)."""
    return [(r["step"], r["loss"], r["emb_std"]) for r in _records(run_dir) if "event" not in r]


def _assert_same_state(a_dir: Path, b_dir: Path) -> None:
    a, ma = ckpt.load(a_dir)
    b, mb = ckpt.load(b_dir)
    assert ma["step"] == mb["step"]
    for group in ("model", "optim", "state"):
        assert a[group].keys() == b[group].keys(), group
        diff = [k for k in a[group] if not torch.equal(a[group][k], b[group][k])]
        assert not diff, f"{group} differs in {diff[:5]}"


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=40)


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_tree(tmp_path_factory.mktemp("folder"), per_class=20)


@pytest.mark.parametrize("source", ["in-memory", "files"])
def test_resume_mid_epoch_is_bit_exact(
    source: str, idx_data: Path, folder_data: Path, tmp_path: Path
) -> None:
    """8 steps in one go == 3 steps (stopped by max_steps, mid-epoch, mid log window) +
    resume with a larger max_steps + 5 steps, crossing an epoch boundary."""
    data = idx_data if source == "in-memory" else folder_data
    full = api.train("simclr", overrides=_overrides(data, tmp_path / "full", 8))
    half = api.train("simclr", overrides=_overrides(data, tmp_path / "half", 3))
    assert half.steps == 3
    _, meta = ckpt.load(half.run_dir)
    assert (meta["step"], meta["epoch"], meta["batch_in_epoch"]) == (3, 0, 3)
    resumed = api.train(overrides={"trainer": {"max_steps": 8}}, resume=half.run_dir)
    assert resumed.steps == full.steps == 8 and resumed.run_dir == half.run_dir
    _assert_same_state(full.run_dir, resumed.run_dir)
    # The line at step 4 averages steps 3 (before the stop) and 4 (after the resume), and
    # must equal the uninterrupted run's.
    assert _step_logs(full.run_dir) == _step_logs(resumed.run_dir)
    assert [s for s, _, _ in _step_logs(full.run_dir)] == [2, 4, 6, 8]
    assert resumed.final_loss == full.final_loss


def test_max_steps_stops_without_changing_the_schedule(idx_data: Path, tmp_path: Path) -> None:
    trainers = []
    for max_steps in (3, None):
        method_cls, run, mcfg = api.resolve_config(
            "simclr", overrides=_overrides(idx_data, tmp_path / str(max_steps), max_steps)
        )
        trainers.append(Trainer(run, method_cls, mcfg))
    short, whole = trainers
    assert short.total_steps == whole.total_steps == EPOCHS * STEPS_PER_EPOCH
    assert short.stop_step == 3 and whole.stop_step == 10
    factors = [[tr.schedule.lr_factor(s) for s in range(10)] for tr in (short, whole)]
    assert factors[0] == factors[1]


def test_default_warmup_is_capped_but_a_stated_one_is_not(
    idx_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SimCLR's built-in warm-up is 10 epochs: on this 2-epoch run it is capped to 10% of
    the run (1 step), and the trainer says so; a stated warm-up is kept as stated, also
    one equal to the built-in value (a recipe file stating the official 10 epochs)."""

    def warmup(**schedule: Any) -> int:
        o = _overrides(idx_data, tmp_path / "w", None)
        o["schedule"] = schedule
        method_cls, run, mcfg = api.resolve_config("simclr", overrides=o)
        return Trainer(run, method_cls, mcfg).warmup_steps

    assert warmup() == 1
    err = capsys.readouterr().err
    assert "warm-up: simclr's default 10 epochs is more than 10% of this 2-epoch run" in err
    assert warmup(warmup_epochs=0.6) == 3
    assert warmup(warmup_epochs=0) == 0
    assert warmup(warmup_epochs=10) == 10 * STEPS_PER_EPOCH
    assert "warm-up" not in capsys.readouterr().err


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_per_backbone_default_warmup_is_capped(
    backbone: str, idx_data: Path, tmp_path: Path
) -> None:
    # MoCo v3's ResNet recipe warms up for 10 epochs, its ViT recipe for 40: each is the
    # built-in default for its backbone, so each is capped on a short run.
    o = _overrides(idx_data, tmp_path / backbone, None)
    o["backbone"] = {"name": backbone}
    method_cls, run, mcfg = api.resolve_config("moco-v3", overrides=o)
    assert run.schedule.warmup_epochs is None
    assert method_cls.recipe_for(backbone).schedule["warmup_epochs"] == (
        10 if backbone == "test_resnet" else 40
    )
    assert Trainer(run, method_cls, mcfg).warmup_steps == 1


@pytest.mark.parametrize(
    ("recipe", "warmup", "how"),
    [
        ("moco-v3-vit-s-imagenet.toml", 40, "file"),
        ("byol-imagenet.toml", 10, "file"),
        ("byol-imagenet.toml", 10, "set"),
    ],
)
def test_stated_warmup_of_a_recipe_is_never_shortened(
    recipe: str, warmup: int, how: str, idx_data: Path, tmp_path: Path
) -> None:
    """The official warm-ups (MoCo v3 ViT-S 40 of 300 epochs; BYOL 10 epochs) stay whole.

    They used to be shortened whenever the run was shorter than 10x the warm-up: a value
    equal to the class recipe's was taken to be the built-in default and capped, so the
    ViT-S file's 40 of 300 epochs became 30, and BYOL's file (or ``--set
    schedule.warmup_epochs=10``) lost its warm-up on any run under 100 epochs.
    """
    o = _overrides(idx_data, tmp_path / "r", None, epochs=300 if warmup == 40 else 50)
    o["backbone"] = {"name": "test_vit" if "vit" in recipe else "test_resnet"}
    if "vit" in recipe:
        o["backbone"]["kwargs"] = {"num_heads": 2}
    recipes = Path(__file__).resolve().parents[2] / "examples" / "recipes"
    config = recipes / recipe if how == "file" else None
    sets = ["schedule.warmup_epochs=10"] if how == "set" else None
    method_cls, run, mcfg = api.resolve_config(
        None if config else "byol", config=config, overrides=o, sets=sets
    )
    tr = Trainer(run, method_cls, mcfg)
    assert run.schedule.warmup_epochs == warmup
    assert tr.warmup_steps == warmup * STEPS_PER_EPOCH


def _cli(args: list[str]) -> list[str]:
    return ["train", *args]


def test_resume_refuses_another_architecture_in_one_line(
    idx_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "run", 1))
    capsys.readouterr()
    code = main(_cli(["--resume", str(run.run_dir), "--backbone", "test_vit",
                      "--set", "method.proj_dim=64"]))  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ssl: error: cannot resume")
    assert "backbone.name ('test_resnet' -> 'test_vit')" in err[0]
    assert "method.proj_dim (128 -> 64)" in err[0]
    # the batch size fixes which samples a step sees: refused as well
    code = main(_cli(["--resume", str(run.run_dir), "--batch-size", "16"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "trainer.batch_size differs (8 -> 16)" in err[0]


def test_resume_takes_the_new_learning_rate(idx_data: Path, tmp_path: Path) -> None:
    run = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "run", 2))
    o = _overrides(idx_data, tmp_path / "run", 4)
    o["optim"] = {"lr": 0.6}  # the recipe's 0.3, doubled
    method_cls, cfg, mcfg = api.resolve_config(overrides=o, resume=run.run_dir)
    tr = Trainer(cfg, method_cls, mcfg, resume=run.run_dir)
    tr.load_checkpoint(ckpt.resolve(run.run_dir))
    assert tr.step == 2
    assert {g["base_lr"] for g in tr.optimizer.param_groups} == {0.6 * 8 / 256}
    saved, _ = ckpt.load(run.run_dir)
    state = tr.optimizer.state_dict()["state"]
    assert torch.equal(state[0]["momentum_buffer"], saved["optim"]["0.momentum_buffer"])


def test_failed_checkpoint_write_mid_run_keeps_the_previous_one(
    idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The disk fills up while the epoch-2 checkpoint is being written."""
    real_save = ckpt.save_file
    calls = {"n": 0}

    def failing_save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(tensors, filename, metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])  # half of it reached the disk
            raise ckpt.SafetensorError("Error while serializing: No space left on device")
        real_save(tensors, filename, metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save)
    out = tmp_path / "run"
    args = ["simclr", "--data", str(idx_data), "--backbone", "test_resnet", "--image-size",
            "16", "--batch-size", "8", "--epochs", "2", "--out", str(out), "--set",
            "trainer.eval_knn=false", "--set", "data.num_workers=0"]  # fmt: skip
    code = main(_cli(args))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1, errors
    assert "could not write checkpoint at step 10" in errors[0]
    assert "No space left on device" in errors[0]
    assert f"{out / 'checkpoints' / 'last.safetensors'} (step 5) is intact" in errors[0]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["last.safetensors", "step-00000005.safetensors"]  # no half file left
    monkeypatch.setattr(ckpt, "save_file", real_save)
    resumed = api.train(resume=out)
    assert resumed.steps == 10 and ckpt.read_meta(out)["step"] == 10


def test_resume_never_unpickles(
    idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "run", 2))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a checkpoint was unpickled")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                      (torch, "load")):  # fmt: skip
        monkeypatch.setattr(mod, name, refuse)
    resumed = api.train(overrides={"trainer": {"max_steps": 3}}, resume=run.run_dir)
    assert resumed.steps == 3


def test_log_lines_from_after_the_checkpoint_are_dropped(idx_data: Path, tmp_path: Path) -> None:
    """A run killed without a checkpoint may have logged steps the resume will redo."""
    run = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "run", 4))
    with open(run.run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "epoch": 1, "lr": 0.1, "loss": 9.0}) + "\n")
        f.write('{"step": 7, "loss"')  # cut by the kill
    api.train(overrides={"trainer": {"max_steps": 6}}, resume=run.run_dir)
    recs = _records(run.run_dir)
    assert [r["step"] for r in recs if "event" not in r] == [2, 4, 6]
    assert 9.0 not in [r.get("loss") for r in recs]
    assert [r["event"] for r in recs if "event" in r][:3] == ["start", "end", "resume"]


def test_resume_accepts_moved_data_but_not_other_data(
    idx_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Copying the dataset elsewhere (a node's local disk) is fine; other data is not."""
    run = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "run", 2))
    copy = tmp_path / "copy"
    shutil.copytree(idx_data, copy)
    resumed = api.train(overrides={"data": {"dataset": str(copy)}, "trainer": {"max_steps": 3}},
                        resume=run.run_dir)  # fmt: skip
    assert resumed.steps == 3
    capsys.readouterr()
    other = write_image_tree(tmp_path / "other", per_class=20)
    assert main(_cli(["--resume", str(run.run_dir), "--data", str(other)])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "it was trained on idx data" in err[0] and "is imagefolder" in err[0]


def test_resume_continues_in_a_moved_run_directory(idx_data: Path, tmp_path: Path) -> None:
    run = api.train("simclr", overrides=_overrides(idx_data, tmp_path / "old", 2))
    moved = tmp_path / "moved"
    shutil.move(str(run.run_dir), moved)
    resumed = api.train(overrides={"trainer": {"max_steps": 3}}, resume=moved / "checkpoints")
    assert resumed.run_dir == moved and not (tmp_path / "old").exists()
    assert json.loads((moved / "config.json").read_text())["trainer"]["out"] == str(moved)
    assert ckpt.read_meta(moved)["step"] == 3


def test_checkpoint_every_writes_mid_epoch_checkpoints(idx_data: Path, tmp_path: Path) -> None:
    """``trainer.checkpoint_every`` (read by the engine; declared in TrainerConfig by the
    lead) bounds the work a crash can lose within a long epoch."""
    method_cls, run, mcfg = api.resolve_config(
        "simclr", overrides=_overrides(idx_data, tmp_path / "run", 4, keep_checkpoints=5)
    )
    if "checkpoint_every" in type(run.trainer).model_fields:
        run.trainer.checkpoint_every = 3  # type: ignore[attr-defined]
    else:
        object.__setattr__(run.trainer, "checkpoint_every", 3)
    Trainer(run, method_cls, mcfg).fit()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["last.safetensors", "step-00000003.safetensors", "step-00000004.safetensors"]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        # 10-step runs. MoCo v1 / InstDisc: x0.1 at 0.6 and 0.8 of the run (120, 160 of 200).
        ("moco-v1", [1.0] * 6 + [0.1] * 2 + [0.01] * 2),
        ("instdisc", [1.0] * 6 + [0.1] * 2 + [0.01] * 2),
        # CMC: 120/160/200 of 240 -> steps 5, round(6.67) = 7, round(8.33) = 8.
        ("cmc", [1.0] * 5 + [0.1] * 2 + [0.01] + [0.001] * 2),
        # InvaSpread (after the official "fix lr bug"): x0.1, x0.05, x0.01 of the base lr
        # at 120, 160, 200 of 301 -> steps round(3.99) = 4, round(5.32) = 5, round(6.64) = 7.
        ("invaspread", [1.0] * 4 + [0.1] + [0.05] * 2 + [0.01] * 3),
    ],
)
def test_recipe_milestones_are_fractions_of_any_run(
    method: str, expected: list[float], idx_data: Path, tmp_path: Path
) -> None:
    method_cls, run, mcfg = api.resolve_config(
        method, overrides=_overrides(idx_data, tmp_path / method, None)
    )
    tr = Trainer(run, method_cls, mcfg)
    assert [tr.schedule.lr_factor(s) for s in range(10)] == pytest.approx(expected)


def test_milestones_in_epochs_and_bad_ones(idx_data: Path, tmp_path: Path) -> None:
    o = _overrides(idx_data, tmp_path / "w", None)
    o["schedule"] = {"kind": "step", "milestones": [1], "gamma": 0.5}
    method_cls, run, mcfg = api.resolve_config("simclr", overrides=o)
    # Epoch 1 = step 5; the recipe warm-up (capped to 1 step) comes first.
    tr = Trainer(run, method_cls, mcfg)
    assert [tr.schedule.lr_factor(s) for s in range(10)] == [1.0] * 5 + [0.5] * 5
    for bad, why in (([0], "must be > 0"), ([3], "beyond trainer.epochs=2")):
        o["schedule"]["milestones"] = bad
        with pytest.raises(ConfigError, match=why):
            api.resolve_config("simclr", overrides=o)
    # One factor per milestone, relative to the base lr (not compounded), in any order.
    o["schedule"] = {"kind": "step", "milestones": [1.6, 0.5], "milestone_factors": [0.01, 0.2]}
    method_cls, run, mcfg = api.resolve_config("simclr", overrides=o)
    tr = Trainer(run, method_cls, mcfg)
    assert [tr.schedule.lr_factor(s) for s in range(10)] == [1.0] * 5 + [0.2] * 3 + [0.01] * 2
    o["schedule"]["milestone_factors"] = [0.1]
    with pytest.raises(ConfigError, match="1 values for 2 milestones"):
        api.resolve_config("simclr", overrides=o)
