"""The backbone factory: what each method asks of its backbone (the initialisation of the
residual blocks, MoCo v3's 12-head ViT-S) and SimCLR v2's SK-ResNets as the official code
builds them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from timm.layers import SelectiveKernel
from torch import Tensor, nn

from sslcli import api, registry
from sslcli.backbones import ALIAS_KWARGS, describe_all, make_spec
from sslcli.cli.app import main
from sslcli.data.views import ViewSpec
from sslcli.engine.trainer import Trainer
from sslcli.method import Batch, Method, StepInfo, StepOutput
from tests.helpers import TINY

# ---------------------------------------------------------------------------------------------
# Residual-block initialisation per method
# ---------------------------------------------------------------------------------------------

# γ of each residual block's last BN at the start, as each official code builds its ResNet
# (the line of code is quoted next to each plugin's ``zero_init_last``).
STARTS_AT_ZERO = {
    "instdisc": False,  # lemniscate models/resnet.py: BN weight filled with 1
    "invaspread": False,  # models/resnet.py fills 1; resnet_cifar.py: PyTorch default
    "cmc": False,  # models/resnet.py: BN weight filled with 1
    "cpc": False,  # no official code; the plain initialisation
    "moco-v1": False,  # torchvision default zero_init_residual=False
    "moco-v2": False,
    "swav": False,  # src/resnet50.py zero_init_residual=False
    "dino": False,  # torchvision_models[arch]() default
    "simclr": True,  # resnet.py batch_norm_relu(..., init_zero=True)
    "simclr-v2": True,
    "byol": True,  # haiku BlockV1: batchnorm_2 scale_init=jnp.zeros (bottlenecks)
    "simsiam": True,  # builder.py zero_init_residual=True
    "moco-v3": True,  # main_moco.py zero_init_residual=True
}


def last_norm_weights(model: nn.Module) -> list[Tensor]:
    """The weight of the last normalisation layer of every residual block (timm blocks
    are the modules with a ``zero_init_last`` method)."""
    out = []
    for block in model.modules():
        if not callable(getattr(block, "zero_init_last", None)):
            continue
        conv3 = getattr(block, "conv3", None)
        norm = getattr(block, "bn3", None) or getattr(conv3, "bn", None) or block.bn2
        out.append(norm.weight.detach())
    assert out, "no residual blocks found"
    return out


def test_every_built_in_method_states_its_initialisation() -> None:
    assert set(STARTS_AT_ZERO) == set(registry.find())
    for name, zero in STARTS_AT_ZERO.items():
        assert registry.load(name).zero_init_last is zero, name


@pytest.mark.parametrize("name", sorted(STARTS_AT_ZERO))
def test_factory_initialises_residual_blocks_as_the_official_code(name: str) -> None:
    cls = registry.load(name)
    for backbone in ("test_resnet", "sk-resnet50-1x"):
        spec = make_spec(backbone, 16, method=cls)
        assert spec.kwargs["zero_init_last"] is STARTS_AT_ZERO[name]
        if backbone != "test_resnet":
            continue  # the SK-ResNet's blocks are checked once below (a bigger network)
        want = 0.0 if STARTS_AT_ZERO[name] else 1.0
        for w in last_norm_weights(spec.build()):
            assert torch.all(w == want), name


def test_sk_resnet_blocks_follow_the_method_too() -> None:
    # timm's registered skresnet50 starts at γ = 1 (zero_init_last=False); SimCLR v2 zeroes.
    v2 = make_spec("sk-resnet50-1x", 16, method=registry.load("simclr-v2"))
    moco = make_spec("sk-resnet50-1x", 16, method=registry.load("moco-v2"))
    assert all(torch.all(w == 0) for w in last_norm_weights(v2.build()))
    assert all(torch.all(w == 1) for w in last_norm_weights(moco.build()))


def test_byol_zeroes_bottleneck_blocks_only() -> None:
    """haiku's BlockV1 (BYOL's ResNets) zeroes a bottleneck block's last BN, not a basic
    block's: BYOL's ResNet-18 starts at γ = 1, its ResNet-50 at 0."""
    byol = registry.load("byol")
    assert make_spec("resnet18", 16, method=byol).kwargs["zero_init_last"] is False
    assert make_spec("resnet50", 16, method=byol).kwargs["zero_init_last"] is True


def test_trainer_builds_the_method_initialisation(tmp_path: Path) -> None:
    """Through the real path: a MoCo v2 run starts with γ = 1 (timm alone would zero it)."""
    o: dict[str, Any] = copy.deepcopy(TINY)
    o["trainer"].update(out=str(tmp_path))
    cls, run, mcfg = api.resolve_config("moco-v2", overrides=o, sets=["method.queue_size=64"])
    tr = Trainer(run, cls, mcfg)
    assert tr.backbone_spec.kwargs["zero_init_last"] is False
    assert all(torch.all(w == 1) for w in last_norm_weights(tr.method.backbone))
    assert all(torch.all(w == 1) for w in last_norm_weights(tr.method.key_encoder.backbone))


class _ThirdParty(Method):
    """A plugin that says nothing about its backbone."""

    name = "third-party"

    def views(self) -> list[ViewSpec]:
        return []

    def training_step(self, batch: Batch, step: StepInfo) -> StepOutput:
        raise NotImplementedError


def test_third_party_default_keeps_the_models_own_initialisation() -> None:
    assert _ThirdParty.zero_init_last is None and _ThirdParty.backbone_kwargs("x") == {}
    spec = make_spec("test_resnet", 16, method=_ThirdParty)
    assert "zero_init_last" not in spec.kwargs
    assert all(torch.all(w == 0) for w in last_norm_weights(spec.build()))  # timm's default


def test_user_kwargs_win_and_other_models_are_not_given_the_argument() -> None:
    moco = registry.load("moco-v2")
    spec = make_spec("test_resnet", 16, kwargs={"zero_init_last": True}, method=moco)
    assert all(torch.all(w == 0) for w in last_norm_weights(spec.build()))
    vit = make_spec("test_vit", 16, method=moco)  # ViTs have no such argument
    assert "zero_init_last" not in vit.kwargs
    vit.build()


# ---------------------------------------------------------------------------------------------
# MoCo v3's ViT-S
# ---------------------------------------------------------------------------------------------


def test_moco_v3_vit_s_is_the_official_12_head_network(tmp_path: Path) -> None:
    """``ssl train moco-v3 --backbone vit-s`` without a recipe file: official vits.py's
    vit_small (patch 16, width 384, depth 12, 12 heads, MLP ratio 4, qkv bias, LayerNorm
    eps 1e-6) built by timm with the arguments on record."""
    o: dict[str, Any] = copy.deepcopy(TINY)
    o["backbone"] = {"name": "vit-s"}
    o["data"] = {"image_size": 32}
    o["trainer"].update(out=str(tmp_path), batch_size=4)
    cls, run, mcfg = api.resolve_config("moco-v3", overrides=o)
    assert run.backbone.kwargs == {}  # nothing from a recipe: the method asks for it
    tr = Trainer(run, cls, mcfg)
    spec = tr.backbone_spec
    assert spec.timm_name == "vit_small_patch16_224" and spec.kwargs["num_heads"] == 12
    vit = tr.method.backbone
    for enc in (vit, tr.method.momentum_encoder.backbone):
        assert all(b.attn.num_heads == 12 and b.attn.head_dim == 32 for b in enc.blocks)
    assert len(vit.blocks) == 12 and vit.embed_dim == 384
    assert vit.blocks[0].attn.qkv.bias is not None
    assert vit.blocks[0].mlp.fc1.out_features == 4 * 384
    norms = [m for m in vit.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert vit.global_pool == "token" and vit.cls_token is not None
    # DINO's ViT-S keeps timm's (and DINO's own) 6 heads.
    assert "num_heads" not in make_spec("vit-s", 32, method=registry.load("dino")).kwargs


# ---------------------------------------------------------------------------------------------
# SimCLR v2's SK-ResNets
# ---------------------------------------------------------------------------------------------

# Table 1 of the SimCLR v2 paper / the official README (parameters in millions).
PAPER_PARAMS_M = {
    "sk-resnet50-1x": 35,
    "sk-resnet50-2x": 140,
    "sk-resnet101-1x": 65,
    "sk-resnet101-2x": 257,
    "sk-resnet152-1x": 89,
    "sk-resnet152-2x": 354,
    "sk-resnet152-3x": 795,
}


def test_sk_resnet_parameter_counts_match_the_paper() -> None:
    assert set(PAPER_PARAMS_M) == set(ALIAS_KWARGS)
    fast = ["sk-resnet50-1x", "sk-resnet50-2x", "sk-resnet101-1x"]  # building is CPU time
    rows = {r["alias"]: r for r in describe_all(fast)}
    assert set(rows) == set(fast)
    for alias in fast:
        assert abs(rows[alias]["params_m"] - PAPER_PARAMS_M[alias]) < 0.01 * PAPER_PARAMS_M[alias]
    assert rows["sk-resnet50-1x"]["features"] == 2048
    assert rows["sk-resnet50-2x"]["features"] == 4096


@pytest.mark.slow
def test_sk_resnet_152_parameter_counts_match_the_paper() -> None:
    slow = ["sk-resnet101-2x", "sk-resnet152-1x", "sk-resnet152-2x", "sk-resnet152-3x"]
    for r in describe_all(slow):
        assert abs(r["params_m"] - PAPER_PARAMS_M[r["alias"]]) < 0.01 * PAPER_PARAMS_M[r["alias"]]


def test_sk_resnet_structure_is_the_official_one() -> None:
    """ResNet-D stem (3x3 convs to 32w, 32w, 64w), average-pool shortcuts, and in each
    bottleneck a selective kernel with two 3x3 branches over all input channels and
    ``max(int(width / 16), 32)`` attention channels (official ``SK_Conv2D``)."""
    for w in (1, 2):
        with torch.device("meta"):
            m = make_spec(f"sk-resnet50-{w}x", 224).build()
        stem = [c for c in m.conv1 if isinstance(c, nn.Conv2d)]
        assert [(c.kernel_size, c.stride, c.out_channels) for c in stem] == [
            ((3, 3), (2, 2), 32 * w), ((3, 3), (1, 1), 32 * w), ((3, 3), (1, 1), 64 * w)
        ]  # fmt: skip
        assert isinstance(m.maxpool, nn.MaxPool2d)
        assert isinstance(m.layer2[0].downsample[0], nn.AvgPool2d)
        assert m.layer2[0].downsample[1].stride == (1, 1)
        for stage, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4)):
            width = 64 * w * 2**stage
            for block in layer:
                sk = block.conv2
                assert isinstance(sk, SelectiveKernel) and not sk.split_input
                assert len(sk.paths) == 2
                for path in sk.paths:
                    assert path.conv.kernel_size == (3, 3) and path.conv.dilation == (1, 1)
                    assert path.conv.in_channels == path.conv.out_channels == width
                assert sk.attn.fc_reduce.out_channels == max(width // 16, 32)
            assert layer[0].conv2.paths[0].conv.stride == ((1, 1) if stage == 0 else (2, 2))


def _official_sk_conv(sk: SelectiveKernel, x: Tensor) -> Tensor:
    """SimCLR v2's ``SK_Conv2D.call`` written out with the layer's weights: one 3x3 conv
    to 2x the width, BN + ReLU, split into the two streams; mixing weights from the
    spatial mean of their sum (1x1 conv, BN + ReLU, 1x1 conv, softmax over streams)."""
    convs = [p.conv for p in sk.paths]
    w = torch.cat([c.weight for c in convs])  # [2C, C, 3, 3]
    y = F.conv2d(x, w, stride=convs[0].stride, padding=1)
    bns = [p.bn for p in sk.paths]

    def bn(t: Tensor, layers: list[Any]) -> Tensor:
        cat = lambda name: torch.cat([getattr(b, name) for b in layers])  # noqa: E731
        return F.batch_norm(t, cat("running_mean"), cat("running_var"), cat("weight"),
                            cat("bias"), False, 0.0, layers[0].eps)  # fmt: skip

    y = F.relu(bn(y, bns))
    streams = torch.stack(y.chunk(2, dim=1))  # [2, B, C, H, W]
    g = streams.sum(0).mean((2, 3), keepdim=True)
    g = F.relu(bn(F.conv2d(g, sk.attn.fc_reduce.weight), [sk.attn.bn]))
    mixing = F.conv2d(g, sk.attn.fc_select.weight)
    mixing = torch.stack(mixing.chunk(2, dim=1)).softmax(dim=0)
    return (streams * mixing).sum(0)


def test_sk_unit_computes_the_official_selective_kernel() -> None:
    torch.manual_seed(0)
    m = make_spec("sk-resnet50-1x", 32).build().eval()
    with torch.no_grad():
        for mod in m.modules():  # non-trivial BN statistics and affine parameters
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.normal_(1, 0.1)
                mod.bias.normal_(0, 0.1)
        for sk in (m.layer1[0].conv2, m.layer3[0].conv2):  # stride 1 and stride 2
            x = torch.randn(2, sk.paths[0].conv.in_channels, 8, 8)
            torch.testing.assert_close(sk(x), _official_sk_conv(sk, x), rtol=1e-5, atol=1e-5)


def test_ssl_backbones_lists_the_sk_resnets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sslcli import backbones

    # Two rows instead of twenty: building every alias, even on the meta device, is CPU time.
    some = {a: backbones.ALIASES[a] for a in ("resnet50", "sk-resnet50-2x")}
    monkeypatch.setattr(backbones, "ALIASES", some)
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "sk-resnet50-2x" in out and "140.3" in out and "4096" in out
    assert "skresnet50 *" in out and "SK-ResNets" in out  # marked as built with other args
    assert "23.5" in out  # resnet50


def test_resume_refuses_a_backbone_an_older_version_built_otherwise(tmp_path: Path) -> None:
    """A MoCo v3 ViT-S checkpoint from before the 12 heads (nothing recorded: timm's 6)
    has the same parameter shapes; resuming it must not silently change the network."""
    from sslcli.errors import ConfigError
    from sslcli.runs import checkpoint as ckpt
    from tests.helpers import make_run

    sets = ["backbone.kwargs.depth=1", "method.mlp_dim=32"]
    run_dir = make_run(tmp_path / "run", "moco-v3", "vit-s", 32, sets=sets)
    groups, meta = ckpt.load(ckpt.resolve(run_dir))
    assert meta["backbone"]["kwargs"]["num_heads"] == 12
    overrides = {
        "backbone": {"name": "vit-s", "small_stem": None},
        "data": {"image_size": 32},
        "trainer": {"epochs": 1, "batch_size": 16, "eval_knn": False, "out": str(run_dir)},
    }
    cls, run, mcfg = api.resolve_config("moco-v3", overrides=overrides, sets=sets)
    Trainer(run, cls, mcfg, resume=run_dir)  # the same backbone: accepted
    del meta["backbone"]["kwargs"]["num_heads"]
    meta["backbone"]["kwargs"].pop("zero_init_last", None)  # init-only: never compared
    ckpt.save(run_dir / "checkpoints", int(meta["step"]) + 1, groups, meta, keep=2)
    cls, run, mcfg = api.resolve_config("moco-v3", overrides=overrides, sets=sets)
    with pytest.raises(ConfigError, match=r"num_heads \('unset' -> 12\)"):
        Trainer(run, cls, mcfg, resume=run_dir)
