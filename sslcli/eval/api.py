"""``evaluate``: kNN, linear probe or fine-tuning of a run, checkpoint or exported model.

One function behind ``ssl eval knn|linear|finetune`` and ``ssl compare``, asked by one
:class:`~sslcli.eval.options.EvalOptions`: it rebuilds the target
(:mod:`sslcli.runs.targets`), opens the labelled train/test splits (the run's own dataset
unless ``data`` names another), applies a label fraction, runs the protocol and appends the
result to the run's ``metrics.jsonl`` as ``{"event": "eval", ...}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sslcli.data.augment import ViewPipeline
from sslcli.data.datasets import available_splits, open_dataset
from sslcli.data.images import ImageDataset
from sslcli.errors import EvalError
from sslcli.eval import cache as feature_cache
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
    Batches,
    linear_probe,
    linear_probe_augmented,
)
from sslcli.eval.options import EvalOptions
from sslcli.eval.splits import RowSubset, label_subset
from sslcli.method import Method
from sslcli.runs import metrics
from sslcli.runs.rebuild import Target
from sslcli.runs.targets import load_target
from sslcli.runtime import autocast, eval_mode, pick_device, pick_dtype

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


def append_event(run_dir: Path, record: dict[str, Any]) -> None:
    """Append ``{"event": "eval", ...}`` to the run's metrics.jsonl (one line, flushed)."""
    metrics.append_record(run_dir / metrics.FILE, {"event": "eval", **record})


def evaluate(options: EvalOptions, *, say: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """Evaluate ``options.target`` (None: the most recent run under ./runs) with
    ``options.protocol``.

    Returns one JSON-able dict (what ``ssl eval --json`` prints). ``lrs``/``wds`` are swept
    on a held-out part of the training split.
    """
    o = options
    t0 = time.perf_counter()
    dev = pick_device(o.device)
    dtype = pick_dtype("auto", dev)
    t = _load(o, say)
    t.to(dev)
    spec, train, test = open_eval_data(t, o.data, say)
    n_classes = num_classes_of(train, test)
    rows = label_subset(train.labels, o.label_fraction) if o.label_fraction else None
    cdir = Path(o.cache_dir) if o.cache_dir is not None else None

    def feats(ds: ImageDataset) -> feature_cache.CachedFeatures:
        return feature_cache.features(
            t, ds, which=o.which, device=dev, dtype=dtype, batch_size=o.batch_size,
            num_workers=o.num_workers, cache_dir=cdir, use_cache=o.use_cache,
        )  # fmt: skip

    out: dict[str, Any] = {
        "protocol": o.protocol,
        "target": str(t.path),
        "kind": t.kind,
        "checkpoint": str(t.weights),
        "step": t.step,
        "method": t.method_name,
        "which": o.which,
        "data": spec,
        "label_fraction": o.label_fraction,
        "num_classes": n_classes,
    }
    if o.protocol == "finetune":
        ep = o.epochs or default_epochs(o.label_fraction)
        wd = (o.wds or [0.0])[0]
        res_ft = finetune(
            t, train, test, n_classes, rows=rows, which=o.which, head_layer=o.head_layer,
            lrs=list(o.lrs or ()), weight_decay=wd, epochs=ep,
            batch_size=o.train_batch_size or 256, holdout=o.holdout, device=dev, dtype=dtype,
            seed=o.seed, num_workers=o.num_workers,
        )  # fmt: skip
        out.update(res_ft.to_json(), wd=wd, head_layer=o.head_layer)
    else:
        tr, te = feats(train), feats(test)
        x, y = tr.features, tr.labels
        if rows is not None:
            x, y = x[rows], y[rows]
        if o.protocol == "knn":
            out.update(_knn(o, x, y, te, n_classes, dev))
        else:
            fit_ds = train if rows is None else RowSubset(train, rows)
            out.update(_linear(o, t, fit_ds, x, y, te, n_classes, dev, dtype))
        out["feature_cache"] = tr.status
    out["wall_s"] = time.perf_counter() - t0
    out["time"] = time.time()
    if o.record and t.run_dir is not None:
        append_event(t.run_dir, out)
    return out


def _load(o: EvalOptions, say: Callable[[str], None]) -> Target:
    """The target to evaluate, checked against the options that depend on its method."""
    if isinstance(o.target, Target):
        t = o.target
    else:
        t = load_target(o.target)
        if o.target is None:
            say(f"target: {t.path} (the most recent run under ./runs)")
    t.check_which(o.which)
    if o.head_layer is not None:
        m = t.method
        if o.which is not None or m is None or type(m).finetune_encoder is Method.finetune_encoder:
            raise EvalError(
                "--head-layer needs a run or checkpoint of a method that fine-tunes from its "
                "projection head (simclr-v2), without --which"
            )
    return t


def _knn(
    o: EvalOptions, x: Tensor, y: Tensor, te: feature_cache.CachedFeatures, n_classes: int,
    dev: torch.device,
) -> dict[str, Any]:  # fmt: skip
    k = o.k
    ks = (k,) if k == DINO_K else (k, DINO_K)
    accs = knn_accuracies(x, y, te.features, te.labels, ks, o.temperature, n_classes, device=dev)
    return {
        "top1": accs[k], "k": k, "temperature": o.temperature,
        "knn": {str(kk): accs[kk] for kk in ks}, "train_images": int(y.shape[0]),
        "test_images": int(te.labels.shape[0]),
    }  # fmt: skip


def _linear(
    o: EvalOptions, t: Target, fit_ds: ImageDataset, x: Tensor, y: Tensor,
    te: feature_cache.CachedFeatures, n_classes: int, dev: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, Any]:  # fmt: skip
    ep = o.epochs or DEFAULT_EPOCHS
    bs = o.train_batch_size or DEFAULT_BATCH
    lrs, wds = list(o.lrs or ()), list(o.wds or ())
    if not o.augment:
        res = linear_probe(
            x, y, te.features, te.labels, n_classes, lrs=lrs, wds=wds,
            epochs=ep, batch_size=bs, holdout=o.holdout, seed=o.seed, device=dev,
        )  # fmt: skip
    else:
        batches_for = _augmented_batches(t, o.which, fit_ds, bs, dev, dtype, o.seed, o.num_workers)
        res = linear_probe_augmented(
            batches_for, x, y, te.features, te.labels, n_classes, lrs=lrs,
            wds=wds, epochs=ep, batch_size=bs, holdout=o.holdout, device=dev,
        )  # fmt: skip
    return res.to_json()
