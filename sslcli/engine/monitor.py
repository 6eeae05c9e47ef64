"""Watching the representation while it trains: kNN top-1 before the first step and after
the last (:mod:`sslcli.engine.knn_monitor`), and the online linear probe
(``trainer.online_probe``).

The probe reads the representation that kNN, the evaluators and the export use
(``method.embed``: the teacher for DINO, both encoders for CMC), on the batch's images
before augmentation, in eval mode and without gradients, so the encoder, its BatchNorm
statistics and every random stream are exactly as without the probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sslcli.config import RunConfig
from sslcli.data.datasets import available_splits, open_dataset
from sslcli.data.images import ImageDataset, LabelledSubset
from sslcli.engine.knn_monitor import KnnResult, knn_monitor
from sslcli.eval.features import eval_transform
from sslcli.eval.online_probe import OnlineProbe
from sslcli.method import Method
from sslcli.nn import dist
from sslcli.runtime import autocast, eval_mode


@dataclass(frozen=True)
class Evaluation:
    """The run's evaluation at one step (None where it does not apply, and on ranks > 0
    for kNN)."""

    knn_top1: float | None
    probe_test_top1: float | None = None


@dataclass
class Monitor:
    """kNN and the online probe of one run; every process calls it at the same points."""

    run: RunConfig
    method: Method
    dataset: ImageDataset
    device: torch.device
    dtype: torch.dtype
    load_size: int
    num_workers: int
    """Loader workers for image files (kNN's feature extraction)."""
    channels_last: bool
    say: Callable[[str], None]
    probe: OnlineProbe | None = None
    probe_norm: tuple[Tensor, Tensor] | None = None

    def make_probe(self) -> OnlineProbe | None:
        """Build the online linear probe (``trainer.online_probe``) when the data has
        labels; None otherwise."""
        t = self.run.trainer
        if not t.online_probe:
            return None
        classes = self.dataset.classes
        if classes is None or len(classes) < 2 or not bool((self.dataset.labels >= 0).any()):
            self.say(f"trainer.online_probe: {self.run.data.dataset} has no labels; no probe")
            return None
        spec = self.method.views()[0]
        if spec.normalize:
            self.probe_norm = (
                torch.tensor(spec.mean, device=self.device),
                torch.tensor(spec.std, device=self.device),
            )
        size = self.run.data.image_size
        with torch.no_grad(), eval_mode(self.method):
            dim = self.method.embed(torch.zeros(2, 3, size, size, device=self.device)).shape[1]
        self.probe = OnlineProbe(dim, len(classes), lr=t.online_probe_lr).to(self.device)
        return self.probe

    def probe_step(self, images: Tensor, labels: Tensor) -> None:
        """One probe update on the batch's unaugmented images."""
        assert self.probe is not None
        if images.dtype != torch.uint8:  # float [0, 1] input: eval_transform expects 0..255
            images = images * 255
        size = self.run.data.image_size
        if self.probe_norm is None:
            x = eval_transform(images, size, normalize=False)
        else:
            x = eval_transform(images, size, True, *self.probe_norm)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), eval_mode(self.method), autocast(self.device, self.dtype):
            feats = self.method.embed(x)
        self.probe.step(feats.float(), labels)

    def probe_epoch(self) -> dict[str, float]:
        """The probe's accuracy over the epoch's steps (a resumed epoch included), reset."""
        if self.probe is None:
            return {}
        stats = self.probe.compute()
        self.probe.reset()
        return stats

    def evaluate(self, step: int) -> Evaluation:
        """kNN top-1 and, once the probe has trained (``step > 0``), its test top-1 on the
        kNN's query features."""
        res = self.knn()
        if res is None:
            return Evaluation(None)
        probe_test = None
        if self.probe is not None and step > 0:
            keep = res.query_labels >= 0
            pred = self.probe.predict(res.queries[keep]).argmax(1)
            hits = torch.stack([(pred == res.query_labels[keep]).sum(), keep.sum()]).double()
            right, n = dist.all_reduce_sum(hits).tolist()
            probe_test = right / max(1.0, n)
        return Evaluation(res.top1 if dist.is_main() else None, probe_test)

    def knn(self) -> KnnResult | None:
        """kNN on the labelled test split, or None (no labels, one class, no test split).

        The reference set is the labelled part of the training split only (STL-10's
        100,000 unlabelled images are never encoded for it), at most
        ``trainer.knn_max_train`` images of it. Every process takes part (see
        :mod:`sslcli.engine.knn_monitor`): the decision to run depends only on the config
        and the data, so all of them take it alike.
        """
        t = self.run.trainer
        classes = self.dataset.classes
        if not t.eval_knn or classes is None:
            return None
        if len(classes) < 2:
            # Every neighbour votes for the one class: 100% whatever the encoder learnt.
            self.say(f"kNN skipped: {self.run.data.dataset} has a single class, so its "
                     "accuracy would be 100% for any encoder")  # fmt: skip
            return None
        if "test" not in available_splits(self.run.data.dataset):
            return None
        train: ImageDataset = self.dataset
        if not bool((train.labels >= 0).all()):
            if not bool((train.labels >= 0).any()):
                return None
            train = LabelledSubset(train)
        test = open_dataset(self.run.data.dataset, "test", self.load_size)
        spec = self.method.views()[0]
        kw: dict[str, Any] = dict(
            size=self.run.data.image_size, normalize=spec.normalize,
            mean=spec.mean, std=spec.std,
        )  # fmt: skip
        if not train.in_memory:
            kw["num_workers"] = self.num_workers
        with eval_mode(self.method), autocast(self.device, self.dtype):
            return knn_monitor(
                self.method.embed, self.method, train, test, k=t.knn_k,
                temperature=t.knn_temperature, num_classes=len(classes),
                max_train=t.knn_max_train, seed=t.seed, device=self.device, extract_kw=kw,
            )  # fmt: skip
