"""Installing the example third-party package makes its method appear and train, and its
own test suite (the loss, and sslcli.testing's method contract) passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin-barlow-twins"


def test_installed_example_plugin_is_listed_and_trains(tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-compile",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    ssl = [sys.executable, "-m", "sslcli"]
    listing = subprocess.run(
        ssl + ["methods"], env=env, capture_output=True, text=True, cwd=tmp_path, check=True
    ).stdout
    assert "barlow-twins" in listing and "sslcli-barlow-twins" in listing
    run = subprocess.run(
        ssl
        + [
            "train",
            "barlow-twins",
            "--backbone",
            "test_resnet",
            "--image-size",
            "16",
            "--batch-size",
            "8",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "trainer.max_steps=1",
            "--set",
            "trainer.eval_knn=false",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints" / "last.safetensors").is_file()
    # The projector width is sized from the run (a CPU run on a small network: 4x its
    # feature width, not the paper's 8192) and recorded.
    from sslcli.backbones import feature_dim, make_spec

    width = feature_dim(make_spec("test_resnet", 16).build())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["method"]
    assert saved["proj_dim"] == 4 * width
    # Its recipe files are installed with it and named without a path.
    shown = subprocess.run(
        ssl + ["methods", "barlow-twins"], env=env, capture_output=True, text=True,
        cwd=tmp_path, check=True,
    ).stdout  # fmt: skip
    assert "--config barlow-twins:NAME): imagenet" in shown
    code = (
        "from sslcli import api; _, r, c = api.resolve_config(config='barlow-twins:imagenet');"
        "print(r.backbone.name, r.trainer.batch_size, c.proj_dim)"
    )
    resolved = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path,
        check=True,
    ).stdout.split()  # fmt: skip
    assert resolved == ["resnet50", "2048", "8192"]
    # The plugin's own test suite passes against the installed package.
    own = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(EXAMPLE / "tests"),
            "--rootdir",
            str(EXAMPLE),
            "-o",
            "addopts=",
            "-m",
            "not slow",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert own.returncode == 0, own.stdout[-2000:] + own.stderr[-2000:]
