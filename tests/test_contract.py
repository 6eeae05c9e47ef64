"""The same contract for every registered method (built-ins and installed plugins).

One CPU training step; every trainable parameter receives a gradient; state survives
checkpoint -> resume exactly; the exported encoder loads in plain timm.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sslcli import api, registry
from sslcli.config import deep_merge
from sslcli.engine.trainer import Trainer
from tests.conftest import TINY

METHODS = sorted(registry.find())
VIT_AWARE = {"moco-v3", "dino"}
# Methods whose heavy official defaults are shrunk so one CPU step stays fast; the code path
# is the same, only widths/queue lengths differ.
SMALL: dict[str, list[str]] = {
    "moco-v1": ["method.queue_size=64"],
    "moco-v2": ["method.queue_size=64"],
    "instdisc": ["method.nce_k=32"],
    "cmc": ["method.nce_k=32"],
    "dino": ["method.out_dim=512"],
    "swav": ["method.num_prototypes=30", "method.queue_length=0"],
}


def _overrides(name: str, tmp: Path, **trainer: Any) -> dict[str, Any]:
    o = deep_merge(TINY, {"trainer": {"out": str(tmp), "log_every": 1, **trainer}})
    return o


def _sets(name: str) -> list[str]:
    cls = registry.load(name)
    fields = cls.Config.model_fields
    return [s for s in SMALL.get(name, []) if s.split(".")[1].split("=")[0] in fields]


def _trainer(name: str, tmp: Path, backbone: str = "test_resnet", **trainer: Any) -> Trainer:
    o = _overrides(name, tmp, **trainer)
    o["backbone"] = {"name": backbone}
    method_cls, run, mcfg = api.resolve_config(name, overrides=o, sets=_sets(name))
    return Trainer(run, method_cls, mcfg)


def _first_batch(tr: Trainer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return next(iter(tr._batches(0, 0)))


@pytest.mark.parametrize("name", METHODS)
def test_method_loads_and_describes_itself(name: str) -> None:
    cls = registry.load(name)
    assert cls.name == name
    assert cls.summary(), f"{name} needs a one-line docstring summary"
    for key, field in cls.Config.model_fields.items():
        assert field.description, f"{name}.Config.{key} has no description"


@pytest.mark.parametrize("name", METHODS)
def test_one_step_every_parameter_gets_a_gradient(name: str, tmp_path: Path) -> None:
    backbones = ["test_resnet"] + (["test_vit"] if name in VIT_AWARE else [])
    for backbone in backbones:
        tr = _trainer(name, tmp_path / backbone, backbone=backbone)
        images, labels, index = _first_batch(tr)
        before = {k: v.clone() for k, v in tr.method.state_dict().items()}
        # Look at the gradients right after backward, before the method's hook: SwAV and
        # DINO deliberately drop some (frozen prototypes / last layer) in their first epoch.
        seen: dict[str, bool] = {}
        hook = tr.method.before_optimizer_step

        def spy(
            step: Any, tr: Trainer = tr, seen: dict[str, bool] = seen, hook: Any = hook
        ) -> None:
            for n, p in tr.method.named_parameters():
                if p.requires_grad:
                    seen[n] = p.grad is not None
            hook(step)

        tr.method.before_optimizer_step = spy  # type: ignore[method-assign]
        out, ok = tr.train_step(images, labels, index)
        assert ok and torch.isfinite(out.loss), f"{name}/{backbone}: loss {out.loss}"
        assert seen, f"{name}/{backbone}: before_optimizer_step was never called"
        missing = [n for n, has in seen.items() if not has]
        assert not missing, f"{name}/{backbone}: no gradient for {missing[:5]}"
        after = tr.method.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert changed, f"{name}/{backbone}: a training step changed nothing"


@pytest.mark.parametrize("name", METHODS)
def test_resume_reproduces_the_next_steps(name: str, tmp_path: Path) -> None:
    """2 steps in one go == 1 step, checkpoint, resume, 1 step (weights and logged loss)."""
    sets = _sets(name)
    full = api.train(name, overrides=_overrides(name, tmp_path / "full", max_steps=2), sets=sets)
    half = api.train(name, overrides=_overrides(name, tmp_path / "half", max_steps=1), sets=sets)
    resumed = api.train(
        name, overrides={"trainer": {"max_steps": 2}}, sets=sets, resume=half.run_dir
    )
    assert resumed.steps == full.steps == 2

    def losses(run_dir: Path) -> list[float]:
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r and "event" not in r]

    assert losses(full.run_dir) == losses(half.run_dir)
    from sslcli.engine import checkpoint as ckpt

    a, _ = ckpt.load(full.run_dir)
    b, _ = ckpt.load(resumed.run_dir)
    assert a["model"].keys() == b["model"].keys()
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not diff, f"{name}: resumed weights differ in {diff[:5]}"
    for k in a["optim"]:
        assert torch.equal(a["optim"][k], b["optim"][k]), f"{name}: optimizer state {k} differs"


@pytest.mark.parametrize("name", METHODS)
def test_export_candidates_load_in_plain_timm(name: str, tmp_path: Path) -> None:
    """Every exportable encoder's weights load strictly into timm's own model."""
    import timm

    o = _overrides(name, tmp_path)
    o["backbone"] = {"name": "test_resnet", "small_stem": False}
    method_cls, run, mcfg = api.resolve_config(name, overrides=o, sets=_sets(name))
    tr = Trainer(run, method_cls, mcfg)
    cands = tr.method.export_candidates()
    assert cands, f"{name} exports nothing"
    assert hasattr(next(iter(cands.values())), "sslcli_spec"), f"{name}: default not timm"
    for which, enc in cands.items():
        if not hasattr(enc, "sslcli_spec"):
            continue  # evaluation-only (InstDisc's unit embedding): `ssl export` refuses it
        spec = enc.sslcli_spec
        kwargs = dict(spec.kwargs)
        # CMC's encoders see 1 (L) or 2 (ab) channels: take it from the first conv.
        first_conv = next(m for m in enc.modules() if isinstance(m, torch.nn.Conv2d))
        kwargs["in_chans"] = first_conv.in_channels
        plain = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, **kwargs)
        state = copy.deepcopy(enc.state_dict())
        plain.load_state_dict(state, strict=True)
        x = torch.randn(2, kwargs["in_chans"], 16, 16)
        enc.eval()
        plain.eval()
        # Equal up to float rounding: CPC computes its 1×1-map convolutions as matrix
        # products (sslcli.nn.tiny_maps), the same function summed in another order.
        torch.testing.assert_close(enc(x), plain(x), msg=f"{name}/{which}: features differ")
