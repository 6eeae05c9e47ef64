"""``ssl export``: bit-exact weights that plain timm loads — in a process where sslcli cannot
even be imported — with the same features as the encoder inside sslcli."""

from __future__ import annotations

import inspect
import json
import os
import site
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from sslcli.cli.app import main
from sslcli.runs.export import load_timm
from sslcli.runs.targets import load_target
from tests.helpers import cli, make_run

PLAIN_TIMM = textwrap.dedent(
    """
    import json
    import sys

    sys.path[:0] = SITE
    try:
        import sslcli  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("sslcli is importable: the test would prove nothing")
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    LOAD_TIMM
    for job in json.loads(sys.argv[1]):
        if job["how"] == "local-dir":
            model = timm.create_model("local-dir:" + job["dir"], pretrained=True, num_classes=0)
        else:
            model = load_timm(job["dir"])
        model.eval()
        with torch.no_grad():
            f = model(load_file(job["x"])["x"])
        save_file({"f": f.contiguous()}, job["out"])
    """
)


def features_without_sslcli(jobs: list[dict[str, Any]], tmp: Path) -> list[torch.Tensor]:
    """Features of exported models computed in one fresh interpreter that sees
    site-packages but neither the repository nor sslcli's editable install (-S skips the
    .pth files that install it, -I drops the script directory and PYTHONPATH). ``load_timm``
    is pasted in from its source, so it is checked to need nothing from sslcli."""
    src = textwrap.dedent(inspect.getsource(load_timm))
    code = PLAIN_TIMM.replace("SITE", repr(site.getsitepackages()))
    code = code.replace("LOAD_TIMM", src)
    script = tmp / "plain_timm.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(script), json.dumps(jobs)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_file(j["out"])["f"] for j in jobs]


# (method, backbone, image size, small stem, --which, how plain timm loads it)
CASES = {
    "resnet": ("simclr", "test_resnet", 32, False, None, "local-dir"),  # ImageNet stem
    "vit": ("simclr", "test_vit", 16, None, None, "local-dir"),  # img_size, patch 2, dynamic
    "byol-target": ("byol", "test_resnet", 32, False, "target_backbone", "local-dir"),
    "cifar-stem": ("simclr", "resnet18", 16, None, None, "load_timm"),  # 3x3 s1, no pool
    # The method's own architecture (12 heads) and an alias's (SimCLR v2's SK-ResNet) are
    # constructor arguments that config.json must carry for plain timm.
    "moco-v3-vit-s": ("moco-v3", "vit-s", 32, None, None, "local-dir"),
    "sk-resnet": ("simclr-v2", "sk-resnet50-1x", 32, False, None, "local-dir"),
}
# Fewer blocks (and narrower heads) than the real networks, to keep CPU time small: a user's
# backbone.kwargs are merged over the method's and the alias's arguments, and recorded too.
SETS = {
    "moco-v3-vit-s": ["backbone.kwargs.depth=2", "method.mlp_dim=64"],
    "sk-resnet": ["backbone.kwargs.layers=[1,1,1,1]", "method.proj_hidden_dim=64"],
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every case exported through the CLI, and its features computed inside sslcli and
    in a process without sslcli."""
    tmp = tmp_path_factory.mktemp("exports")
    out: dict[str, dict[str, Any]] = {}
    jobs = []
    for name, (method, backbone, size, small, which, how) in CASES.items():
        # Checkpoint keys as torch.compile leaves them: export must strip "_orig_mod".
        run = make_run(tmp / name, method, backbone, size, small_stem=small,
                       state_prefix="backbone._orig_mod.", sets=SETS.get(name))  # fmt: skip
        exp = tmp / f"{name}-export"
        argv = ["export", str(run), "--out", str(exp), "--json"]
        code = main(argv + (["--which", which] if which else []))
        assert code == 0, name
        t = load_target(run)
        enc = t.candidates[which or t.default_which].eval()
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = enc(x)
            embed = t.method.embed(x) if which is None else None
        save_file({"x": x}, str(tmp / f"{name}-x.safetensors"))
        jobs.append({"dir": str(exp), "x": str(tmp / f"{name}-x.safetensors"),
                     "out": str(tmp / f"{name}-f.safetensors"), "how": how})  # fmt: skip
        out[name] = {"run": run, "export": exp, "encoder": enc, "want": want, "embed": embed,
                     "which": which, "size": size}  # fmt: skip
    for name, got in zip(CASES, features_without_sslcli(jobs, tmp), strict=True):
        out[name]["plain"] = got
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_plain_timm_without_sslcli_gives_identical_features(
    case: str, exports: dict[str, dict[str, Any]]
) -> None:
    e = exports[case]
    assert torch.equal(e["plain"], e["want"]), case
    assert e["want"].std() > 0
    if e["embed"] is not None:
        assert torch.equal(e["embed"], e["want"])  # the exported one is what kNN evaluates


@pytest.mark.parametrize("case", list(CASES))
def test_exported_weights_are_bit_exact_under_timm_names(
    case: str, exports: dict[str, dict[str, Any]]
) -> None:
    e = exports[case]
    saved = load_file(str(e["export"] / "model.safetensors"))
    ref = e["encoder"].state_dict()
    assert saved.keys() == ref.keys()
    assert not [k for k in saved if k.startswith("module.") or "_orig_mod" in k]
    for k, v in ref.items():
        assert saved[k].dtype == v.dtype and torch.equal(saved[k], v), k
    cfg = json.loads((e["export"] / "config.json").read_text())
    assert cfg["architecture"] == e["encoder"].sslcli_spec.timm_name
    assert cfg["pretrained_cfg"]["input_size"] == [3, e["size"], e["size"]]
    assert cfg["num_features"] == e["encoder"].num_features
    assert cfg["sslcli"]["which"] == (e["which"] or ("backbone"))


def test_constructor_arguments_of_method_and_alias_are_recorded(
    exports: dict[str, dict[str, Any]],
) -> None:
    """config.json's model_args rebuild MoCo v3's 12-head ViT-S and SimCLR v2's SK-ResNet
    (the features of plain timm are compared above); nothing else in the file is needed."""
    import timm

    from sslcli.backbones import ALIAS_KWARGS

    vit = json.loads((exports["moco-v3-vit-s"]["export"] / "config.json").read_text())
    assert vit["architecture"] == "vit_small_patch16_224"
    assert vit["model_args"]["num_heads"] == 12
    assert vit["model_args"]["depth"] == 2  # the user's argument, merged over the method's
    sk = json.loads((exports["sk-resnet"]["export"] / "config.json").read_text())
    assert sk["architecture"] == "skresnet50"
    for k, v in ALIAS_KWARGS["sk-resnet50-1x"].items():
        assert sk["model_args"][k] == ([1, 1, 1, 1] if k == "layers" else v), k
    assert sk["model_args"]["zero_init_last"] is True  # SimCLR v2's initialisation
    for cfg, case in ((vit, "moco-v3-vit-s"), (sk, "sk-resnet")):
        model = timm.create_model(cfg["architecture"], num_classes=0, **cfg["model_args"])
        ref = exports[case]["encoder"].state_dict()
        assert {k: v.shape for k, v in model.state_dict().items()} == {
            k: v.shape for k, v in ref.items()
        }
    heads = timm.create_model(vit["architecture"], num_classes=0, **vit["model_args"])
    assert all(b.attn.num_heads == 12 for b in heads.blocks)  # not only the same shapes


def test_small_stem_export_is_described_and_announced(
    exports: dict[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    e = exports["cifar-stem"]
    cfg = json.loads((e["export"] / "config.json").read_text())
    stem = cfg["sslcli"]["small_stem"]
    assert stem["conv"] == "conv1" and stem["stride"] == 1 and stem["maxpool"] == "identity"
    assert (e["export"] / "README.md").is_file()
    with torch.no_grad():
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(load_timm(e["export"])(x), e["encoder"](x))
    code, _, err = cli(["export", str(e["run"]), "--out", str(tmp_path / "again")], capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "conv1" in notes[0] and "maxpool" in notes[0]
    assert all(exports[c]["export"].joinpath("README.md").exists() is False
               for c in ("resnet", "vit", "byol-target"))  # fmt: skip


def test_heads_are_exported_separately(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", "byol", "test_resnet", 16)
    out = tmp_path / "export"
    code, _, err = cli(["export", str(run), "--out", str(out), "--with-heads"], capsys)
    assert code == 0, err
    heads = load_file(str(out / "heads.safetensors"))
    method = load_target(run).method
    state = method.state_dict()
    assert heads and all(torch.equal(v, state[k]) for k, v in heads.items())
    assert any(k.startswith("predictor.") for k in heads)
    assert not any("backbone." in k for k in heads)  # encoders are not heads
    model = load_file(str(out / "model.safetensors"))
    assert model.keys().isdisjoint(heads.keys())


def test_bare_export_uses_the_latest_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = tmp_path / "runs"
    old = make_run(runs / "simclr-old", small_stem=False)
    new = make_run(runs / "simclr-new", small_stem=False, seed=3)
    past = time.time() - 1000
    os.utime(old / "checkpoints" / "last.safetensors", (past, past))
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli(["export"], capsys)
    assert code == 0, err
    assert "most recent run" in err and (new / "export" / "model.safetensors").is_file()
    assert not (old / "export").exists()
    assert "local-dir:" in stdout
    # The exported directory is itself a target for ssl eval.
    code, stdout, err = cli(
        ["eval", "knn", str(new / "export"), "--json", "--no-cache", "--k", "20"], capsys
    )
    assert code == 0, err
    r = json.loads(stdout)
    assert r["kind"] == "export" and r["data"] == "digits" and set(r["knn"]) == {"20"}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export", "/nonexistent/run", "--out", "{tmp}/o"], "target not found"),
        (["export", "{run}", "--out", "{tmp}/o", "--which", "teacher"], "--which 'teacher'"),
        (["export", "{run}", "--out", "{file}"], "not a directory"),
        (["export", "{exported}", "--out", "{tmp}/o2"], "already an exported model"),
    ],
)
def test_export_errors_are_one_line(
    argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_run(tmp_path / "run", small_stem=False)
    exported = tmp_path / "exported"
    assert main(["export", str(run), "--out", str(exported)]) == 0
    capsys.readouterr()
    (tmp_path / "file").write_text("x")
    subst = {"{tmp}": str(tmp_path), "{run}": str(run), "{file}": str(tmp_path / "file"),
             "{exported}": str(exported)}  # fmt: skip
    argv = [a.replace("{tmp}", str(tmp_path)) if a.startswith("{tmp}") else subst.get(a, a)
            for a in argv]  # fmt: skip
    code, out, err = cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ssl: error: "), err
    assert needle in lines[0] and out == ""
