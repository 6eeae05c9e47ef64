"""What a report shows, read from a run and computed with its encoder (no HTML here).

Features come from :func:`sslcli.eval.cache.features` (the same features, and the same
cache, as ``ssl eval``), neighbours from :func:`sslcli.eval.neighbors.nearest`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sslcli.config import flatten_dotted
from sslcli.errors import DataError, ReportError, SSLError, TargetError
from sslcli.runs.layout import is_export_dir, latest_run, run_dir_of
from sslcli.runs.rebuild import Target

FIRST_CURVES = ("loss", "lr", "emb_std")
"""Logged scalars charted first; every other numeric one follows."""
NOT_CURVES = {"step", "epoch", "time"}


def resolve_run(run: str | Path | None) -> Path:
    """The run directory of ``run`` (a run, or a checkpoint inside one; None: the latest)."""
    if run is None:
        return latest_run()
    p = Path(run)
    if not p.exists():
        raise TargetError(f"run not found: {p}")
    if is_export_dir(p):
        raise ReportError(
            f"{p} is an exported model, which keeps no training record: give its run directory"
        )
    if p.is_file() or p.name == "checkpoints":
        d = run_dir_of(p if p.is_file() else p / "last.safetensors")
        if d is None:
            raise ReportError(f"{p} does not lie in a run directory")
        return d
    if not (p / "config.json").is_file():
        raise ReportError(f"{p} is not a run directory (no config.json)")
    return p


def differences_from_defaults(config: dict[str, Any]) -> list[tuple[str, Any, Any]] | None:
    """``(dotted key, value, default)`` where the run's config differs from what the
    method's defaults alone resolve to (None when the method is not installed)."""
    from sslcli import registry
    from sslcli.config import RUN_RECORDS, resolve

    m = config.get("method")
    name = m.get("name") if isinstance(m, dict) else m
    if not isinstance(name, str) or not name:
        return None
    try:
        run, _ = resolve(registry.load(name), [])
    except SSLError:
        return None
    settings = {k: v for k, v in config.items() if k not in RUN_RECORDS}  # not settings
    ours, base = flatten_dotted(settings), flatten_dotted(run.to_json_dict())
    skip = {"trainer.out"}  # always differs (the run's own directory), says nothing
    return [
        (k, ours.get(k), base.get(k))
        for k in sorted(set(ours) | set(base))
        if k not in skip and ours.get(k) != base.get(k)
    ]


def step_curves(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Every numeric scalar of the step records, by name: [(step, value)] sorted by step
    (a resumed run's repeated steps keep their latest value)."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        if "event" in r or "step" not in r:
            continue
        step = int(r["step"])
        for k, v in r.items():
            if k in NOT_CURVES or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if np.isfinite(v):
                by_key.setdefault(k, {})[step] = float(v)
    order = [k for k in FIRST_CURVES if k in by_key] + sorted(
        k for k in by_key if k not in FIRST_CURVES
    )
    return {k: sorted(by_key[k].items()) for k in order}


def pick_queries(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` fixed rows: a seeded order, taken round-robin over the classes so that as many
    classes as possible appear (unlabelled data: the first ``n`` of the seeded order)."""
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(labels))
    classes = sorted({int(c) for c in labels[order] if c >= 0})
    if not classes:
        return np.sort(order[:n])
    queues = {c: [int(i) for i in order if labels[i] == c] for c in classes}
    picked: list[int] = []
    while len(picked) < min(n, len(labels)) and any(queues.values()):
        for c in classes:
            if queues[c] and len(picked) < n:
                picked.append(queues[c].pop(0))
    return np.asarray(picked, dtype=np.int64)


@dataclass
class Neighbours:
    """Fixed query images and the training images the encoder finds nearest to each, with
    the features of the query split (the map's points)."""

    queries: Any
    """The split the queries come from: test, or train when the data has none."""
    refs: Any
    """The training split the neighbours come from."""
    split: str
    rows: np.ndarray
    """[Q] the query rows, :func:`pick_queries`."""
    nearest: np.ndarray
    """[Q, K] rows of ``refs``, most similar first."""
    similarities: np.ndarray
    features: np.ndarray
    """[N, D] the features of every image of ``queries``."""
    labels: np.ndarray
    """[N] the labels of ``queries`` (-1: unlabelled)."""


def neighbours(
    t: Target,
    spec: str,
    *,
    which: str | None,
    queries: int,
    top: int,
    device: Any,
    batch_size: int,
    num_workers: int,
    say: Callable[[str], None],
) -> Neighbours:
    """The ``top`` nearest training images of ``queries`` fixed images of ``spec``."""
    from sslcli.data.datasets import available_splits, open_dataset
    from sslcli.eval import cache as feature_cache
    from sslcli.eval.neighbors import nearest
    from sslcli.runtime import pick_dtype

    dev = device
    load_size = t.load_size if spec == t.dataset else t.image_size

    max_bad = float(t.config.get("data", {}).get("max_bad_fraction") or 0.01)

    def open_split(split: str) -> Any:
        # The labelled rows, as ssl eval opens them (so its cached features are reused);
        # all rows of data without labels.
        kw: dict[str, Any] = {"max_bad_fraction": max_bad}
        try:
            return open_dataset(spec, split, load_size, labelled_only=True, **kw)  # type: ignore[arg-type]
        except DataError as e:
            if "no labelled images" not in str(e):
                raise
            return open_dataset(spec, split, load_size, **kw)  # type: ignore[arg-type]

    def feats(ds: Any) -> np.ndarray:
        f = feature_cache.features(
            t, ds, which=which, device=dev, dtype=pick_dtype("auto", dev),
            batch_size=batch_size, num_workers=num_workers,
        )  # fmt: skip
        return f.features.numpy()

    say(f"report: features of {spec} (the ssl eval feature cache is reused)")
    train = open_split("train")
    q_split = "test" if "test" in available_splits(spec) else "train"
    test = open_split("test") if q_split == "test" else train
    f_train = feats(train)
    f_query = feats(test) if test is not train else f_train
    q_labels = test.labels.numpy()
    q_rows = pick_queries(q_labels, queries)
    k = min(top, len(train) - (1 if test is train else 0))
    nb, sims = nearest(
        f_query[q_rows], f_train, k, device=dev, self_rows=q_rows if test is train else None
    )
    return Neighbours(test, train, q_split, q_rows, nb, sims, f_query, q_labels)


def project_2d(
    feats: np.ndarray, method: str, points: int
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """``(rows, [n, 2] coordinates, how)`` of at most ``points`` fixed rows of ``feats``,
    L2-normalised (cosine geometry) and projected by PCA or t-SNE; None: too few rows."""
    n = feats.shape[0]
    rows = np.arange(n)
    if n > points:
        rows = np.sort(np.random.RandomState(0).permutation(n)[:points])
    x = feats[rows].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(rows) < 3:
        return None
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, (len(rows) - 1) / 3))
        xy = TSNE(2, init="pca", perplexity=perplexity, random_state=0).fit_transform(x)
        return rows, xy, f"t-SNE (perplexity {perplexity:g})"
    from sklearn.decomposition import PCA

    pca = PCA(2, random_state=0).fit(x)
    ev = pca.explained_variance_ratio_
    how = (
        f"PCA (the two components explain {100 * ev[0]:.1f}% + {100 * ev[1]:.1f}% "
        "of the variance)"
    )
    return rows, pca.transform(x), how
