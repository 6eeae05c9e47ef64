"""SwAV: Sinkhorn-Knopp, the swapped-prediction loss, prototypes, the queue, collapse."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sslcli_plugins.swav import (
    SwAV,
    effective_queue_rows,
    queue_in_use,
    swapped_prediction_loss,
)

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.data.views import expand, local_crop_size
from sslcli.method import Batch, StepInfo
from sslcli.nn.dino_head import multicrop_forward
from sslcli.nn.sinkhorn import sinkhorn_knopp

# -- references written from the paper's formulas -------------------------------------------


def sinkhorn_reference(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """Caron et al. 2020, Sec. 3.1 / App. A.1, with explicit loops over prototypes (rows of
    Q) and samples (columns): Q = exp(CᵀZ/ε) / ΣQ, then alternately rows → 1/K and
    columns → 1/B; the codes are B·Q (each sample's column sums to one)."""
    b, k = scores.shape
    q = [[math.exp(float(scores[i, j]) / eps) for i in range(b)] for j in range(k)]  # K x B
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        for j in range(k):
            r = sum(q[j])
            q[j] = [v / r / k for v in q[j]]
        for i in range(b):
            col = sum(q[j][i] for j in range(k))
            for j in range(k):
                q[j][i] = q[j][i] / col / b
    return np.array([[q[j][i] * b for j in range(k)] for i in range(b)])  # B x K


def swav_loss_reference(
    z: list[torch.Tensor], protos: torch.Tensor, assign: list[int], t: float, eps: float
) -> float:
    """Eq. 2 and 4 with loops: codes of the assigned crops by the reference Sinkhorn, then
    −Σ_k q_k log p_k for every other crop, batch-averaged, /(V−1), averaged over codes."""
    c = protos.double() / protos.double().norm(dim=1, keepdim=True)
    scores = [(zi.double() / zi.double().norm(dim=1, keepdim=True)) @ c.T for zi in z]
    total = 0.0
    for s in assign:
        q = sinkhorn_reference(scores[s].numpy(), eps, 3)
        sub = 0.0
        for v in range(len(z)):
            if v == s:
                continue
            per_sample = []
            for i in range(scores[v].shape[0]):
                row = [float(x) / t for x in scores[v][i]]
                m = max(row)
                log_norm = m + math.log(sum(math.exp(x - m) for x in row))
                per_sample.append(-sum(q[i, k] * (row[k] - log_norm) for k in range(len(row))))
            sub += sum(per_sample) / len(per_sample)
        total += sub / (len(z) - 1)
    return total / len(assign)


# -- Sinkhorn-Knopp ---------------------------------------------------------------------------


def test_sinkhorn_matches_reference_loops() -> None:
    torch.manual_seed(0)
    for b, k, eps, iters in [(6, 4, 0.05, 3), (5, 9, 0.1, 1), (7, 3, 0.5, 10)]:
        s = F.normalize(torch.randn(b, 8), dim=1) @ F.normalize(torch.randn(k, 8), dim=1).T
        got = sinkhorn_knopp(s, eps, iters).double().numpy()
        want = sinkhorn_reference(s.double().numpy(), eps, iters)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_sinkhorn_marginals() -> None:
    torch.manual_seed(1)
    b, k = 16, 5
    s = torch.rand(b, k) * 2 - 1
    q = sinkhorn_knopp(s, 0.05, 3)
    assert q.dtype == torch.float32 and q.shape == (b, k)
    # The last step normalises the samples: each code is a distribution over prototypes.
    torch.testing.assert_close(q.sum(1), torch.ones(b))
    # Many iterations: every prototype also gets exactly B/K samples' worth of mass.
    q = sinkhorn_knopp(s, 0.05, 100)
    torch.testing.assert_close(q.sum(0), torch.full((k,), b / k), atol=1e-3, rtol=1e-4)


def test_sinkhorn_is_stable_and_ignores_gradients_and_autocast() -> None:
    s = torch.randn(8, 6, requires_grad=True)
    q = sinkhorn_knopp(s * 5, 0.01, 3)  # exp(100) would overflow without the max shift
    assert torch.isfinite(q).all() and not q.requires_grad
    torch.testing.assert_close(sinkhorn_knopp(s + 3.0, 0.05), sinkhorn_knopp(s, 0.05))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        qb = sinkhorn_knopp(s.detach().bfloat16(), 0.05)
    assert qb.dtype == torch.float32


_WORKER = """
import os, sys, torch, torch.distributed as tdist
from sslcli.nn.sinkhorn import sinkhorn_knopp
tdist.init_process_group("gloo")
rank, world = tdist.get_rank(), tdist.get_world_size()
scores = torch.load(sys.argv[1])
n = scores.shape[0] // world
torch.save(sinkhorn_knopp(scores[rank * n : (rank + 1) * n], 0.05, 3), sys.argv[2] + str(rank))
tdist.destroy_process_group()
"""


def run_gloo_workers(code: str, world: int, args: list[str]) -> None:
    """Run ``code`` in ``world`` fresh processes joined by a gloo process group (torchrun's
    environment variables); the processes import only what ``code`` imports."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env))
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0] * world, f"workers exited with {codes}"


def test_sinkhorn_across_processes_equals_one_process(tmp_path: Path) -> None:
    """Sums all-reduced over 2 gloo processes give the single-process codes of the whole
    batch (the all-reduce is what makes B the global batch)."""
    torch.manual_seed(2)
    scores = torch.rand(8, 5) * 2 - 1
    torch.save(scores, tmp_path / "scores.pt")
    run_gloo_workers(_WORKER, 2, [str(tmp_path / "scores.pt"), str(tmp_path / "codes")])
    got = torch.cat([torch.load(tmp_path / f"codes{r}") for r in range(2)])
    torch.testing.assert_close(got, sinkhorn_knopp(scores, 0.05, 3))


# -- the loss ----------------------------------------------------------------------------------


def test_swapped_loss_matches_reference() -> None:
    torch.manual_seed(3)
    b, d, k, t, eps = 5, 6, 7, 0.1, 0.05
    z = [torch.randn(b, d) for _ in range(4)]  # 2 global + 2 local crops
    protos = torch.randn(k, d)
    c = F.normalize(protos, dim=1)
    scores = [F.normalize(zi, dim=1) @ c.T for zi in z]
    codes = {s: sinkhorn_knopp(scores[s], eps, 3) for s in (0, 1)}
    got = float(swapped_prediction_loss(scores, codes, t))
    want = swav_loss_reference(z, protos, [0, 1], t, eps)
    assert math.isclose(got, want, rel_tol=1e-5)


def test_swapped_loss_skips_own_crop_and_reaches_every_crop() -> None:
    s = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
    q = torch.softmax(torch.randn(3, 4), dim=1)
    loss = swapped_prediction_loss(s, {0: q}, 0.1)
    loss.backward()
    assert s[0].grad is None  # crop 0 never predicts its own code
    assert s[1].grad is not None and s[1].grad.abs().sum() > 0
    # Uniform codes and uniform predictions: exactly ln K (the collapse value).
    flat = [torch.zeros(3, 4) for _ in range(3)]
    uniform = torch.full((3, 4), 0.25)
    assert math.isclose(
        float(swapped_prediction_loss(flat, {0: uniform}, 0.1)), math.log(4), rel_tol=1e-6
    )


# -- the method --------------------------------------------------------------------------------


def _swav(size: int = 16, backbone: str = "test_resnet", **opts: Any) -> SwAV:
    sets = [
        f"method.{k}={v}"
        for k, v in {"num_prototypes": 10, "proj_hidden_dim": 32, "proj_dim": 16, **opts}.items()
    ]
    cls, _, cfg = api.resolve_config("swav", sets=sets)
    return cls(cfg, make_spec(backbone, size).build())


def _batch(m: SwAV, b: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, s.size, s.size, generator=g) for s in expand(m.views())]
    return Batch(views=views, index=torch.arange(b))


def _info(step: int, spe: int = 4, total: int = 100) -> StepInfo:
    return StepInfo(step=step, epoch=step // spe, total_steps=total, steps_per_epoch=spe)


def test_views_follow_the_multicrop_recipe() -> None:
    m = _swav(size=32, local_crops_number=6)
    g, loc = m.views()
    assert (g.count, g.size, g.scale) == (2, 32, (0.14, 1.0))
    assert (loc.count, loc.size, loc.scale) == (6, 14, (0.05, 0.14))
    assert (g.brightness, g.hue, g.jitter_p, g.grayscale_p, g.blur_p) == (0.8, 0.2, 0.8, 0.2, 0.5)
    assert local_crop_size(224) == 96 and local_crop_size(32) == 14
    assert local_crop_size(32, patch=4) == 12 and local_crop_size(224, patch=16) == 96
    assert _swav(size=32, backbone="test_vit").views()[1].size == 12
    assert len(_swav(local_crops_number=0).views()) == 1


def test_config_rejects_bad_crops_for_assign() -> None:
    from sslcli.errors import ConfigError

    with pytest.raises(ConfigError):
        api.resolve_config("swav", sets=["method.crops_for_assign=[0, 9]"])
    with pytest.raises(ConfigError):
        api.resolve_config(
            "swav", sets=["method.local_crops_number=0", "method.num_global_crops=1"]
        )


def test_prototypes_are_renormalised_at_the_start_of_each_step() -> None:
    m = _swav()
    with torch.no_grad():
        m.prototypes.weight.mul_(torch.rand(10, 1) * 5 + 0.1)
    out = m.training_step(_batch(m), _info(0))
    torch.testing.assert_close(m.prototypes.weight.norm(dim=1), torch.ones(10))
    assert torch.isfinite(out.loss)


def test_projection_head_and_grouped_forward() -> None:
    m = _swav()
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m.projector[0].bias is not None and m.prototypes.bias is None
    calls: list[int] = []
    m.backbone.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    m.training_step(_batch(m, b=4), _info(0))
    assert calls == [2 * 4, 6 * 4]  # one backbone call per resolution


def test_multicrop_forward_keeps_order() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1))
    net.append(torch.nn.Flatten())
    xs = [torch.randn(2, 3, s, s) for s in (8, 8, 4, 4, 8)]
    got = multicrop_forward(net, xs)
    torch.testing.assert_close(got, torch.cat([net(x) for x in xs]))


def test_prototypes_frozen_for_the_first_iterations() -> None:
    m = _swav(freeze_prototypes_iters=3)
    for step, frozen in [(0, True), (2, True), (3, False)]:
        m.zero_grad(set_to_none=True)
        m.training_step(_batch(m), _info(step)).loss.backward()
        assert m.prototypes.weight.grad is not None
        m.before_optimizer_step(_info(step))
        assert (m.prototypes.weight.grad is None) == frozen
        assert m.projector[0].weight.grad is not None


def test_queue_pure_functions() -> None:
    assert effective_queue_rows(3840, 256) == 3840
    assert effective_queue_rows(3840, 4096) == 0  # the batch-4096 recipe has no queue
    assert effective_queue_rows(100, 32) == 96
    # Starts filling at step 10, 3 batches long: used from step 13 on.
    assert [queue_in_use(s, 10, 96, 32) for s in (9, 10, 12, 13, 50)] == [0, 0, 0, 1, 1]
    assert not queue_in_use(100, 0, 0, 32)


def test_queue_fills_newest_first_and_is_used_once_full() -> None:
    b = 4
    m = _swav(queue_length=3 * b, epoch_queue_starts=1, local_crops_number=1)
    m.eval()  # BN in eval: features depend on the batch only, so they can be recomputed
    spe = 2
    embeddings: list[list[torch.Tensor]] = []
    used = []
    for step in range(7):
        batch = _batch(m, b=b, seed=step)
        out = m.training_step(batch, _info(step, spe=spe))
        used.append(out.logs["queue_used"])
        with torch.no_grad():
            z = F.normalize(m.projector(m.backbone(torch.cat(batch.views[:2]))), dim=1)
        embeddings.append(list(z.split(b)))
    # Epoch 1 starts at step 2; 3 batches fill it; from step 5 on it is prefixed.
    assert used == [0, 0, 0, 0, 0, 1, 1]
    # After step 6 the queue holds steps 6, 5, 4 (newest first), per assigned crop.
    for crop in (0, 1):
        want = torch.cat([embeddings[s][crop] for s in (6, 5, 4)])
        torch.testing.assert_close(m.queue[crop], want, atol=1e-5, rtol=1e-5)


def test_queue_rows_enter_sinkhorn_but_codes_keep_the_batch_rows() -> None:
    b = 4
    m = _swav(queue_length=2 * b, epoch_queue_starts=0, local_crops_number=1)
    m.eval()
    with torch.no_grad():
        m.queue.copy_(F.normalize(torch.randn_like(m.queue), dim=-1))
    seen: list[torch.Tensor] = []
    import sslcli_plugins.swav as swav_mod

    real = swav_mod.sinkhorn_knopp

    def spy(s: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
        seen.append(s.clone())
        return real(s, eps, iters)

    swav_mod.sinkhorn_knopp = spy  # type: ignore[assignment]
    try:
        queue_before = m.queue.clone()
        m.training_step(_batch(m, b=b), _info(2, spe=1))
    finally:
        swav_mod.sinkhorn_knopp = real  # type: ignore[assignment]
    assert [s.shape[0] for s in seen] == [3 * b, 3 * b]
    protos = m.prototypes.weight
    torch.testing.assert_close(seen[0][: 2 * b], queue_before[0] @ protos.T)


def test_collapse_flag_and_warning() -> None:
    m = _swav(num_prototypes=10, freeze_prototypes_iters=0, collapse_patience=3)
    ln_k = torch.tensor(math.log(10))
    flags = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            flags.append(float(m._collapse_check(ln_k, _info(step, spe=4))["collapse"]))
    assert flags == [0, 0, 1, 1]
    assert any("collapsed" in str(w.message) for w in caught)
    # A loss away from ln K (learning below it, or still above it early on) resets the count.
    for off in (-1.0, 0.5):
        m._collapse_check(ln_k, _info(5, spe=4))
        m._collapse_check(ln_k + off, _info(6, spe=4))
        assert int(m.collapse_run) == 0


def test_state_is_all_in_state_dict() -> None:
    m = _swav(queue_length=8)
    keys = set(m.state_dict())
    assert {"queue", "collapse_run", "prototypes.weight"} <= keys
    assert "queue" not in _swav(queue_length=0).state_dict()
