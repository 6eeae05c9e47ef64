"""Reliability, promise 4: files stay untrusted.

A checkpoint's or an export's metadata goes through the same validation as user input:
backbone names through ``resolve_name`` (never a ``hf-hub:`` model), constructor
arguments through one allow-list (never ``checkpoint_path`` or anything else that makes
timm open a file), and file names inside the export directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm

from sslcli import api
from sslcli.errors import ConfigError, SSLError
from tests.helpers import TINY, write_fake_export


@pytest.fixture
def timm_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every timm.create_model call; a hub name or a file argument fails the test at once
    (and never reaches the network or the file system)."""
    calls: list[tuple[str, dict[str, Any]]] = []
    real = timm.create_model

    def create_model(name: str, *a: Any, **kw: Any) -> Any:
        calls.append((name, kw))
        assert ":" not in name, f"timm asked to build {name!r}"
        for key in ("checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "file"):
            assert key not in kw, f"timm given {key}={kw[key]!r}"
        return real(name, *a, **kw)

    monkeypatch.setattr(timm, "create_model", create_model)
    return calls


def _checkpoint_meta(**backbone: Any) -> dict[str, Any]:
    _, run, _ = api.resolve_config("simclr", overrides=TINY)
    return {
        "config": run.to_json_dict(),
        "backbone": {"timm_name": "test_resnet", "alias": "test_resnet", "image_size": 16,
                     "small_stem": True, "kwargs": {}, **backbone},
    }  # fmt: skip


def test_checkpoint_backbone_name_is_resolved_not_trusted(timm_calls: Any) -> None:
    from sslcli.runs.rebuild import rebuild_method

    with pytest.raises(SSLError, match="hf-hub:attacker/x"):
        rebuild_method(_checkpoint_meta(timm_name="hf-hub:attacker/x"), {})
    assert not timm_calls


def test_checkpoint_backbone_kwargs_are_allow_listed(tmp_path: Path, timm_calls: Any) -> None:
    from sslcli.runs.rebuild import rebuild_method

    evil = tmp_path / "evil.pth"
    evil.write_bytes(b"\x80\x04not really a pickle")
    meta = _checkpoint_meta(kwargs={"checkpoint_path": str(evil)})
    with pytest.raises(SSLError, match="checkpoint_path"):
        rebuild_method(meta, {})
    assert not timm_calls


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "file"])
def test_config_backbone_kwargs_are_allow_listed(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        api.resolve_config("simclr", sets=[f"backbone.kwargs.{key}=/tmp/x"])


def test_architecture_kwargs_pass_the_allow_list() -> None:
    from sslcli.backbones import FILE_SAFE_KWARGS

    # the harmless shape arguments recipes and exports carry (ViT, SK-ResNet, ResNet)
    for key in ("img_size", "patch_size", "num_heads", "embed_dim", "depth", "mlp_ratio",
                "class_token", "global_pool", "zero_init_last", "stem_type", "stem_width",
                "avg_down", "block_args", "drop_path_rate", "in_chans", "num_classes",
                "dynamic_img_size"):  # fmt: skip
        assert key in FILE_SAFE_KWARGS
    assert not {"checkpoint_path", "pretrained_cfg_overlay", "file", "pretrained"} & (
        FILE_SAFE_KWARGS
    )
    _, run, _ = api.resolve_config("simclr", sets=["backbone.kwargs.zero_init_last=false"])
    assert run.backbone.kwargs == {"zero_init_last": False}


def test_export_architecture_is_resolved(tmp_path: Path, timm_calls: Any) -> None:
    from sslcli.runs.targets import load_target

    exp = write_fake_export(tmp_path / "exp", architecture="hf-hub:attacker/x")
    timm_calls.clear()
    with pytest.raises(SSLError, match="hf-hub:attacker/x"):
        load_target(exp)
    assert not timm_calls


def test_export_model_args_are_allow_listed(tmp_path: Path, timm_calls: Any) -> None:
    from sslcli import load_timm
    from sslcli.runs.targets import load_target

    bad = {"checkpoint_path": str(tmp_path / "x.pth")}
    exp = write_fake_export(tmp_path / "exp", model_args=bad)
    timm_calls.clear()
    with pytest.raises(SSLError, match="checkpoint_path"):
        load_target(exp)
    with pytest.raises(ValueError, match="checkpoint_path"):
        load_timm(exp)
    assert not timm_calls


@pytest.mark.parametrize("name", ["../outside.safetensors", "/abs/outside.safetensors"])
def test_export_companion_file_stays_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    import safetensors.torch

    from sslcli.runs.targets import load_target

    opened: list[str] = []
    real = safetensors.torch.load_file

    def load_file(path: Any, *a: Any, **kw: Any) -> Any:
        opened.append(str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "load_file", load_file)
    outside = tmp_path / "outside.safetensors"
    real_name = name if name.startswith("..") else str(outside)
    pair = {"which": "l", "color_space": "lab", "companion": {
        "which": "ab", "file": real_name, "architecture": "test_resnet", "model_args": {}}}
    exp = write_fake_export(tmp_path / "exp", sslcli={"format": 1, "method": "cmc", "step": 1,
                                             "paired_views": pair})  # fmt: skip
    (exp / "model.safetensors").rename(outside)
    _export_weights_again(exp)
    with pytest.raises(SSLError, match="not a file of"):
        load_target(exp)
    assert not any("outside" in p for p in opened), opened


def _export_weights_again(d: Path) -> None:
    from safetensors.torch import save_file

    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(d / "model.safetensors"))  # fmt: skip
