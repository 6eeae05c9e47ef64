"""``ssl train --dry-run``: the plan comes from the trainer's own set-up, builds the model
once, writes nothing, fails like a real run; the memory estimate and activation
checkpointing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sslcli import api
from sslcli.cli.app import main
from sslcli.data.views import expand
from sslcli.engine import memory
from sslcli.engine import plan as dry
from sslcli.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "examples" / "recipes"


def _dry(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    code = main(["train", *args, "--dry-run", "--json"])
    cap = capsys.readouterr()
    return code, (json.loads(cap.out) if code == 0 else {}), cap.err


def test_moco_v3_vit_recipe_plan_shows_heads_frozen_projection_lr_and_warmup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, plan, err = _dry(
        capsys, "moco-v3", "--config", str(RECIPES / "moco-v3-vit-s-imagenet.toml"),
        "--processes", "8",
    )  # fmt: skip
    assert code == 0, err
    b = plan["backbone"]
    # The real call to timm, and the model it built.
    (call,) = b["create_model_calls"]
    assert call["kwargs"]["img_size"] == 224 and call["kwargs"]["num_classes"] == 0
    assert b["num_heads"] == b["create_model_calls"][0]["kwargs"].get("num_heads", 6)
    assert b["depth"] == 12 and b["embed_dim"] == 384 and b["patch_size"] == [16, 16]
    assert b["patch_projection_trainable"] is False
    frozen = {f["name"] for f in plan["parameters"]["frozen_tensors"]}
    assert {"backbone.patch_embed.proj.weight", "momentum_encoder.*"} <= frozen
    p = plan["parameters"]
    assert p["trainable"] + p["frozen"] == p["total"]
    assert p["by_part"]["momentum_encoder"]["trainable"] == 0
    # lr after scaling, warm-up and schedule in steps and epochs.
    assert plan["lr"]["scaled"] == pytest.approx(1.5e-4 * 4096 / 256)
    s = plan["schedule"]
    assert s["warmup_epochs_set"] == 40
    assert s["steps_per_epoch"] == dry.IMAGENET_TRAIN_IMAGES // 4096
    assert s["total_steps"] == 300 * s["steps_per_epoch"]
    assert s["warmup_epochs"] == pytest.approx(s["warmup_steps"] / s["steps_per_epoch"])
    assert plan["optimizer"]["name"] == "adamw"
    assert sum(g["params"] for g in plan["optimizer"]["groups"]) == p["trainable"]
    # Where each value comes from.
    src = {r["key"]: r["from"] for r in plan["settings"]}
    assert src["optim.lr"] == "file moco-v3-vit-s-imagenet.toml"
    assert src["trainer.seed"] == "default"
    assert "ImageNet-1k" in plan["data"]["note"]
    # Per process: 4096 / 8.
    assert plan["trainer"]["batch_per_process"] == 512
    mem = plan["memory"]
    assert mem["total"] > mem["activations"] > 10 * 2**30  # tens of GiB at 512 x 2 views
    assert not (tmp_path / "runs").exists()


def test_plan_follows_flags_and_set_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, plan, err = _dry(
        capsys, "simsiam", "--backbone", "test_resnet", "--image-size", "16",
        "--batch-size", "64", "--epochs", "10", "--set", "optim.lr=0.1",
        "--set", "schedule.warmup_epochs=2", "--out", str(tmp_path / "r"),
    )  # fmt: skip
    assert code == 0, err
    src = {r["key"]: r["from"] for r in plan["settings"]}
    assert src["optim.lr"] == "--set" and src["trainer.batch_size"] == "flag"
    assert src["optim.name"] == "default" or src["optim.name"] == "method recipe"
    assert plan["data"]["opened"] == "digits" and plan["data"]["images"] == 1438
    assert plan["schedule"]["steps_per_epoch"] == 1438 // 64
    assert plan["schedule"]["warmup_steps"] == 2 * (1438 // 64)
    # SimSiam's predictor group keeps a fixed lr.
    groups = {g["name"]: g for g in plan["optimizer"]["groups"]}
    assert groups["predictor"]["fixed_lr"] and not groups["encoder"]["fixed_lr"]
    assert groups["encoder"]["lr"] == pytest.approx(0.1 * 64 / 256)
    assert plan["backbone"]["small_stem"] is True
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "optim.lr=-1"], "optim.lr"),
        (["--data", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--batch-size", "10", "--processes", "3"], "not divisible by 3"),
        (["--batch-size", "4096"], None),  # data named: no ImageNet assumption
        (["--backbone", "dla46_c", "--set", "trainer.grad_checkpointing=true"],
         "does not support activation checkpointing"),
    ],
)  # fmt: skip
def test_wrong_settings_fail_as_a_real_run_one_line(
    args: list[str], needle: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    base = ["simclr", "--image-size", "16", "--data", "digits", "--backbone", "test_resnet"]
    code, _, err = _dry(capsys, *base, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssl: error:")
    assert needle is None or needle in lines[0]
    if "--processes" in args:
        return  # (a real run gets its process count from torchrun)
    # The same settings fail the same way in a real run.
    code2 = main(["train", *base, *args, "--set", "trainer.max_steps=1"])
    err2 = capsys.readouterr().err.strip().splitlines()
    assert code2 == 2 and err2[-1] == lines[0]
    assert not (tmp_path / "runs").exists()


def test_dry_run_only_flags_are_refused_without_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "simclr", "--json"]) == 2
    assert "--json: only with --dry-run" in capsys.readouterr().err


def test_table_output_and_the_images_assumption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code = main(["train", "byol", "--backbone", "test_resnet", "--image-size", "16",
                 "--images", "50000", "--batch-size", "256", "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "50,000 images" in out and "195 steps/epoch" in out
    assert "timm.create_model" in out and "'test_resnet'" in out
    assert "estimated peak memory per process" in out and "CPU run" in out


# -- the memory estimate ---------------------------------------------------------------------
def _trainer(method: str, overrides: dict[str, Any]) -> Trainer:
    mc, run, mcfg = api.resolve_config(method, overrides=overrides)
    return Trainer(run, mc, mcfg, dry_run=dry.DryRun(images=4096))


@pytest.mark.parametrize(
    ("method", "overrides"),
    [
        ("simclr", {"backbone": {"name": "test_resnet"}, "data": {"image_size": 96}}),
        # Multi-crop ViT: 2 global + local crops of another size, counted in tokens.
        ("dino", {"backbone": {"name": "test_vit"}, "data": {"image_size": 128},
                  "method": {"local_crops_number": 2, "local_crops_size": 64,
                             "out_dim": 256}}),
    ],
)  # fmt: skip
def test_activation_fit_predicts_the_saved_tensors_at_full_size(
    method: str, overrides: dict[str, Any]
) -> None:
    """The fit made at shrunk views predicts what a full-size step really keeps."""
    tr = _trainer(method, overrides)
    fit = memory.activation_fit(tr)
    full = [v.size for v in expand(tr.method.views())]
    assert max(full) > 64 and "scaled linearly" in fit["how"]  # the small-size path ran
    b = 6
    predicted = fit["constant"] + b * (fit["per_image"] + fit["per_unit"] * fit["units_full"])
    real = memory.saved_bytes(tr, b, full)
    assert predicted == pytest.approx(real, rel=0.03)


def test_grad_checkpointing_lowers_the_estimate_and_is_set_on_every_encoder() -> None:
    base = {"backbone": {"name": "test_vit"}, "data": {"image_size": 96},
            "method": {"mlp_dim": 64}}  # fmt: skip
    plain = _trainer("moco-v3", base)
    ckpt = _trainer("moco-v3", {**base, "trainer": {"grad_checkpointing": True}})
    encoders = [m for m in ckpt.method.modules() if hasattr(m, "sslcli_spec")]
    assert len(encoders) == 2 and all(m.grad_checkpointing for m in encoders)
    a = memory.estimate_memory(plain)["activations"]
    c = memory.estimate_memory(ckpt)["activations"]
    assert 0 < c < a


def test_grad_checkpointing_gives_the_same_step(tmp_path: Path) -> None:
    """Checkpointing recomputes, it does not change the result."""

    def run(flag: bool) -> dict[str, torch.Tensor]:
        mc, run_cfg, mcfg = api.resolve_config("simclr", overrides={
            "backbone": {"name": "test_vit"}, "data": {"image_size": 16},
            "trainer": {"epochs": 1, "batch_size": 8, "max_steps": 1, "eval_knn": False,
                        "grad_checkpointing": flag, "out": str(tmp_path / str(flag))},
        })  # fmt: skip
        tr = Trainer(run_cfg, mc, mcfg)
        tr.fit()
        return {k: v.clone() for k, v in tr.method.state_dict().items()}

    a, b = run(False), run(True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_warning_names_the_device_and_says_why_accumulation_cannot_help() -> None:
    mem = {"exceeds_device": True, "total": 200 * 2**30, "device_memory": 80 * 2**30,
           "device_name": "A100", "per_process_batch": 4096}  # fmt: skip
    line = memory.memory_warning(mem)
    assert line is not None and "A100" in line and "negatives" in line
    assert memory.memory_warning({**mem, "exceeds_device": False}) is None


def test_dry_run_of_a_resume_checks_it_and_allows_checkpointing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["train", "simclr", "--backbone", "test_resnet", "--batch-size", "8",
                 "--set", "trainer.max_steps=1", "--set", "trainer.eval_knn=false",
                 "--out", "r"]) == 0  # fmt: skip
    capsys.readouterr()
    code, plan, err = _dry(capsys, "--resume", "r", "--no-memory",
                           "--set", "trainer.grad_checkpointing=true")  # fmt: skip
    assert code == 0, err
    assert plan["trainer"]["resume_from_step"] == 1 and plan["trainer"]["grad_checkpointing"]
    code, _, err = _dry(capsys, "--resume", "r", "--backbone", "resnet18")
    assert code == 2 and "architecture differs in backbone.name" in err
