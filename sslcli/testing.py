"""The method contract as a test kit: the checks every built-in method passes, for any method.

In a plugin's own test suite (needs pytest)::

    from sslcli.testing import MethodContract

    class TestBarlowTwins(MethodContract):
        method = "barlow-twins"
        sets = ["method.proj_dim=64"]          # shrink official widths for a CPU step

pytest then runs, on CPU with a tiny backbone and image size:

* ``test_loads_and_describes_itself``: the plugin loads through the registry (class,
  name, hook signatures, Config defaults and recipe validate for a convnet and a ViT),
  has a one-line summary and a description for every option, and the run config with
  ``sets`` validates;
* ``test_one_step``: one training step gives a finite loss, every trainable parameter a
  gradient, and changes every buffer except those declared in ``static_buffers``
  (which must stay as they are);
* ``test_resume_is_bit_exact``: two steps in one go == one step, checkpoint, resume, one
  step: logged losses, weights and optimiser state bit-identical;
* ``test_export_loads_in_plain_timm``: ``ssl export`` of a trained run loads strictly
  into plain timm (``local-dir:``) with the exported encoder's features, and
  ``sslcli.load_timm`` of it gives exactly what ``method.embed`` gives;
* ``test_two_processes_equal_one`` (marked ``slow``; ``distributed = False`` skips it):
  two gloo processes with batch B each == one process with 2B, with views that have no
  random parameters (sizes and counts as the method's own), synchronised BatchNorm and
  plain SGD at a small lr: losses and weight updates after a few steps agree to float
  rounding.

Every check is also a plain function (``check_one_step(case, tmp_path)`` ...) taking a
:class:`ContractCase`, for suites that do not use test classes.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from sslcli import api, registry
from sslcli.config import deep_merge
from sslcli.data.views import ViewSpec, expand
from sslcli.method import Method

try:  # the pytest class needs pytest; the check functions do not
    import pytest
except ImportError:  # pragma: no cover - pytest is how this module is meant to be used
    pytest = None  # type: ignore[assignment]


@dataclass(frozen=True)
class ContractCase:
    """One method under test and how to make it small enough for a CPU step."""

    method: str
    """Registered name (or PACKAGE:METHOD)."""
    sets: tuple[str, ...] = ()
    """``--set`` overrides, e.g. ``("method.queue_size=64",)``: smaller widths, same code."""
    backbones: tuple[str, ...] = ("test_resnet",)
    """Tiny timm networks to run the one-step check on (add ``test_vit`` for ViT paths)."""
    static_buffers: tuple[str, ...] = ()
    """fnmatch patterns of buffers a training step must leave unchanged (constant tables,
    queues that only fill after a warm-up); every other buffer must change."""
    distributed: bool = True
    """Whether two processes must equal one (a method that draws random numbers inside
    its step, e.g. noise samples, cannot match across process counts)."""
    image_size: int = 16
    batch_size: int = 8
    dist_update_share: float = 2e-2
    """How far (as a share of the largest parameter update) two processes' weight updates
    may differ from one process's. Raise it only with evidence that float32 rounding alone
    reaches it: the same run in float64 has two processes equal one, and one float32
    process differs from its float64 twin by about as much (SwAV's Sinkhorn)."""

    def overrides(self, out: Path, **trainer: Any) -> dict[str, Any]:
        base = {
            "backbone": {"name": self.backbones[0]},
            "data": {"image_size": self.image_size},
            "trainer": {"epochs": 1, "batch_size": self.batch_size, "max_steps": 2,
                        "eval_knn": False, "log_every": 1, "out": str(out), "device": "cpu"},
        }  # fmt: skip
        return deep_merge(base, {"trainer": trainer})


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------


def check_loads_and_describes_itself(case: ContractCase, tmp_path: Path) -> None:
    cls = registry.load(case.method)  # validates class, hooks, defaults and recipes
    assert cls.summary(), f"{cls.name} needs a one-line docstring summary"
    for key, f in cls.Config.model_fields.items():
        assert f.description, f"{cls.name}.Config.{key} has no Field(description=...)"
    for backbone in case.backbones:
        o = case.overrides(tmp_path)
        o["backbone"] = {"name": backbone}
        api.resolve_config(case.method, overrides=o, sets=list(case.sets))


def make_trainer(
    case: ContractCase, tmp: Path, backbone: str = "test_resnet", **trainer: Any
) -> Any:
    """A ``Trainer`` of the case's method on its tiny data, writing under ``tmp``."""
    from sslcli.engine.trainer import Trainer

    o = case.overrides(tmp, **trainer)
    o["backbone"] = {"name": backbone}
    method_cls, run, mcfg = api.resolve_config(case.method, overrides=o, sets=list(case.sets))
    return Trainer(run, method_cls, mcfg)


def check_one_step(case: ContractCase, tmp_path: Path) -> None:
    for backbone in case.backbones:
        tr = make_trainer(case, tmp_path / backbone, backbone)
        images, labels, index = next(iter(tr.batches.epoch(0, 0)))
        buffers_before = {n: b.clone() for n, b in tr.method.named_buffers()}
        # Gradients right after backward, before the method's hook may drop some on
        # purpose (SwAV's prototypes and DINO's last layer are frozen in their first epoch).
        seen: dict[str, bool] = {}
        hook = tr.method.before_optimizer_step

        def spy(step: Any, tr: Any = tr, seen: dict[str, bool] = seen, hook: Any = hook) -> None:
            for n, p in tr.method.named_parameters():
                if p.requires_grad:
                    seen[n] = p.grad is not None
            hook(step)

        tr.method.before_optimizer_step = spy
        out, ok = tr.train_step(images, labels, index)
        where = f"{case.method}/{backbone}"
        assert ok and torch.isfinite(out.loss), f"{where}: loss {out.loss}"
        assert seen, f"{where}: before_optimizer_step was never called"
        missing = [n for n, has in seen.items() if not has]
        assert not missing, f"{where}: no gradient for {missing[:5]}"
        after = dict(tr.method.named_buffers())
        static = [n for n in after if any(fnmatch.fnmatch(n, p) for p in case.static_buffers)]
        moved = [n for n in static if not torch.equal(buffers_before[n], after[n])]
        assert not moved, f"{where}: buffers declared static changed: {moved[:5]}"
        still = [
            n for n in after if n not in static and torch.equal(buffers_before[n], after[n])
        ]
        assert not still, (
            f"{where}: a step left the buffers {still[:5]} unchanged; declare them in "
            "static_buffers if that is intended"
        )
        tr.close()


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r and "event" not in r]


def check_resume_is_bit_exact(case: ContractCase, tmp_path: Path) -> None:
    """2 steps in one go == 1 step, checkpoint, resume, 1 step (weights, optimiser, log)."""
    from sslcli.runs import checkpoint as ckpt

    sets = list(case.sets)
    full = api.train(case.method, overrides=case.overrides(tmp_path / "full"), sets=sets)
    half = api.train(
        case.method, overrides=case.overrides(tmp_path / "half", max_steps=1), sets=sets
    )
    resumed = api.train(
        case.method, overrides={"trainer": {"max_steps": 2}}, sets=sets, resume=half.run_dir
    )
    assert resumed.steps == full.steps == 2
    assert _losses(full.run_dir) == _losses(half.run_dir), "logged losses differ after resume"
    a, _ = ckpt.load(full.run_dir)
    b, _ = ckpt.load(resumed.run_dir)
    assert a["model"].keys() == b["model"].keys()
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not diff, f"{case.method}: resumed weights differ in {diff[:5]}"
    assert a["optim"].keys() == b["optim"].keys()
    diff = [k for k in a["optim"] if not torch.equal(a["optim"][k], b["optim"][k])]
    assert not diff, f"{case.method}: resumed optimiser state differs in {diff[:5]}"


def check_export_loads_in_plain_timm(case: ContractCase, tmp_path: Path) -> None:
    """The export of a trained run: plain timm loads it strictly and computes the exported
    encoder's features; ``sslcli.load_timm`` of it computes ``method.embed``."""
    import timm

    from sslcli.runs.export import load_timm
    from sslcli.runs.targets import load_target

    size = max(32, case.image_size)  # the ImageNet stem, so plain timm needs no help
    o = case.overrides(tmp_path / "run", max_steps=1)
    o["backbone"] = {"name": case.backbones[0], "small_stem": False}
    o["data"] = {"image_size": size}
    run = api.train(case.method, overrides=o, sets=list(case.sets))
    target = load_target(run.run_dir)
    method = target.method
    assert method is not None
    method.eval()
    for which, encoder in method.export_candidates().items():
        if not hasattr(encoder, "sslcli_spec"):
            continue  # evaluation-only (InstDisc's unit embedding): `ssl export` refuses it
        out = tmp_path / f"export-{which}"
        api.export(run.run_dir, out, which=which)
        plain = timm.create_model(f"local-dir:{out}", pretrained=True, num_classes=0).eval()
        first = next(m for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, first.in_channels, size, size, generator=g)
        encoder.eval()
        with torch.no_grad():
            # Equal up to float rounding: an encoder may compute the same function in
            # another order (CPC's 1x1-map convolutions as matrix products).
            torch.testing.assert_close(
                plain(x), encoder(x), msg=f"{case.method}/{which}: plain timm differs"
            )
        if which == target.default_which:
            rgb = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                torch.testing.assert_close(
                    load_timm(out).eval()(rgb),
                    method.embed(rgb),
                    msg=f"{case.method}: load_timm(export) differs from method.embed",
                )


# -- two processes == one -----------------------------------------------------------------------


def still_views(specs: list[ViewSpec]) -> list[ViewSpec]:
    """The same views (order, sizes, normalisation) without random parameters, so
    processes cannot differ in what they draw: whole-image crops, no colour change, and
    every second view flipped, so the views of an image still differ."""
    return [
        s.model_copy(update=dict(count=1, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                 flip_p=float(i % 2), jitter_p=0.0, grayscale_p=0.0,
                                 blur_p=0.0, solarize_p=0.0))
        for i, s in enumerate(expand(specs))
    ]  # fmt: skip


def _still(cls: type[Method]) -> type[Method]:
    def views(self: Method) -> list[ViewSpec]:
        return still_views(cls.views(self))

    return type(cls.__name__, (cls,), {"views": views, "__module__": cls.__module__})


DIST_STEPS = 3
# Why so small an lr: plain SGD moves a weight that a normalisation follows (BN, or the
# L2 norm of an embedding) by about lr/|w|^2 of its size, and SimCLR's head starts at
# N(0, 0.01^2). At lr 0.02 the loss of SimCLR v2 rises at step 2 and float32 rounding
# (1e-7) grows into the result: one process in float32 against the same run in float64,
# from the same initial weights, differs by 4e-3 (SimCLR v2) and 1.4e-4 (InvaSpread) in
# the third loss, while two processes equal one to 1e-13 in float64. At lr 1e-3 those
# float32 runs stay within 2e-6 of float64 (losses) and 3e-7 (weights), so the
# tolerances below separate rounding from a method that mishandles the global batch.
DIST_LR = 1e-3
DIST_UPDATE_ATOL = 2e-6
"""Floor of the absolute tolerance on the weight updates (rounding: about 3e-7 for most
methods); the parameters must move by ten times it (SimSiam's move least, 7e-5)."""



def _dist_overrides(case: ContractCase, out: Path, batch: int) -> dict[str, Any]:
    return case.overrides(
        out, batch_size=batch, max_steps=DIST_STEPS
    ) | {
        # Plain SGD with a constant lr: nothing depends on an optimiser or lr schedule
        # that could count processes.
        "optim": {"name": "sgd", "lr": DIST_LR, "lr_scaling": "none", "weight_decay": 0.0,
                  "momentum": 0.0},
        "schedule": {"kind": "constant", "warmup_epochs": 0},
    }  # fmt: skip


def _dist_trainer(case: ContractCase, out: Path, batch: int, sync_bn: bool) -> Any:
    from sslcli.engine.trainer import Trainer

    method_cls, run, mcfg = api.resolve_config(
        case.method, overrides=_dist_overrides(case, out, batch), sets=list(case.sets)
    )
    run.trainer.sync_bn = sync_bn
    return Trainer(run, _still(method_cls), mcfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist_worker(rank: int, world: int, port: int, case: ContractCase, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
    )  # fmt: skip
    torch.set_num_threads(1)
    _dist_trainer(case, Path(out), case.batch_size * world, sync_bn=True).fit()


def check_two_processes_equal_one(case: ContractCase, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from sslcli.runs import checkpoint as ckpt

    one = _dist_trainer(case, tmp_path / "one", case.batch_size * 2, sync_bn=False)
    init = {k: v.clone() for k, v in one.method.state_dict().items()}
    one.fit()
    mp.spawn(
        _dist_worker, args=(2, _free_port(), case, str(tmp_path / "two")), nprocs=2, join=True
    )
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == DIST_STEPS
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-4, atol=1e-5)
    a, _ = ckpt.load(tmp_path / "one")
    b, meta = ckpt.load(tmp_path / "two")
    assert meta["world_size"] == 2
    params = {n for n, _ in one.method.named_parameters()}
    moved = max(float((a["model"][k].float() - init[k].float()).abs().max()) for k in params)
    assert moved > 10 * DIST_UPDATE_ATOL, (
        f"the weights hardly moved ({moved:.2e}): the comparison would prove nothing"
    )
    # The updates (not the weights: at this lr they are small next to the weights) agree
    # to rounding; a method that mishandles the global batch (local negatives, local
    # statistics, a gradient lost across processes) is off by a fraction of an update.
    for k in a["model"]:
        if not init[k].is_floating_point():
            continue
        torch.testing.assert_close(
            b["model"][k].double() - init[k].double(), a["model"][k].double() - init[k].double(),
            rtol=1e-2, atol=max(DIST_UPDATE_ATOL, case.dist_update_share * moved),
            msg=lambda m, k=k: f"{case.method}: {k}: {m}",
        )


# ---------------------------------------------------------------------------------------------
# The pytest class
# ---------------------------------------------------------------------------------------------

if pytest is not None:

    class MethodContract:
        """Subclass it with ``method = "NAME"`` (and optionally the other
        :class:`ContractCase` fields as class attributes) to run the contract on NAME.
        To run it over several methods, override the ``contract_case`` fixture with a
        parametrised one returning :class:`ContractCase` objects."""

        method: ClassVar[str] = ""
        sets: ClassVar[tuple[str, ...] | list[str]] = ()
        backbones: ClassVar[tuple[str, ...]] = ("test_resnet",)
        static_buffers: ClassVar[tuple[str, ...]] = ()
        distributed: ClassVar[bool] = True
        dist_update_share: ClassVar[float] = 2e-2

        @pytest.fixture
        def contract_case(self) -> ContractCase:
            if not self.method:
                pytest.skip("set `method = NAME` in the MethodContract subclass")
            return ContractCase(
                self.method, tuple(self.sets), tuple(self.backbones),
                tuple(self.static_buffers), self.distributed,
                dist_update_share=self.dist_update_share,
            )  # fmt: skip

        def test_loads_and_describes_itself(
            self, contract_case: ContractCase, tmp_path: Path
        ) -> None:
            check_loads_and_describes_itself(contract_case, tmp_path)

        def test_one_step(self, contract_case: ContractCase, tmp_path: Path) -> None:
            check_one_step(contract_case, tmp_path)

        def test_resume_is_bit_exact(self, contract_case: ContractCase, tmp_path: Path) -> None:
            check_resume_is_bit_exact(contract_case, tmp_path)

        def test_export_loads_in_plain_timm(
            self, contract_case: ContractCase, tmp_path: Path
        ) -> None:
            check_export_loads_in_plain_timm(contract_case, tmp_path)

        @pytest.mark.slow
        def test_two_processes_equal_one(
            self, contract_case: ContractCase, tmp_path: Path
        ) -> None:
            if not contract_case.distributed:
                pytest.skip(f"{contract_case.method} declares distributed = False")
            check_two_processes_equal_one(contract_case, tmp_path)


__all__ = [
    "ContractCase",
    "MethodContract",
    "check_export_loads_in_plain_timm",
    "check_loads_and_describes_itself",
    "check_one_step",
    "check_resume_is_bit_exact",
    "check_two_processes_equal_one",
    "still_views",
]
