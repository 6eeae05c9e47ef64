"""MoCo v1/v2: the queue, shuffle-BN, the EMA order and the loss against direct formulas."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sslcli_plugins.moco import MoCoV1, MoCoV2, moco_logits, moco_loss
from torch import nn

from sslcli import api
from sslcli.backbones import make_spec
from sslcli.errors import ConfigError
from sslcli.method import StepInfo
from sslcli.nn.queue import KeyQueue
from sslcli.nn.shuffle_bn import (
    bn_groups,
    grouped_batch_norm,
    shuffle_bn_forward,
    split_batchnorm,
)
from tests.helpers import build_method, two_view_batch

STEP = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=10)


# -- the queue ------------------------------------------------------------------------------------


def test_queue_starts_as_unit_rows_and_a_zero_pointer() -> None:
    q = KeyQueue(dim=5, size=12)
    assert q.keys.shape == (12, 5)
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(12))
    assert int(q.ptr) == 0
    assert {"keys", "ptr"} <= set(q.state_dict())


def test_queue_is_fifo_and_wraps_around() -> None:
    q = KeyQueue(dim=3, size=6)
    init = q.keys.clone()
    a, b, c, d = (torch.full((2, 3), float(v)) for v in (1, 2, 3, 4))
    q.enqueue(a)
    assert torch.equal(q.keys[0:2], a) and torch.equal(q.keys[2:], init[2:])
    assert int(q.ptr) == 2
    q.enqueue(b)
    q.enqueue(c)
    assert torch.equal(q.keys, torch.cat([a, b, c]))
    assert int(q.ptr) == 0  # wrapped
    q.enqueue(d)  # overwrites the oldest batch (a), keeps b and c
    assert torch.equal(q.keys, torch.cat([d, b, c]))
    assert int(q.ptr) == 2


def test_queue_rejects_a_batch_that_does_not_divide_it() -> None:
    q = KeyQueue(dim=3, size=10, option="method.queue_size")
    with pytest.raises(ConfigError, match=r"method\.queue_size: 10 is not a multiple of the 4"):
        q.enqueue(torch.zeros(4, 3))
    assert int(q.ptr) == 0


def test_queue_state_round_trips() -> None:
    q = KeyQueue(dim=3, size=4)
    q.enqueue(torch.ones(2, 3))
    fresh = KeyQueue(dim=3, size=4)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.keys, q.keys) and int(fresh.ptr) == 2


# -- the loss --------------------------------------------------------------------------------


def moco_loss_reference(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> float:
    """He et al. 2019, Eq. 1 with loops:
    L_q = -log exp(q·k+/t) / (exp(q·k+/t) + Σ_j exp(q·k_j/t)), averaged over queries."""
    total = 0.0
    for i in range(q.shape[0]):
        pos = sum(float(q[i, d]) * float(k[i, d]) for d in range(q.shape[1]))
        negs = [
            sum(float(q[i, d]) * float(queue[j, d]) for d in range(q.shape[1]))
            for j in range(queue.shape[0])
        ]
        denom = math.exp(pos / t) + sum(math.exp(s / t) for s in negs)
        total += -math.log(math.exp(pos / t) / denom)
    return total / q.shape[0]


def test_moco_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    q = F.normalize(torch.randn(5, 4), dim=1)
    k = F.normalize(torch.randn(5, 4), dim=1)
    queue = F.normalize(torch.randn(7, 4), dim=1)
    for t in (0.07, 0.2, 1.0):
        loss, logits = moco_loss(q, k, queue, t)
        assert math.isclose(float(loss), moco_loss_reference(q, k, queue, t), rel_tol=1e-5)
        assert logits.shape == (5, 8)


def test_moco_logits_layout_positive_first() -> None:
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    assert torch.allclose(moco_logits(q, k, queue, 0.5), torch.tensor([[1.2, 0.0, -2.0]]))


# -- split BN / shuffle BN ------------------------------------------------------------------------


def _manual_group_bn(
    x: torch.Tensor, groups: int, bn: nn.BatchNorm2d, strided: bool = True
) -> torch.Tensor:
    """Normalise each group with its own mean and biased variance; group g is rows
    g, g+G, g+2G... (split BN's layout) or, with ``strided=False``, the g-th slice."""
    out = torch.empty_like(x)
    m = x.shape[0] // groups
    for g in range(groups):
        rows = torch.arange(g, x.shape[0], groups) if strided else torch.arange(g * m, (g + 1) * m)
        part = x[rows]
        mean = part.mean(dim=(0, 2, 3), keepdim=True)
        var = part.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        w = bn.weight.view(1, -1, 1, 1)
        b = bn.bias.view(1, -1, 1, 1)
        out[rows] = (part - mean) / torch.sqrt(var + bn.eps) * w + b
    return out


def _bn(c: int = 3) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def test_grouped_batch_norm_uses_per_group_statistics() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) + torch.arange(8.0).view(8, 1, 1, 1)  # groups differ in mean
    bn = _bn()
    y = grouped_batch_norm(bn, x, groups=4)
    assert torch.allclose(y, _manual_group_bn(x, 4, bn), atol=1e-5)
    whole = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert (y - whole).abs().max() > 0.5  # per-group statistics are not the batch's


def test_grouped_batch_norm_running_stats_average_the_groups() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 2, 3, 3) * 2 + 1
    bn = nn.BatchNorm2d(2, momentum=0.1)
    grouped_batch_norm(bn, x, groups=3)
    parts = [x[g::3] for g in range(3)]
    means = torch.stack([p.mean(dim=(0, 2, 3)) for p in parts])
    vars_ = torch.stack([p.transpose(0, 1).reshape(2, -1).var(dim=1) for p in parts])  # unbiased
    assert torch.allclose(bn.running_mean, 0.1 * means.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, 0.9 + 0.1 * vars_.mean(0), atol=1e-6)
    assert int(bn.num_batches_tracked) == 1


def test_split_batchnorm_patches_then_restores() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 3, 1), _bn(), nn.ReLU())
    x = torch.randn(8, 3, 4, 4)
    plain = copy.deepcopy(net)
    with split_batchnorm(net, groups=2):
        y = net(x)
    expected = torch.relu(_manual_group_bn(net[0](x), 2, net[1]))
    assert torch.allclose(y, expected, atol=1e-5)
    assert "forward" not in net[1].__dict__  # restored
    assert torch.allclose(net(x), plain(x), atol=1e-6)  # whole-batch BN again
    net.eval()
    ref = net(x)
    with split_batchnorm(net, groups=2):  # eval: running statistics, nothing split
        assert torch.equal(net(x), ref)


def test_split_batchnorm_handles_timm_bn_act_and_bn1d() -> None:
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    bn_act = BatchNormAct2d(3, act_layer=nn.ReLU)
    x = torch.randn(8, 3, 4, 4)
    with split_batchnorm(bn_act, groups=4):
        y = bn_act(x)
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict({k: v for k, v in bn_act.state_dict().items()}, strict=False)
    assert torch.allclose(y, torch.relu(_manual_group_bn(x, 4, ref)), atol=1e-5)

    bn1 = nn.BatchNorm1d(5)
    z = torch.randn(6, 5)
    with split_batchnorm(bn1, groups=2):
        out = bn1(z)
    for g in range(2):
        part = z[g::2]
        norm = (part - part.mean(0)) / torch.sqrt(part.var(0, unbiased=False) + bn1.eps)
        assert torch.allclose(out[g::2], norm, atol=1e-5)


def test_split_batchnorm_refuses_sync_bn() -> None:
    with pytest.raises(ConfigError, match="synchronised BN"):
        with split_batchnorm(nn.SyncBatchNorm(3), groups=2):
            pass


def test_bn_groups() -> None:
    assert bn_groups(128, 32) == 4
    assert bn_groups(8, 32) == 1
    assert bn_groups(32, 32) == 1
    with pytest.raises(ConfigError, match=r"method\.bn_group_size"):
        bn_groups(48, 32)


def test_shuffle_bn_forward_restores_order() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = torch.randn(8, 4)
    assert torch.allclose(shuffle_bn_forward(lin, x, group_size=2), lin(x), atol=1e-6)


def test_shuffle_bn_forward_normalises_shuffled_groups() -> None:
    torch.manual_seed(0)
    bn = _bn()
    x = torch.randn(8, 3, 2, 2) + torch.arange(8.0).view(8, 1, 1, 1)
    torch.manual_seed(123)
    y = shuffle_bn_forward(bn, x, group_size=2)
    torch.manual_seed(123)
    perm = torch.randperm(8)
    expected = torch.empty_like(x)
    expected[perm] = _manual_group_bn(x[perm], 4, bn)
    assert torch.allclose(y, expected, atol=1e-5)
    # Not the unshuffled groups: a sample's statistics come from random partners.
    assert not torch.allclose(y, _manual_group_bn(x, 4, bn), atol=1e-3)


# -- the method ------------------------------------------------------------------------------------


def test_heads_views_and_recipes() -> None:
    v1 = build_method("moco-v1", "method.queue_size=64")
    v2 = build_method("moco-v2", "method.queue_size=64")
    width = 96  # test_resnet
    assert isinstance(v1.head, nn.Linear) and v1.head.in_features == width
    assert v1.head.out_features == 128
    assert [type(m).__name__ for m in v2.head] == ["Linear", "ReLU", "Linear"]
    assert v2.head[0].out_features == width and v2.head[2].out_features == 128
    assert not any(isinstance(m, nn.BatchNorm1d) for m in v2.head.modules())

    (s1,) = v1.views()
    assert s1.count == 2 and s1.scale == (0.2, 1.0) and s1.grayscale_first
    assert s1.jitter_p == 1.0 and (s1.brightness, s1.contrast, s1.saturation, s1.hue) == (
        0.4,
        0.4,
        0.4,
        0.4,
    )
    assert s1.blur_p == 0 and s1.normalize
    (s2,) = v2.views()
    assert not s2.grayscale_first and s2.jitter_p == 0.8 and s2.hue == 0.1
    assert s2.grayscale_p == 0.2 and s2.blur_p == 0.5 and s2.blur_sigma == (0.1, 2.0)

    c1, c2 = MoCoV1.Config(), MoCoV2.Config()
    assert (c1.temperature, c1.head, c2.temperature, c2.head) == (0.07, "linear", 0.2, "mlp")
    assert c1.queue_size is c2.queue_size is None and c1.momentum == 0.999  # from N
    for cls, kind in ((MoCoV1, "step"), (MoCoV2, "cosine")):
        assert cls.recipe.optim["name"] == "sgd" and cls.recipe.optim["lr"] == 0.03
        assert cls.recipe.optim["weight_decay"] == 1e-4
        assert cls.recipe.optim["exclude_norm_bias"] is False
        assert cls.recipe.schedule["kind"] == kind


@pytest.mark.parametrize(
    ("n", "k"), [(1_281_167, 65536), (524_288, 65536), (100_000, 8192), (50_000, 4096), (1797, 128)]
)
def test_default_queue_is_sized_from_the_data_set(n: int, k: int) -> None:
    """The official 65,536 on ImageNet; below 524,288 images the largest power of two
    <= N/8 (CIFAR-10: the official demo's 4096), so a default run's negatives are real keys
    after a few steps instead of the random start vectors (digits: 65,536 before)."""
    cls, _, cfg = api.resolve_config("moco-v2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never larger than the data set
        m = cls(cfg, make_spec("test_resnet", 16).build(), dataset_size=n)
    assert m.queue.size == m.queue.keys.shape[0] == k <= n


def test_queue_larger_than_the_data_set_warns_and_the_default_says_where_it_came_from() -> None:
    cls, _, cfg = api.resolve_config("moco-v1", sets=["method.queue_size=64"])
    with pytest.warns(UserWarning, match=r"method\.queue_size=64 > 40 images.*queue_size=4 "):
        cls(cfg, make_spec("test_resnet", 16).build(), dataset_size=40)
    cls, _, cfg = api.resolve_config("moco-v1")
    m = cls(cfg, make_spec("test_resnet", 16).build(), dataset_size=40)
    assert m.queue.size == 4
    with pytest.raises(ConfigError, match=r"4 \(the default for 40 images.*multiple of the 8"):
        m.training_step(two_view_batch(8), STEP)


def test_trainer_gives_moco_the_data_set_size(tmp_path: Path) -> None:
    from sslcli.engine.trainer import Trainer

    o = {
        "backbone": {"name": "test_resnet"},
        "data": {"dataset": "digits", "image_size": 16},
        "trainer": {"batch_size": 64, "eval_knn": False, "out": str(tmp_path)},
    }
    method_cls, run, mcfg = api.resolve_config("moco-v2", overrides=o)
    tr = Trainer(run, method_cls, mcfg)
    assert tr.method.queue.size == 128  # 1797 images // 8 = 224 -> 128


def test_keys_come_from_the_updated_key_encoder_and_join_the_queue_after_the_loss() -> None:
    m = build_method(
        "moco-v2", "method.queue_size=16", "method.momentum=0.5", "method.bn_group_size=8"
    )
    m.train()
    with torch.no_grad():  # as after an optimiser step: query and key encoders differ
        for p in list(m.backbone.parameters()) + list(m.head.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    old_key = copy.deepcopy(m.key_encoder)
    online = nn.Sequential(copy.deepcopy(m.backbone), copy.deepcopy(m.head))
    old_queue = m.queue.keys.clone()
    batch = two_view_batch(8)

    out = m.training_step(batch, STEP)

    # Eq. 2 applied once, before the keys.
    params = zip(m.key_encoder.parameters(), old_key.parameters(), online.parameters(), strict=True)
    for pk, po, pq in params:
        assert torch.allclose(pk, 0.5 * po + 0.5 * pq, atol=1e-6)
    x1, x2 = batch.views
    with torch.no_grad():
        k_new = F.normalize(copy.deepcopy(m.key_encoder)(x2), dim=1)
        k_old = F.normalize(old_key(x2), dim=1)
        q = F.normalize(online(x1), dim=1)
    assert torch.allclose(m.queue.keys[:8], k_new, atol=1e-5)
    assert not torch.allclose(m.queue.keys[:8], k_old, atol=1e-3)
    assert torch.equal(m.queue.keys[8:], old_queue[8:]) and int(m.queue.ptr) == 8
    # The loss used the queue as it was before this step's keys were enqueued.
    expected = moco_loss_reference(q, k_new, old_queue, 0.2)
    assert math.isclose(float(out.loss.detach()), expected, rel_tol=1e-4)


def test_symmetric_loss_sums_both_directions_and_enqueues_both_keys() -> None:
    m = build_method(
        "moco-v1", "method.queue_size=32", "method.symmetric=true", "method.bn_group_size=8"
    )
    old_queue = m.queue.keys.clone()
    batch = two_view_batch(8)
    out = m.training_step(batch, STEP)
    x1, x2 = batch.views
    with torch.no_grad():
        enc = copy.deepcopy(m.key_encoder)
        k1, k2 = F.normalize(enc(x1), dim=1), F.normalize(enc(x2), dim=1)
        online = nn.Sequential(copy.deepcopy(m.backbone), copy.deepcopy(m.head))
        q1, q2 = F.normalize(online(x1), dim=1), F.normalize(online(x2), dim=1)
    assert torch.allclose(m.queue.keys[:16], torch.cat([k1, k2]), atol=1e-5)
    assert int(m.queue.ptr) == 16
    expected = moco_loss_reference(q1, k2, old_queue, 0.07) + moco_loss_reference(
        q2, k1, old_queue, 0.07
    )
    assert math.isclose(float(out.loss.detach()), expected, rel_tol=1e-4)


def test_query_bn_is_split_into_groups() -> None:
    m = build_method("moco-v1", "method.queue_size=16", "method.bn_group_size=4")
    x = two_view_batch(8).views[0] + torch.arange(8.0).view(8, 1, 1, 1)
    with torch.no_grad():
        split = m._queries(x)
        whole = F.normalize(m.head(m.backbone(x)), dim=1)
        halves = torch.empty_like(split)
        for g in range(2):  # groups of 4: rows g, g+2, g+4, g+6
            halves[g::2] = F.normalize(m.head(m.backbone(x[g::2])), dim=1)
    assert torch.allclose(split, halves, atol=1e-5)
    assert not torch.allclose(split, whole, atol=1e-3)


def test_bad_queue_or_group_size_is_a_config_error() -> None:
    m = build_method("moco-v2", "method.queue_size=20")
    with pytest.raises(ConfigError, match=r"method\.queue_size"):
        m.training_step(two_view_batch(8), STEP)
    m = build_method("moco-v2", "method.queue_size=16", "method.bn_group_size=3")
    with pytest.raises(ConfigError, match=r"method\.bn_group_size"):
        m.training_step(two_view_batch(8), STEP)


def test_key_encoder_gets_no_gradient_and_is_exportable() -> None:
    m = build_method("moco-v2", "method.queue_size=16")
    out = m.training_step(two_view_batch(8), STEP)
    out.loss.backward()
    assert all(p.grad is None for p in m.key_encoder.parameters())
    assert all(
        p.grad is not None for p in list(m.backbone.parameters()) + list(m.head.parameters())
    )
    cands = m.export_candidates()
    assert list(cands) == ["backbone", "key_backbone"]
    assert cands["key_backbone"].sslcli_spec == m.backbone.sslcli_spec


# -- two processes (gloo): gathered keys and the cross-process shuffle -------------------------


def _worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(7)
        x_all = torch.randn(world * 4, 3, 2, 2, generator=g) + torch.arange(8.0).view(8, 1, 1, 1)
        x = x_all[rank * 4 : (rank + 1) * 4]
        bn = nn.BatchNorm2d(3)
        torch.manual_seed(11)
        y = shuffle_bn_forward(bn, x, group_size=4)
        torch.manual_seed(3)
        queue = KeyQueue(dim=3, size=16)
        queue.enqueue(torch.full((4, 3), float(rank + 1)))
        torch.save({"y": y, "keys": queue.keys, "ptr": queue.ptr}, f"{out_dir}/r{rank}.pt")
    finally:
        tdist.destroy_process_group()


def test_two_processes_shuffle_across_ranks_and_share_one_queue(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    os.unlink(name)
    mp.spawn(_worker, args=(2, f"file://{name}", str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt") for r in (0, 1))
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(8, 3, 2, 2, generator=g) + torch.arange(8.0).view(8, 1, 1, 1)
    torch.manual_seed(11)
    perm = torch.randperm(8)  # rank 0's permutation, broadcast to rank 1
    # One BN group per process: each process holds one half of the permuted batch.
    per_rank = _manual_group_bn(x_all[perm], 2, nn.BatchNorm2d(3), strided=False)
    expected = torch.empty_like(x_all)
    expected[perm] = per_rank
    assert torch.allclose(torch.cat([r0["y"], r1["y"]]), expected, atol=1e-5)
    # Both processes hold the same queue: rank 0's keys, then rank 1's.
    assert torch.equal(r0["keys"], r1["keys"]) and int(r0["ptr"]) == int(r1["ptr"]) == 8
    assert torch.equal(r0["keys"][:4], torch.full((4, 3), 1.0))
    assert torch.equal(r0["keys"][4:8], torch.full((4, 3), 2.0))
