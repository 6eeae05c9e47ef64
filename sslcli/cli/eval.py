"""``ssl eval knn|linear|finetune [TARGET]``: parse flags, call :func:`sslcli.eval.api.evaluate`."""

from __future__ import annotations

import json
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


# -- shared arguments -------------------------------------------------------------------------
TARGET = typer.Argument(
    None,
    help="Run directory, checkpoint file or exported directory (default: the most recent "
    "run under ./runs).",
    show_default=False,
)
DATA = typer.Option(
    None, "--data", "-d", help="'digits', DIR or format:DIR (default: the run's own data)."
)
WHICH = typer.Option(
    None,
    "--which",
    help="Representation to evaluate. Default: the method's evaluated encoder's pooled "
    "backbone feature (DINO: the teacher; CMC: both encoders). Others by name: student "
    "(DINO), key_backbone (MoCo v1/v2), momentum_backbone (MoCo v3), target_backbone "
    "(BYOL), l | ab (CMC), embedding (InstDisc, InvaSpread: the 128-d unit embedding "
    "their published kNN numbers use).",
)
FRACTION = typer.Option(
    None,
    "--label-fraction",
    help="Use a fixed, class-balanced fraction of the training labels (0.01, 0.1).",
)
DEVICE = typer.Option("auto", "--device", help="auto | cpu | cuda")
BATCH = typer.Option(256, "--batch-size", help="Images per feature-extraction batch.")
WORKERS = typer.Option(0, "--workers", help="Decoding workers for folder datasets.")
NO_CACHE = typer.Option(False, "--no-cache", help="Do not read or write the feature cache.")
CACHE_DIR = typer.Option(
    None, "--cache-dir", help="Feature cache (default: <run>/eval-cache or ~/.cache/sslcli)."
)
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table.")
NO_RECORD = typer.Option(
    False, "--no-record", help="Do not append the result to the run's metrics.jsonl."
)


def _run(protocol: str, **kwargs: Any) -> None:
    from sslcli.eval.api import evaluate

    as_json = kwargs.pop("as_json")
    no_record = kwargs.pop("no_record")
    no_cache = kwargs.pop("no_cache")
    result = evaluate(
        protocol,  # type: ignore[arg-type]
        record=not no_record,
        use_cache=not no_cache,
        say=lambda m: err.print(m, markup=False, highlight=False),
        **kwargs,
    )
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


@eval_app.command("knn")
def knn(
    target: str = TARGET,
    data: str = DATA,
    k: int = typer.Option(200, "--k", help="Neighbours (k=20, DINO's value, is reported too)."),
    temperature: float = typer.Option(0.07, "--temperature", help="Vote weight exp(sim/T)."),
    which: str = WHICH,
    label_fraction: float = FRACTION,
    device: str = DEVICE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    no_cache: bool = NO_CACHE,
    cache_dir: str = CACHE_DIR,
    as_json: bool = JSON,
    no_record: bool = NO_RECORD,
) -> None:
    """Weighted kNN on frozen features (cosine similarity, chunked)."""
    _run(
        "knn", target=target, data=data, k=k, temperature=temperature, which=which,
        label_fraction=label_fraction, device=device, batch_size=batch_size,
        num_workers=workers, no_cache=no_cache, cache_dir=cache_dir, as_json=as_json,
        no_record=no_record,
    )  # fmt: skip


@eval_app.command("linear")
def linear(
    target: str = TARGET,
    data: str = DATA,
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
    which: str = WHICH,
    label_fraction: float = FRACTION,
    device: str = DEVICE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    no_cache: bool = NO_CACHE,
    cache_dir: str = CACHE_DIR,
    as_json: bool = JSON,
    no_record: bool = NO_RECORD,
) -> None:
    """Linear probe on frozen features; hyper-parameters chosen without the test split."""
    _run(
        "linear", target=target, data=data, lrs=lr, wds=wd, epochs=epochs,
        train_batch_size=train_batch_size, holdout=holdout, augment=augment, seed=seed,
        which=which, label_fraction=label_fraction, device=device, batch_size=batch_size,
        num_workers=workers, no_cache=no_cache, cache_dir=cache_dir, as_json=as_json,
        no_record=no_record,
    )  # fmt: skip


@eval_app.command("finetune")
def finetune(
    target: str = TARGET,
    data: str = DATA,
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
    which: str = WHICH,
    label_fraction: float = FRACTION,
    device: str = DEVICE,
    batch_size: int = BATCH,
    workers: int = WORKERS,
    as_json: bool = JSON,
    no_record: bool = NO_RECORD,
) -> None:
    """Fine-tune the whole encoder with a new linear head (semi-supervised with
    --label-fraction)."""
    _run(
        "finetune", target=target, data=data, lrs=lr, wds=[wd], epochs=epochs,
        head_layer=head_layer,
        train_batch_size=train_batch_size, holdout=holdout, seed=seed, which=which,
        label_fraction=label_fraction, device=device, batch_size=batch_size,
        num_workers=workers, no_cache=True, as_json=as_json, no_record=no_record,
    )  # fmt: skip
