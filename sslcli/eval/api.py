"""``evaluate``: kNN, linear probe or fine-tuning of a run, checkpoint or exported model.

One function behind ``ssl eval knn|linear|finetune`` and ``ssl compare``: it rebuilds the
target (:mod:`sslcli.runs.targets`), opens the labelled train/test splits (the run's own dataset
unless ``data`` names another), applies a label fraction, runs the protocol and appends the
result to the run's ``metrics.jsonl`` as ``{"event": "eval", ...}``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from sslcli.data.augment import ViewPipeline
from sslcli.data.datasets import available_splits, open_dataset
from sslcli.data.images import ImageDataset
from sslcli.errors import EvalError
from sslcli.eval import cache as feature_cache
from sslcli.eval.finetune import DEFAULT_LR as DEFAULT_FT_LR
from sslcli.eval.finetune import (
    default_epochs,
    finetune,
    ordered_batches,
    steps_per_epoch,
    train_view,
)
from sslcli.eval.knn import knn_accuracies
from sslcli.eval.linear import (
    DEFAULT_BATCH,
    DEFAULT_EPOCHS,
    DEFAULT_LRS,
    Batches,
    linear_probe,
    linear_probe_augmented,
)
from sslcli.eval.splits import RowSubset, label_subset
from sslcli.runs.targets import Target, load_target
from sslcli.runtime import autocast, eval_mode, pick_device, pick_dtype

Protocol = Literal["knn", "linear", "finetune"]
PROTOCOLS: tuple[str, ...] = ("knn", "linear", "finetune")
DINO_K = 20
"""kNN is also reported at k = 20, DINO's setting, next to the requested k (200: InstDisc)."""


def _quiet(msg: str) -> None:
    pass


def open_eval_data(
    target: Target, data: str | None, say: Callable[[str], None] = _quiet
) -> tuple[str, ImageDataset, ImageDataset]:
    """``(spec, labelled train split, test split)`` for ``target`` (its own data by default)."""
    own = target.dataset
    if data is None:
        if own is None:
            raise EvalError(
                f"{target.describe()} does not record its training data: give --data "
                "('digits', DIR or format:DIR)"
            )
        data = own
        say(f"data: {data} (the data {target.method_name or 'the encoder'} was trained on)")
    # Decode as training did (its load_size) for its own data; other data at the input size.
    load_size = target.load_size if data == own else target.image_size
    splits = available_splits(data)
    if "test" not in splits:
        raise EvalError(
            f"{data} has no labelled test split; evaluation reports accuracy on one "
            "(ImageFolder: a val/ or test/ folder of class folders next to train/)"
        )
    train = open_dataset(data, "train", load_size, labelled_only=True)
    test = open_dataset(data, "test", load_size, labelled_only=True)
    if train.classes is None or not bool((train.labels >= 0).any()):
        raise EvalError(f"{data} has no labelled training images")
    if len(train.classes) < 2:
        raise EvalError(
            f"{data} has a single class: any encoder would score 100%, which measures nothing"
        )
    return data, train, test


def num_classes_of(train: ImageDataset, test: ImageDataset) -> int:
    if train.classes:
        return len(train.classes)
    return int(max(train.labels.max(), test.labels.max())) + 1


def _augmented_batches(
    target: Target,
    which: str | None,
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    seed: int,
    num_workers: int,
) -> Callable[[Tensor], tuple[Batches, int]]:
    """``rows -> (batches, steps)``: frozen-encoder features of a fresh random resized crop +
    flip of every training image ``rows`` each epoch (the linear protocol's augmentation)."""
    pipeline = ViewPipeline([train_view(target)])
    embed = target.embedder(which)
    module = target.eval_module()

    def batches_for(rows: Tensor) -> tuple[Batches, int]:
        n = int(rows.numel())

        def batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = rows[torch.randperm(n, generator=g)]
            gen = torch.Generator(device=device).manual_seed(seed * 7919 + epoch)
            for images, labels in ordered_batches(dataset, order, batch_size, num_workers):
                (x,) = pipeline(images.to(device, non_blocking=True), gen)
                with torch.no_grad(), eval_mode(module), autocast(device, dtype):
                    f = embed(x)
                yield f.float(), labels.to(device).long()

        return batches, steps_per_epoch(n, batch_size)

    return batches_for


def _parse_floats(values: Sequence[float] | str | None, default: Sequence[float]) -> list[float]:
    if values is None:
        return list(default)
    if isinstance(values, str):
        try:
            return [float(v) for v in values.split(",") if v.strip()]
        except ValueError as e:
            raise EvalError(f"expected comma-separated numbers, got {values!r}") from e
    return [float(v) for v in values]


def append_event(run_dir: Path, record: dict[str, Any]) -> None:
    """Append ``{"event": "eval", ...}`` to the run's metrics.jsonl (one line, flushed)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    from sslcli.fsutil import append_line

    append_line(run_dir / "metrics.jsonl", json.dumps(clean({"event": "eval", **record})))


def evaluate(
    protocol: Protocol,
    target: str | Path | Target | None = None,
    *,
    data: str | None = None,
    which: str | None = None,
    label_fraction: float | None = None,
    device: str = "auto",
    batch_size: int = 256,
    num_workers: int = 0,
    use_cache: bool = True,
    cache_dir: str | Path | None = None,
    k: int = 200,
    temperature: float = 0.07,
    lrs: Sequence[float] | str | None = None,
    wds: Sequence[float] | str | None = None,
    epochs: int | None = None,
    train_batch_size: int | None = None,
    holdout: float = 0.1,
    augment: bool = False,
    head_layer: int | None = None,
    seed: int = 0,
    record: bool = True,
    say: Callable[[str], None] = _quiet,
) -> dict[str, Any]:
    """Evaluate ``target`` (None: the most recent run under ./runs) with ``protocol``.

    Returns one JSON-able dict (what ``ssl eval --json`` prints). ``lrs``/``wds`` are
    lists (or comma-separated strings) swept on a held-out part of the training split.
    """
    if protocol not in PROTOCOLS:
        raise EvalError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise EvalError(f"--label-fraction must be in (0, 1], got {label_fraction}")
    if not 0 < holdout < 1:
        raise EvalError(f"--holdout must be in (0, 1), got {holdout}")
    if k < 1 or temperature <= 0:
        raise EvalError("--k must be >= 1 and --temperature > 0")
    # Every option is checked before anything is loaded: a typo costs no model build.
    lr_list = _parse_floats(lrs, DEFAULT_LRS if protocol == "linear" else (DEFAULT_FT_LR,))
    wd_list = _parse_floats(wds, (0.0,))
    if protocol == "finetune" and len(wd_list) != 1:
        raise EvalError("fine-tuning takes one --wd value")
    if head_layer is not None and (protocol != "finetune" or head_layer < 0):
        raise EvalError("--head-layer is a layer number >= 0 for fine-tuning only")
    t0 = time.perf_counter()
    dev = pick_device(device)
    dtype = pick_dtype("auto", dev)
    if isinstance(target, Target):
        t = target
    else:
        t = load_target(target)
        if target is None:
            say(f"target: {t.path} (the most recent run under ./runs)")
    t.check_which(which)
    if head_layer is not None:
        from sslcli.method import Method

        m = t.method
        if which is not None or m is None or type(m).finetune_encoder is Method.finetune_encoder:
            raise EvalError(
                "--head-layer needs a run or checkpoint of a method that fine-tunes from its "
                "projection head (simclr-v2), without --which"
            )
    t.to(dev)
    spec, train, test = open_eval_data(t, data, say)
    n_classes = num_classes_of(train, test)
    rows = label_subset(train.labels, label_fraction) if label_fraction else None
    cdir = Path(cache_dir) if cache_dir is not None else None

    def feats(ds: ImageDataset) -> feature_cache.CachedFeatures:
        return feature_cache.features(
            t, ds, which=which, device=dev, dtype=dtype, batch_size=batch_size,
            num_workers=num_workers, cache_dir=cdir, use_cache=use_cache,
        )  # fmt: skip

    out: dict[str, Any] = {
        "protocol": protocol,
        "target": str(t.path),
        "kind": t.kind,
        "checkpoint": str(t.weights),
        "step": t.step,
        "method": t.method_name,
        "which": which,
        "data": spec,
        "label_fraction": label_fraction,
        "num_classes": n_classes,
    }
    if protocol == "knn":
        tr, te = feats(train), feats(test)
        x, y = tr.features, tr.labels
        if rows is not None:
            x, y = x[rows], y[rows]
        ks = (k,) if k == DINO_K else (k, DINO_K)
        accs = knn_accuracies(x, y, te.features, te.labels, ks, temperature, n_classes, device=dev)
        out.update(
            top1=accs[k], k=k, temperature=temperature,
            knn={str(kk): accs[kk] for kk in ks}, train_images=int(y.shape[0]),
            test_images=int(te.labels.shape[0]), feature_cache=tr.status,
        )  # fmt: skip
    elif protocol == "linear":
        ep = epochs or DEFAULT_EPOCHS
        bs = train_batch_size or DEFAULT_BATCH
        tr, te = feats(train), feats(test)
        x, y = tr.features, tr.labels
        if rows is not None:
            x, y = x[rows], y[rows]
        if not augment:
            res = linear_probe(
                x, y, te.features, te.labels, n_classes, lrs=lr_list, wds=wd_list,
                epochs=ep, batch_size=bs, holdout=holdout, seed=seed, device=dev,
            )  # fmt: skip
        else:
            fit_ds = train if rows is None else RowSubset(train, rows)
            batches_for = _augmented_batches(t, which, fit_ds, bs, dev, dtype, seed, num_workers)
            res = linear_probe_augmented(
                batches_for, x, y, te.features, te.labels, n_classes, lrs=lr_list,
                wds=wd_list, epochs=ep, batch_size=bs, holdout=holdout, device=dev,
            )  # fmt: skip
        out.update(res.to_json(), feature_cache=tr.status)
    else:
        ep = epochs or default_epochs(label_fraction)
        res_ft = finetune(
            t, train, test, n_classes, rows=rows, which=which, head_layer=head_layer, lrs=lr_list,
            weight_decay=wd_list[0], epochs=ep, batch_size=train_batch_size or 256,
            holdout=holdout, device=dev, dtype=dtype, seed=seed, num_workers=num_workers,
        )  # fmt: skip
        out.update(res_ft.to_json(), wd=wd_list[0], head_layer=head_layer)
    out["wall_s"] = time.perf_counter() - t0
    out["time"] = time.time()
    if record and t.run_dir is not None:
        append_event(t.run_dir, out)
    return out
