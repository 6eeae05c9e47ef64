"""What would break or stall the first GPU runs, checked on CPU.

* No hidden host sync: a training step of every registered method, under a guard that
  counts the Tensor operations that sync on a GPU, makes exactly the engine's one
  accounted sync (the agreed finiteness check).
* Log lines copy host-side values to the device in one transfer.
* ``--compile``: checkpoints hold plain parameter names (a compiled run resumes without
  ``--compile`` and vice versa); a compiler failure at the first forward falls back to
  eager execution in one line; under DDP the wrapper is what gets compiled.
* The previous step's gradients are freed before the forward; cuDNN benchmark on CUDA;
  optimiser state keeps channels_last after a resume; LARS and per-tensor clipping run
  a fixed number of kernels whatever the number of tensors, with unchanged numerics.
* Two processes (gloo): random initial buffers (MoCo's queue, memory banks, the probe)
  are rank 0's everywhere, and the kNN monitor is computed by both processes, each
  encoding half, with the one-process result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as tdist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sslcli import api
from sslcli.engine.grad_guard import clip_gradients
from sslcli.engine.logger import window_means
from sslcli.engine.sync_guard import HostSyncGuard
from sslcli.engine.trainer import Trainer
from sslcli.nn import dist
from sslcli.optim import LARS
from sslcli.runs import checkpoint as ckpt
from sslcli.runtime import configure_backends
from sslcli.testing import make_trainer
from tests.helpers import METHODS, spawn, torchrun_env, write_idx
from tests.helpers import contract_case as case


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_idx(tmp_path_factory.mktemp("idx"), n_train=40)


def _run(data: Path, out: Path, **trainer: Any) -> Trainer:
    o = {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": str(data), "image_size": 16, "num_workers": 0},
        "trainer": {"epochs": 1, "batch_size": 8, "max_steps": 2, "log_every": 1,
                    "eval_knn": False, "out": str(out), **trainer},
    }  # fmt: skip
    method_cls, run, mcfg = api.resolve_config("simclr", overrides=o)
    return Trainer(run, method_cls, mcfg)


# --------------------------------------------------------------------------------------------
# Host syncs
# --------------------------------------------------------------------------------------------


def test_the_guard_sees_every_kind_of_sync() -> None:
    x = torch.arange(4.0)
    with HostSyncGuard() as g:
        x.sum().item()
        x.tolist()
        bool(x[0] > 1)
        _ = x[x > 1]
        torch.tensor([1.0, 2.0], device=x.device)
        x.cpu()
    kinds = [c.kind for c in g.calls]
    assert kinds == ["item", "tolist", "__bool__", "bool-mask index", "h2d tensor", "cpu"]
    assert all(c.site == "test_the_guard_sees_every_kind_of_sync" for c in g.calls)
    assert x.sum().item() == 6.0  # unpatched again


@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_makes_only_the_engine_sync(name: str, tmp_path: Path) -> None:
    """The whole per-step path of the loop (schedules, step, recording the logs) of a
    step after the first (the first may set things up once: cached constants)."""
    tr = make_trainer(case(name), tmp_path)
    batches = iter(tr.batches.epoch(0, 0))
    for _ in range(2):
        images, labels, index = next(batches)
        with HostSyncGuard() as g:
            tr.schedule.apply(tr.optimizer, tr.step)
            out, ok = tr.train_step(images, labels, index)
            tr.window.add(out)
        assert ok
        tr.step += 1
    assert not g.unexpected(), f"{name}: hidden host syncs: {g.summary()}"
    assert g.engine_syncs() == 1, g.summary()


def test_log_line_copies_host_values_to_the_device_once(monkeypatch: pytest.MonkeyPatch) -> None:
    meta = torch.device("meta")
    pending = {
        "loss": [torch.ones((), device=meta) for _ in range(3)],
        "temperature": [torch.tensor(0.1), torch.tensor(0.2), torch.tensor(0.3)],
        "momentum": [torch.tensor(0.99)] * 3,
    }
    copies: list[torch.device] = []
    orig = torch.Tensor.to

    def spy(self: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        res = orig(self, *a, **k)
        if self.device.type == "cpu" and res.device.type == "meta":
            copies.append(res.device)
        return res

    monkeypatch.setattr(torch.Tensor, "to", spy)
    means = window_means(pending, meta)
    assert means.shape == (3,) and means.device == meta
    assert len(copies) == 1
    # on the host, the values and their order (sorted keys) are those of per-key means
    cpu = {k: [v if v.device.type == "cpu" else torch.ones(()) for v in vs]
           for k, vs in pending.items()}  # fmt: skip
    got = window_means(cpu, torch.device("cpu"))
    want = torch.stack([torch.stack(cpu[k]).mean() for k in sorted(cpu)])
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------
# --compile
# --------------------------------------------------------------------------------------------


def _compile_with(monkeypatch: pytest.MonkeyPatch, backend: Any) -> None:
    orig = torch.compile

    def compile_(model: Any, **kw: Any) -> Any:
        return orig(model, backend=backend, **kw)

    monkeypatch.setattr(torch, "compile", compile_)


def test_compiled_run_checkpoints_plain_keys_and_resumes_either_way(
    idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch._dynamo.reset()
    _compile_with(monkeypatch, "eager")
    tr = _run(idx_data, tmp_path / "c", compile=True)
    assert tr.forward.model is not tr.method  # the step calls the compiled module
    tr.fit()
    groups, _ = ckpt.load(tmp_path / "c")
    assert not [k for k in groups["model"] if "_orig_mod" in k]
    assert set(groups["model"]) == set(tr.method.state_dict())
    # resumed without --compile, and a plain run resumed with it
    more = {"max_steps": 3}
    method_cls, run, mcfg = api.resolve_config("simclr", resume=tmp_path / "c",
                                               overrides={"trainer": more})  # fmt: skip
    run.trainer.compile = False
    Trainer(run, method_cls, mcfg, resume=tmp_path / "c").fit()
    plain = _run(idx_data, tmp_path / "p")
    plain.fit()
    method_cls, run, mcfg = api.resolve_config("simclr", resume=tmp_path / "p",
                                               overrides={"trainer": more})  # fmt: skip
    run.trainer.compile = True
    assert Trainer(run, method_cls, mcfg, resume=tmp_path / "p").fit().steps == 3


def test_compiler_failure_at_the_first_forward_falls_back_to_eager(
    idx_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    torch._dynamo.reset()

    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("no C++ compiler found\nsecond line")

    _compile_with(monkeypatch, broken)
    ref = _run(idx_data, tmp_path / "ref")
    ref.fit()
    tr = _run(idx_data, tmp_path / "c", compile=True)
    res = tr.fit()
    assert res.steps == 2 and tr.forward.model is tr.method
    err = capsys.readouterr().err
    assert "torch.compile failed at the first step" in err and "no C++ compiler" in err
    assert "second line" not in err
    # the failed attempt left no trace: the run equals one without --compile
    a, _ = ckpt.load(tmp_path / "ref")
    b, _ = ckpt.load(tmp_path / "c")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# --------------------------------------------------------------------------------------------
# Memory and kernels
# --------------------------------------------------------------------------------------------


def test_previous_gradients_are_freed_before_the_forward(idx_data: Path, tmp_path: Path) -> None:
    tr = _run(idx_data, tmp_path / "r")
    held: list[int] = []

    def pre(module: nn.Module, args: Any) -> None:
        held.append(sum(p.grad is not None for p in module.parameters()))

    tr.method.register_forward_pre_hook(pre)
    tr.fit()
    assert held == [0, 0]


def test_cudnn_benchmark_is_set_for_cuda_only() -> None:
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        configure_backends(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False
        configure_backends(torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.parametrize("optim", ["sgd", "lars"])
def test_optimizer_state_keeps_channels_last_after_resume(
    idx_data: Path, tmp_path: Path, optim: str
) -> None:
    o = {"backbone": {"name": "test_resnet"},
         "data": {"dataset": str(idx_data), "image_size": 16, "num_workers": 0},
         "optim": {"name": optim},
         "trainer": {"epochs": 1, "batch_size": 8, "max_steps": 1, "eval_knn": False,
                     "channels_last": True, "out": str(tmp_path / "r")}}  # fmt: skip
    method_cls, run, mcfg = api.resolve_config("simclr", overrides=o)
    Trainer(run, method_cls, mcfg).fit()
    method_cls, run, mcfg = api.resolve_config(
        "simclr", resume=tmp_path / "r", overrides={"trainer": {"max_steps": 2}}
    )
    tr = Trainer(run, method_cls, mcfg, resume=tmp_path / "r")
    tr.load_checkpoint(tr.resume_path)  # type: ignore[arg-type]
    convs = [p for p in tr.method.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    for p in convs:
        buf = tr.optimizer.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride()


class _OpCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.n += 1
        return func(*args, **(kwargs or {}))


def _params(n: int, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(3 + i % 4, 5, generator=g)) for i in range(n)]
    ps[0].data.zero_()  # a zero-norm weight: trust ratio 1
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    ps[1].grad.zero_()  # a zero-norm gradient: trust ratio 1
    return ps


class _PerTensorLARS(LARS):
    """The previous LARS step: trust ratios one tensor at a time (the reference)."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            grads = [p.grad for p in params]
            wd, eta, mom = group["weight_decay"], group["eta"], group["momentum"]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            w_norms = torch._foreach_norm(params)
            g_norms = torch._foreach_norm(grads)
            trust = [
                torch.where((w > 0) & (g > 0), eta * w / g, torch.ones_like(w))
                for w, g in zip(w_norms, g_norms, strict=True)
            ]
            grads = torch._foreach_mul(grads, trust)
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.detach().clone()
                else:
                    state["momentum_buffer"].mul_(mom).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])


def test_lars_matches_the_per_tensor_update_bit_for_bit() -> None:
    ps, ref = _params(7), _params(7)
    kw = dict(lr=0.3, momentum=0.9, weight_decay=1e-4, eta=0.02)
    opt, old = LARS([{"params": ps}], **kw), _PerTensorLARS([{"params": ref}], **kw)
    for _ in range(3):
        opt.step()
        old.step()
        for p, r in zip(ps, ref, strict=True):
            assert torch.equal(p, r)


def _lars_ops(n: int) -> int:
    ps = _params(n)
    opt = LARS([{"params": ps}], lr=0.1, weight_decay=1e-4)
    opt.step()  # the first step creates the momentum buffers, one per tensor
    with _OpCount() as c:
        opt.step()
    return c.n


def test_lars_and_per_tensor_clipping_run_a_fixed_number_of_kernels(
    idx_data: Path, tmp_path: Path
) -> None:
    assert _lars_ops(4) == _lars_ops(40)

    tr = _run(idx_data, tmp_path / "r")
    tr.run.optim.grad_clip = 0.5
    tr.run.optim.grad_clip_mode = "per_tensor"
    g = torch.Generator().manual_seed(1)
    for p in tr.method.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 0.1
    grads = [p.grad.clone() for p in tr.method.parameters()]  # type: ignore[union-attr]
    norm = clip_gradients(tr.method, tr.run.optim)
    # the previous per-tensor form of DINO's rule: g *= min(1, clip / (||g|| + 1e-6))
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [torch.clamp(0.5 / (n + 1e-6), max=1.0) for n in norms])
    clipped = 0
    for p, w, n in zip(tr.method.parameters(), grads, norms, strict=True):
        assert torch.equal(p.grad, w)
        clipped += int(n > 0.5)
    assert 0 < clipped < len(grads)  # some tensors clipped, some not
    assert norm is not None and torch.equal(norm, torch.stack(norms).sum())

    def clip_ops(n_layers: int) -> int:
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])
        for p in model.parameters():
            p.grad = torch.randn(p.shape)
        with _OpCount() as c:
            clip_gradients(model, tr.run.optim)
        return c.n

    assert clip_ops(2) == clip_ops(20)


# --------------------------------------------------------------------------------------------
# Two processes
# --------------------------------------------------------------------------------------------


def _two_proc_trainer(name: str, data: str, out: str, **trainer: Any) -> Trainer:
    o = {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": data, "image_size": 16, "num_workers": 0},
        "trainer": {"epochs": 1, "batch_size": 8, "max_steps": 1, "eval_knn": False,
                    "out": out, "device": "cpu", **trainer},
    }  # fmt: skip
    method_cls, run, mcfg = api.resolve_config(name, overrides=o, sets=["method.queue_size=64"])
    return Trainer(run, method_cls, mcfg)


def _embedded_rows(tr: Trainer) -> list[int]:
    rows: list[int] = []
    embed = tr.method.embed

    def spy(x: torch.Tensor) -> torch.Tensor:
        rows.append(int(x.shape[0]))
        return embed(x)

    tr.method.embed = spy  # type: ignore[method-assign]
    return rows


def _ready_worker(rank: int, world: int, port: int, data: str, out: str) -> None:
    torchrun_env(rank, world, port)
    # compiled under DDP: the DDP wrapper is what gets compiled (gradient all-reduces keep
    # overlapping the backward), the method stays plain (recorded, not compiled: the
    # compiler's import alone would double this test's time)
    compiled: list[nn.Module] = []
    torch.compile = lambda m, **kw: compiled.append(m) or m  # type: ignore[assignment]
    tr = _two_proc_trainer("moco-v2", data, f"{out}/moco", compile=True, online_probe=True,
                           eval_knn=True)  # fmt: skip
    assert len(compiled) == 1 and isinstance(compiled[0], nn.parallel.DistributedDataParallel)
    assert compiled[0].module is tr.method
    assert tr.probe is not None
    tensors = {
        **{f"moco.{k}": v for k, v in tr.method.state_dict().items()},
        **{f"probe.{k}": v for k, v in tr.probe.state_dict().items()},
    }
    theirs = dist.all_gather_object({k: v.clone() for k, v in tensors.items()})
    differ = [k for k in tensors if not torch.equal(theirs[0][k], theirs[1][k])]
    assert not differ, f"rank {rank}: differs between processes: {differ[:5]}"

    rows = _embedded_rows(tr)
    acc = tr.knn()
    Path(out, f"rank{rank}.json").write_text(json.dumps({"rows": sum(rows), "acc": acc}))
    tr.close()
    assert not tdist.is_initialized()


def test_two_processes_share_initial_state_and_the_knn_work(tmp_path: Path) -> None:
    """MoCo's queue (a random buffer, like a memory bank) and the probe start as rank 0's on
    both processes; the kNN monitor is computed by both, with the one-process result."""
    data = str(write_idx(tmp_path / "data", n_train=40, n_test=10))
    out = tmp_path / "two"
    out.mkdir()
    spawn(_ready_worker, data, str(out))
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    # 40 reference + 10 query images, half each; only rank 0 reports the number
    assert r0["rows"] == r1["rows"] == 25
    assert r1["acc"] is None
    one = _two_proc_trainer("moco-v2", data, str(tmp_path / "one"), eval_knn=True)
    assert r0["acc"] == pytest.approx(one.knn())


def test_knn_reference_set_is_bounded(idx_data: Path, tmp_path: Path) -> None:
    tr = _run(idx_data, tmp_path / "r", eval_knn=True, knn_max_train=16)
    rows = _embedded_rows(tr)
    calls: list[Any] = []
    import sslcli.engine.knn_monitor as km

    orig = km.knn_correct

    def spy(*a: Any, **k: Any) -> Any:
        calls.append((a[0].shape[0], k.get("device")))
        return orig(*a, **k)

    km.knn_correct = spy  # type: ignore[assignment]
    try:
        acc = tr.knn()
    finally:
        km.knn_correct = orig  # type: ignore[assignment]
    assert acc is not None and 0 <= acc <= 1
    assert sum(rows) == 16 + 10  # 16 of the 40 training images, every test image
    assert calls == [(16, tr.device)]  # searched where the model runs


# --------------------------------------------------------------------------------------------
# The prepared GPU check
# --------------------------------------------------------------------------------------------


def _gpu_check() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_plans_every_method_and_skips_cleanly_without_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gc = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    res = gc.main(["--dry", "--out", str(tmp_path / "dry")])
    saved = json.loads((tmp_path / "dry" / "gpu_check.json").read_text())
    planned = [(s["method"], s["backbone"]) for s in saved["plan"] if s["section"] == "methods"]
    assert {m for m, _ in planned} == set(METHODS)
    assert {m for m, b in planned if b == "vit-s"} == {"moco-v3", "dino"}
    assert all(s["batch_size"] == 256 for s in saved["plan"] if s["section"] == "methods")
    assert [s["section"] for s in saved["plan"][-3:]] == ["compile", "torchrun", "jpeg"]
    kinds = res["dry"]["jpeg_kinds_pil_decoded"]
    assert sorted(kinds) == sorted(gc.JPEG_KINDS)
    # without CUDA the real run says so and stops with a result file, not a traceback
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    res = gc.main([])
    assert res["skipped"] == "no CUDA device"
    assert "no CUDA device" in (tmp_path / "out" / "gpu_check.log").read_text()
    with pytest.raises(SystemExit, match="unknown nope"):
        gc.main(["--dry", "--methods", "simclr,nope", "--out", str(tmp_path / "x")])


@pytest.mark.slow
def test_gpu_check_method_section_runs_on_cpu(tmp_path: Path) -> None:
    """The per-method code of the GPU check, run on the CPU (timings mean nothing here)."""
    gc = _gpu_check()
    res = gc.main(["--cpu-smoke", "--methods", "simclr", "--batch-size", "8", "--steps", "1",
                   "--skip", "compile", "--out", str(tmp_path)])  # fmt: skip
    (m,) = res["methods"]
    assert m["method"] == "simclr" and m["losses_finite"]
    assert m["syncs_per_step"]["guard_engine"] == 1 and not m["syncs_per_step"]["guard_unexpected"]
