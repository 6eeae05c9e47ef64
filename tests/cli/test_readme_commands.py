"""Every command the README shows runs, so the documentation cannot drift from the tool.

The README's ``bash`` blocks are parsed (continuation lines joined, comments dropped) and
each ``ssl …`` line is run in order in one working directory, shrunk for a CPU: training
gets a tiny backbone (``test_resnet``, 16 px, batch 8, one step), evaluations one epoch,
``compare --methods`` one step per method without the linear probe. Placeholders are
filled with what a reader would have: ``runs/NAME-…`` with a tiny run of method NAME made
first, a checkpoint file name with the run's real one, a data path that does not exist
with a tiny data set of the same format, ``runs/*`` with the runs made so far. A command
asking for an encoder only some methods have (``--which student``) without a target gets
the DINO run. ``torchrun`` lines: the ``ssl`` arguments must plan with ``--dry-run``
(``--processes`` from the launcher's options; data that is not there is planned with
``--images``), and every file they name must exist. All in one process and one run
directory tree, to keep CI time small.
"""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import pytest

from sslcli.cli.app import main
from tests.helpers import write_cifar, write_image_tree

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# The method whose run a bare `ssl eval --which W` of the README is meant for (dino otherwise:
# its teacher/student).
WHICH_RUN = {"embedding": "instdisc"}

SHRINK_TRAIN = ["--backbone", "test_resnet", "--image-size", "16", "--batch-size", "8",
                "--set", "trainer.eval_knn=false", "--set", "trainer.log_every=1"]  # fmt: skip


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README's bash code blocks, in order."""
    cmds: list[str] = []
    lang: str | None = None
    pending = ""
    for line in text.splitlines():
        if line.startswith("```"):
            lang = None if lang is not None else line[3:].strip()
            continue
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()  # a comment (never inside quotes here)
        if not line and not pending:
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        cmds.append(" ".join((pending + line).split()))
        pending = ""
    return [c for c in cmds if c]


def test_parser_joins_continuations_and_drops_comments() -> None:
    text = "x\n```bash\n# a\nssl a \\\n    --b c   # note\nssl d\n```\n```python\nssl no\n```\n"
    assert readme_commands(text) == ["ssl a --b c", "ssl d"]


def test_every_file_the_readme_names_exists() -> None:
    text = README.read_text()
    paths = {m.rstrip(".,)`'\"") for m in re.findall(r"examples/[\w./-]+", text)}
    assert paths, "the README names no example file?"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def _fill_data(args: list[str], tmp: Path) -> list[str]:
    out = list(args)
    for i, a in enumerate(out[:-1]):
        if a not in ("--data", "-d"):
            continue
        value = out[i + 1]
        fmt, sep, path = value.partition(":")
        if not sep:
            fmt, path = "", value
        if value == "digits" or Path(path).expanduser().exists():
            continue
        if fmt.startswith("cifar"):
            out[i + 1] = f"{fmt}:{write_cifar(tmp / 'cifar', fmt, n_train=40, n_test=20)}"
        else:
            out[i + 1] = str(write_image_tree(tmp / "images", per_class=8))
    return out


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(args)
    cap = capsys.readouterr()
    assert code == 0, f"ssl {shlex.join(args)} -> exit {code}\n{cap.err[-2000:]}"


def _ssl_args(cmd: str, runs: dict[str, str], tmp: Path) -> list[str]:
    args = shlex.split(cmd)[1:]
    # runs/NAME-… and runs/* as a reader's shell would have them.
    filled: list[str] = []
    for a in args:
        m = re.fullmatch(r"runs/([\w-]+?)-…", a)
        if m:
            filled.append(runs[m.group(1)])
        elif "*" in a:
            filled.extend(sorted(glob.glob(a)) or [a])
        elif re.search(r"step-\d+\.safetensors$", a) and not Path(a).exists():
            ckpts = sorted(Path(a).parent.glob("step-*.safetensors"))
            filled.append(str(ckpts[-1]) if ckpts else a)
        else:
            filled.append(a)
    args = _fill_data(filled, tmp)
    sub = args[0] if args else ""
    if sub == "train":
        resume = "--resume" in args
        args += [*SHRINK_TRAIN, "--set", f"trainer.max_steps={2 if resume else 1}"]
    elif sub == "eval":
        if "--which" in args and not any(a.startswith("runs/") for a in args):
            args.insert(2, runs[_which_run(args)])
        if len(args) > 1 and args[1] in ("linear", "finetune"):
            args += ["--epochs", "1"]
    elif sub == "compare" and "--methods" in args:
        args += ["--backbone", "test_resnet", "--image-size", "16", "--batch-size", "8",
                 "--epochs", "1", "--max-steps", "1", "--no-linear"]  # fmt: skip
    return args


def _which_run(args: list[str]) -> str:
    return WHICH_RUN.get(args[args.index("--which") + 1], "dino")


def _torchrun(cmd: str, tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toks = [t for t in shlex.split(cmd) if t != "..."]
    opts: dict[str, str] = {}
    i = 1
    while i < len(toks):
        t = toks[i]
        if t == "-m":
            assert toks[i + 1] == "sslcli", cmd
            i += 2
            break
        if t == "--no-python":
            assert toks[i + 1] == "ssl", cmd
            i += 2
            break
        key, _, value = t.partition("=")
        opts[key] = value
        i += 1
    args = toks[i:]
    assert args, f"no ssl arguments in: {cmd}"
    for p in re.findall(r"examples/[\w./-]+", cmd):
        assert (ROOT / p).exists(), f"{cmd}: {p} does not exist"
    procs = int(opts.get("--nproc_per_node", "1") or 1) * int(opts.get("--nnodes", "1") or 1)
    args = [a if not a.startswith("examples/") else str(ROOT / a) for a in args]
    plan = [*args, "--dry-run", "--no-memory", "--processes", str(procs)]
    for k, a in enumerate(args[:-1]):
        if a in ("--data", "-d") and not Path(args[k + 1]).exists():
            plan += ["--images", "1281167"]
    _run(plan, capsys)


def test_every_readme_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cmds = readme_commands(README.read_text())
    ssl_cmds = [c for c in cmds if c.startswith("ssl ")]
    torchrun_cmds = [c for c in cmds if c.startswith("torchrun ")]
    assert len(ssl_cmds) >= 10 and torchrun_cmds
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # The runs the README's commands point at (runs/NAME-…), made first.
    names = sorted({m for c in ssl_cmds for m in re.findall(r"runs/([\w-]+?)-…", c)})
    which = {_which_run(shlex.split(c)) for c in ssl_cmds if "--which" in shlex.split(c)}
    runs: dict[str, str] = {}
    for name in names + sorted(which - set(names)):
        out = f"runs/{name}-readme"
        _run(["train", name, "--out", out, *SHRINK_TRAIN, "--set", "trainer.max_steps=1"],
             capsys)  # fmt: skip
        runs[name] = out
    for cmd in ssl_cmds:
        _run(_ssl_args(cmd, runs, tmp_path), capsys)
    for cmd in torchrun_cmds:
        _torchrun(cmd, tmp_path, capsys)
