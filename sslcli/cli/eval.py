"""``ssl eval knn|linear|finetune [TARGET]``: parse flags into :class:`sslcli.api.EvalOptions`,
call :func:`sslcli.api.evaluate`, print the result."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from typing import Any

import typer

from sslcli.cli.console import err, out

eval_app = typer.Typer(
    name="eval",
    help="Evaluate a run, a checkpoint or an exported model: knn | linear | finetune. "
    "What is evaluated by default is the method's encoder's pooled backbone feature (DINO: "
    "the teacher); --which picks another representation, e.g. 'embedding', the 128-d unit "
    "embedding InstDisc's and InvaSpread's published kNN numbers use.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


def _flag(name: str, annotation: type, default: Any) -> inspect.Parameter:
    return inspect.Parameter(
        name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation
    )


# -- the flags every protocol takes: TARGET and --data first, the rest after its own -----------
HEAD = [
    _flag("target", str, typer.Argument(
        None,
        help="Run directory, checkpoint file or exported directory (default: the most recent "
        "run under ./runs).",
        show_default=False,
    )),
    _flag("data", str, typer.Option(
        None, "--data", "-d", help="'digits', DIR or format:DIR (default: the run's own data)."
    )),
]  # fmt: skip
TAIL = [
    _flag("which", str, typer.Option(
        None,
        "--which",
        help="Representation to evaluate. Default: the method's evaluated encoder's pooled "
        "backbone feature (DINO: the teacher; CMC: both encoders). Others by name: student "
        "(DINO), key_backbone (MoCo v1/v2), momentum_backbone (MoCo v3), target_backbone "
        "(BYOL), l | ab (CMC), embedding (InstDisc, InvaSpread: the 128-d unit embedding "
        "their published kNN numbers use).",
    )),
    _flag("label_fraction", float, typer.Option(
        None,
        "--label-fraction",
        help="Use a fixed, class-balanced fraction of the training labels (0.01, 0.1).",
    )),
    _flag("device", str, typer.Option("auto", "--device", help="auto | cpu | cuda")),
    _flag("batch_size", int, typer.Option(
        256, "--batch-size", help="Images per feature-extraction batch."
    )),
    _flag("workers", int, typer.Option(
        0, "--workers", help="Decoding workers for folder datasets."
    )),
    _flag("no_cache", bool, typer.Option(
        False, "--no-cache", help="Do not read or write the feature cache."
    )),
    _flag("cache_dir", str, typer.Option(
        None, "--cache-dir", help="Feature cache (default: <run>/eval-cache or ~/.cache/sslcli)."
    )),
    _flag("as_json", bool, typer.Option(
        False, "--json", help="Print one JSON object on stdout instead of a table."
    )),
    _flag("no_record", bool, typer.Option(
        False, "--no-record", help="Do not append the result to the run's metrics.jsonl."
    )),
]  # fmt: skip
CACHE_FLAGS = ("no_cache", "cache_dir")


def _command(
    protocol: str, *, cache: bool = True
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register the decorated function as ``ssl eval PROTOCOL``.

    It declares only the protocol's own flags and returns them as
    :class:`~sslcli.api.EvalOptions` fields; the command's signature (which typer reads) is
    TARGET and --data, those flags, then the shared ones (the cache flags only with
    ``cache``: fine-tuning reads no cached features)."""

    def decorate(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        tail = [p for p in TAIL if cache or p.name not in CACHE_FLAGS]
        own = list(inspect.signature(fn, eval_str=True).parameters.values())
        params = [*HEAD, *own, *tail]

        def command(**flags: Any) -> None:
            shared = {p.name: flags.pop(p.name) for p in (*HEAD, *tail)}
            _run(protocol, fn(**flags), **shared)

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        eval_app.command(protocol)(command)
        return fn

    return decorate


def _run(
    protocol: str,
    own: dict[str, Any],
    *,
    workers: int,
    as_json: bool,
    no_record: bool,
    no_cache: bool = True,
    **shared: Any,
) -> None:
    # ``no_cache`` defaults to True for fine-tuning, which has no cache flags (it trains on
    # fresh views, never on cached features).
    from sslcli import api

    options = api.EvalOptions(
        protocol=protocol, num_workers=workers, use_cache=not no_cache, record=not no_record,
        **shared, **own,
    )  # fmt: skip
    result = api.evaluate(options, say=lambda m: err.print(m, markup=False, highlight=False))
    if as_json:
        out.out(json.dumps(result), highlight=False)
        return
    show(result)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def show(r: dict[str, Any]) -> None:
    """A result as rich tables on stdout: the headline numbers, then the selection."""
    from rich.table import Table

    t = Table(title=f"{r['protocol']} evaluation", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("target", f"{r['target']} ({r['kind']}, step {r.get('step')})")
    t.add_row("method / encoder", f"{r.get('method') or '?'} / {r.get('which') or 'default'}")
    frac = r.get("label_fraction")
    labels = f"{100 * frac:g}% of the labels" if frac else "all labels"
    t.add_row("data", f"{r['data']} ({labels}; {r.get('train_images')} train, "
                      f"{r.get('test_images')} test images)")  # fmt: skip
    if r["protocol"] == "knn":
        for k, acc in r["knn"].items():
            t.add_row(f"top-1, k={k}", f"{_pct(acc)} (weighted, T={r['temperature']})")
    else:
        t.add_row("top-1", _pct(r.get("top1")))
        t.add_row("top-5", _pct(r.get("top5")))
        extra = f", wd {r['wd']}" if "wd" in r else ""
        t.add_row("chosen", f"lr {r['lr']}{extra} ({r['epochs']} epochs, batch {r['batch_size']}"
                            + (", augmented" if r.get("augment") else "") + ")")  # fmt: skip
    if r.get("feature_cache"):
        t.add_row("feature cache", r["feature_cache"])
    t.add_row("wall time", f"{r['wall_s']:.1f} s")
    out.print(t)
    sel = r.get("selection") or []
    if len(sel) > 1:
        s = Table(title=f"held-out part of train ({r.get('holdout_images')} images)",
                  title_justify="left")  # fmt: skip
        cols = [c for c in ("lr", "wd", "holdout_top1", "holdout_loss") if c in sel[0]]
        for c in cols:
            s.add_column(c.replace("holdout_", "held-out "), justify="right")
        for c in sel:
            chosen = c["lr"] == r["lr"] and c.get("wd", r.get("wd")) == r.get("wd")
            cells = [
                _pct(c[k]) if k == "holdout_top1" else "-" if c[k] is None else f"{c[k]:.4g}"
                for k in cols
            ]
            s.add_row(*cells, style="bold" if chosen else None)
        out.print(s)


@_command("knn")
def knn(
    k: int = typer.Option(200, "--k", help="Neighbours (k=20, DINO's value, is reported too)."),
    temperature: float = typer.Option(0.07, "--temperature", help="Vote weight exp(sim/T)."),
) -> dict[str, Any]:
    """Weighted kNN on frozen features (cosine similarity, chunked)."""
    return {"k": k, "temperature": temperature}


@_command("linear")
def linear(
    lr: str = typer.Option(
        "0.01,0.03,0.1,0.3,1.0",
        "--lr",
        help="Base learning rate(s) per 256 images; several are chosen between on a "
        "held-out part of the training split.",
    ),
    wd: str = typer.Option("0", "--wd", help="Weight decay(s), swept like --lr."),
    epochs: int = typer.Option(100, "--epochs"),
    train_batch_size: int = typer.Option(256, "--train-batch-size", help="Classifier batch."),
    holdout: float = typer.Option(0.1, "--holdout", help="Fraction of train held out."),
    augment: bool = typer.Option(
        False,
        "--augment",
        help="Run the encoder on a new random crop + flip of each image every epoch (the "
        "papers' protocol; slower) instead of training on cached features.",
    ),
    seed: int = typer.Option(0, "--seed"),
) -> dict[str, Any]:
    """Linear probe on frozen features; hyper-parameters chosen without the test split."""
    return {
        "lrs": lr, "wds": wd, "epochs": epochs, "train_batch_size": train_batch_size,
        "holdout": holdout, "augment": augment, "seed": seed,
    }  # fmt: skip


@_command("finetune", cache=False)
def finetune(
    lr: str = typer.Option(
        "0.05", "--lr", help="Base learning rate(s) per 256 images (SimCLR: 0.05)."
    ),
    wd: float = typer.Option(0.0, "--wd", help="Weight decay (SimCLR fine-tunes without)."),
    epochs: int = typer.Option(
        None, "--epochs", help="Default: 60 with <= 1% of the labels, else 30 (SimCLR)."
    ),
    train_batch_size: int = typer.Option(256, "--train-batch-size"),
    holdout: float = typer.Option(0.1, "--holdout", help="Fraction held out to choose --lr."),
    seed: int = typer.Option(0, "--seed"),
    head_layer: int = typer.Option(
        None,
        "--head-layer",
        help="SimCLR v2: fine-tune from this projection-head layer (0 = backbone only; "
        "default: the method's method.finetune_layer, 1).",
    ),
) -> dict[str, Any]:
    """Fine-tune the whole encoder with a new linear head (semi-supervised with
    --label-fraction)."""
    return {
        "lrs": lr, "wds": [wd], "epochs": epochs, "train_batch_size": train_batch_size,
        "holdout": holdout, "seed": seed, "head_layer": head_layer,
    }  # fmt: skip
