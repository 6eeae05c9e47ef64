"""An online linear probe: a classifier trained during self-supervised training on
stop-gradient features, so accuracy can be watched epoch by epoch without a separate
evaluation pass.

SimCLR's official code offers the same (``lineareval_while_pretraining``: a supervised
linear head on ``tf.stop_gradient`` of the encoder output, trained jointly but without
influencing the representation). The probe here is self-contained: it has its own
optimiser state (SGD with momentum, written out as buffers), so ``state_dict()`` holds
everything and a resumed run continues bit for bit. It never touches the method's
gradients: features are detached and the probe differentiates only its own parameters.

Usage from a training loop::

    probe = OnlineProbe(feature_dim(backbone), num_classes)     # moved to the device
    ...
    loss = probe.step(features, labels)      # every step; rows with label -1 are ignored
    ...
    stats = probe.compute()                  # at an epoch's end: {"probe_top1", ...}
    probe.reset()
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.eval.linear import LinearHeads
from sslcli.nn import dist


class OnlineProbe(nn.Module):
    """Linear classifier on batch-normalised, detached features, with running accuracy.

    The features pass a ``BatchNorm1d(affine=False)`` (as in the offline linear probe of
    :mod:`sslcli.eval.linear`), so one learning rate suits every backbone. Under
    distributed training the probe's gradients and its counts are averaged / summed over
    processes, so all copies stay identical.
    """

    def __init__(
        self,
        feature_dim: int,
        num_classes: int,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an online probe needs at least 2 classes, got {num_classes}")
        self.heads = LinearHeads(
            feature_dim, num_classes, [lr], [weight_decay], norm="bn", momentum=momentum
        )
        self.register_buffer("correct", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))
        self.register_buffer("loss_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))

    def step(self, features: Tensor, labels: Tensor) -> Tensor:
        """One SGD step on ``(features, labels)``; returns the (detached) mean loss.

        Rows labelled -1 (unlabelled images) take part in the batch-norm statistics but not
        in the loss. No host synchronisation happens here.
        """
        x = features.detach().float()
        y = labels.to(x.device).long()
        mask = y >= 0
        self.heads.train()
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            logits = self.heads(x)[0]
            per = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
            n = mask.sum()
            loss = (per * mask).sum() / n.clamp_min(1)
            grads = torch.autograd.grad(loss, [self.heads.weight, self.heads.bias])
        for p, g in zip((self.heads.weight, self.heads.bias), grads, strict=True):
            p.grad = dist.all_reduce_mean(g)
        self.heads.sgd_step(1.0)
        with torch.no_grad():
            hit = ((logits.argmax(1) == y) & mask).sum()
            self.correct += hit
            self.seen += n
            self.loss_sum += loss.detach().double() * n
            self.batches += 1
        return loss.detach()

    @torch.no_grad()
    def predict(self, features: Tensor) -> Tensor:
        """Class scores with the running batch-norm statistics (for held-out images)."""
        self.heads.eval()
        return self.heads(features.float())[0]

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """Top-1 accuracy and mean loss since the last :meth:`reset` (one host sync)."""
        counts = dist.all_reduce_sum(
            torch.stack([self.correct.double(), self.seen.double(), self.loss_sum])
        ).tolist()
        correct, seen, loss_sum = counts
        if seen == 0:
            return {}
        return {"probe_top1": correct / seen, "probe_loss": loss_sum / seen}

    @property
    def accuracy(self) -> float | None:
        """Running top-1 since the last reset, or None before any labelled image."""
        return self.compute().get("probe_top1")

    def reset(self) -> None:
        for b in (self.correct, self.seen, self.loss_sum, self.batches):
            b.zero_()
