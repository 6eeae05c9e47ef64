"""Fine-tuning: the whole encoder plus a new linear head, trained on (a fraction of) the labels.

Follows SimCLR's semi-supervised protocol (Chen et al. 2020, Sec. 6 and App. B.5): SGD with
Nesterov momentum 0.9, learning rate 0.05 × B/256, no warm-up, no weight decay or other
regularisation, random resized crops with horizontal flips as the only augmentation;
60 epochs with 1% of the labels, 30 epochs with 10% (SimCLR v2: also 30 with all the
labels). The learning rate decays with a cosine, the official code's schedule.
Batch-norm statistics are updated (the encoder trains), and the test split is scored
once, with the evaluation transform, at the end.

The encoder is a copy of the one evaluated by kNN and linear probing (``method.embed``,
or an exported model, or the encoder ``--which`` names), so the trained checkpoint is
never modified. Learning rates given as a list are chosen on a held-out part of the
training labels, then the chosen one is retrained on all of them, exactly as the linear
probe does.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.data.augment import ViewPipeline
from sslcli.data.images import ImageDataset
from sslcli.data.views import ViewSpec
from sslcli.errors import EvalError
from sslcli.eval.features import extract, iter_batches
from sslcli.eval.linear import REFERENCE_BATCH, cosine_factor
from sslcli.eval.splits import RowSubset, holdout_split
from sslcli.runs.rebuild import Target
from sslcli.runtime import autocast, eval_mode

DEFAULT_LR = 0.05
DEFAULT_BATCH = 256


def default_epochs(label_fraction: float | None) -> int:
    """60 epochs for <= 1% of the labels, 30 otherwise (SimCLR App. B.5, SimCLR v2 Sec. 4)."""
    return 60 if label_fraction is not None and label_fraction <= 0.01 else 30


def train_view(target: Target) -> ViewSpec:
    """Random resized crop (scale 0.08-1) + horizontal flip, nothing else, then the encoder's
    own normalisation: the augmentation of the papers' linear and fine-tuning protocols."""
    return ViewSpec(
        count=1, size=target.image_size, scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.0,
        grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, normalize=target.normalize,
        mean=target.mean, std=target.std,
    )  # fmt: skip


def ordered_batches(
    dataset: ImageDataset, order: Tensor, batch_size: int, num_workers: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """uint8 images and labels of ``dataset[order]`` in batches; a trailing batch of one
    image is dropped (batch norm in training mode cannot normalise a single sample)."""
    n = int(order.numel())
    b = min(batch_size, n)
    if n - (n // b) * b == 1 and n > 1:
        order = order[:-1]
    get_batch = getattr(dataset, "get_batch", None)
    if callable(get_batch):
        for s in range(0, int(order.numel()), b):
            x, y, _ = get_batch(order[s : s + b])
            yield x, torch.as_tensor(y)
        return
    from torch.utils.data import Subset

    for x, y, _ in iter_batches(Subset(dataset, order.tolist()), b, num_workers):
        yield x, torch.as_tensor(y)


def steps_per_epoch(n: int, batch_size: int) -> int:
    b = min(batch_size, n)
    full, rest = divmod(n, b)
    return full + (1 if rest > 1 else 0)


class FineTuneNet(nn.Module):
    """A trainable copy of the evaluated encoder followed by a new linear classifier."""

    def __init__(self, body: nn.Module, head: nn.Linear, *, via_embed: bool) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.via_embed = via_embed
        """True when ``body`` is a whole method whose ``embed`` builds the features."""

    def features(self, x: Tensor) -> Tensor:
        return self.body.embed(x) if self.via_embed else self.body(x)  # type: ignore[operator]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).float())


def build_net(
    target: Target,
    which: str | None,
    num_classes: int,
    seed: int,
    head_layer: int | None = None,
) -> FineTuneNet:
    """Copy only what the evaluated features need: the named encoder, the method's own
    fine-tuning network (:meth:`Method.finetune_encoder`: SimCLR v2's backbone plus head
    layers), the method's encoder when ``embed`` is the default, or the whole method when
    it overrides ``embed`` (e.g. CMC concatenating two encoders). Every copied parameter
    trains (DINO's teacher is frozen during pre-training; here it is the network being
    fine-tuned)."""
    from sslcli.method import Method

    method = target.method
    body: nn.Module
    via_embed = False
    own = None
    if which is None and method is not None:
        try:
            own = method.finetune_encoder(head_layer)
        except ValueError as e:
            raise EvalError(f"--head-layer: {e}") from e
    if head_layer is not None and own is None:
        raise EvalError(
            "--head-layer needs a run or checkpoint of a method that fine-tunes from its "
            "projection head (simclr-v2), without --which"
        )
    if own is not None:
        body = copy.deepcopy(own)
    elif which is not None or method is None:
        body = copy.deepcopy(target.candidates[which or target.default_which])
    elif type(method).embed is Method.embed:
        body = copy.deepcopy(method.encoder())
    else:
        body = copy.deepcopy(method)
        via_embed = True
    for p in body.parameters():
        p.requires_grad_(True)
    dev = next(iter(body.parameters())).device
    net = FineTuneNet(body, nn.Linear(1, 1), via_embed=via_embed)
    with torch.no_grad(), eval_mode(body):
        probe = torch.zeros(2, 3, target.image_size, target.image_size, device=dev)
        dim = int(net.features(probe).shape[1])
    head = nn.Linear(dim, num_classes).to(dev)
    # MoCo / SimCLR initialise the new classifier with N(0, 0.01^2) weights and zero bias.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    net.head = head
    return net


@dataclass
class FineTuneResult:
    top1: float
    top5: float
    lr: float
    candidates: list[dict[str, Any]]
    epochs: int
    batch_size: int
    train_images: int
    holdout_images: int
    test_images: int

    def to_json(self) -> dict[str, Any]:
        return {
            "top1": self.top1, "top5": self.top5, "lr": self.lr, "epochs": self.epochs,
            "batch_size": self.batch_size, "train_images": self.train_images,
            "holdout_images": self.holdout_images, "test_images": self.test_images,
            "selection": self.candidates,
        }  # fmt: skip


def train_net(
    net: FineTuneNet,
    dataset: ImageDataset,
    rows: Tensor,
    *,
    lr: float,
    weight_decay: float,
    epochs: int,
    batch_size: int,
    view: ViewSpec,
    device: torch.device,
    dtype: torch.dtype | None,
    seed: int,
    num_workers: int = 0,
) -> None:
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=lr * batch_size / REFERENCE_BATCH, momentum=0.9, nesterov=True,
        weight_decay=weight_decay,
    )  # fmt: skip
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    pipeline = ViewPipeline([view])
    gen = torch.Generator(device=device).manual_seed(seed)
    n = int(rows.numel())
    total = epochs * steps_per_epoch(n, batch_size)
    step = 0
    net.train()
    for epoch in range(epochs):
        order = rows[torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))]
        for images, labels in ordered_batches(dataset, order, batch_size, num_workers):
            (x,) = pipeline(images.to(device, non_blocking=True), gen)
            f = cosine_factor(step, total)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            with autocast(device, dtype):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if step == 0 and not any(p.grad is not None for p in net.body.parameters()):
                # e.g. a plugin's embed() under torch.no_grad: only the head would train,
                # which is a linear probe reported as fine-tuning.
                raise EvalError(
                    "no gradient reaches the encoder through the method's embed(); "
                    "fine-tune one encoder with --which"
                )
            opt.step()
            step += 1
    net.eval()


@torch.no_grad()
def score_net(
    net: FineTuneNet,
    target: Target,
    dataset: ImageDataset,
    device: torch.device,
    dtype: torch.dtype | None,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[float, float]:
    """(top-1, top-5) of ``net`` on ``dataset`` with the evaluation transform."""
    with eval_mode(net), autocast(device, dtype):
        logits, labels = extract(
            net, dataset, target.image_size, device, batch_size=batch_size,
            normalize=target.normalize, mean=target.mean, std=target.std,
            num_workers=num_workers,
        )  # fmt: skip
    top1 = float((logits.argmax(1) == labels).float().mean())
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top5 = float((top == labels[:, None]).any(1).float().mean())
    return top1, top5


def finetune(
    target: Target,
    train: ImageDataset,
    test: ImageDataset,
    num_classes: int,
    *,
    rows: Tensor | None = None,
    which: str | None = None,
    head_layer: int | None = None,
    lrs: Sequence[float] = (DEFAULT_LR,),
    weight_decay: float = 0.0,
    epochs: int = 30,
    batch_size: int = DEFAULT_BATCH,
    holdout: float = 0.1,
    device: torch.device,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    num_workers: int = 0,
) -> FineTuneResult:
    """Fine-tune on ``train[rows]`` (all labelled rows by default); score ``test`` once."""
    if not lrs or any(not lr > 0 for lr in lrs):
        raise EvalError("fine-tuning needs positive learning rates")
    rows = torch.arange(len(train)) if rows is None else rows.cpu()
    if rows.numel() < 2:
        raise EvalError("fine-tuning needs at least two labelled training images")
    view = train_view(target)
    kw: dict[str, Any] = dict(
        weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, view=view,
        device=device, dtype=dtype, seed=seed, num_workers=num_workers,
    )  # fmt: skip
    cands: list[dict[str, Any]] = [{"lr": lr} for lr in lrs]
    best = 0
    n_held = 0
    if len(lrs) > 1:
        fit_pos, held_pos = holdout_split(train.labels[rows])
        if held_pos.numel() == 0:
            raise EvalError(
                "too few labelled training images to hold some out for choosing the "
                "learning rate; give a single --lr"
            )
        n_held = int(held_pos.numel())
        held_set = RowSubset(train, rows[held_pos])
        for c in cands:
            net = build_net(target, which, num_classes, seed, head_layer)
            train_net(net, train, rows[fit_pos], lr=c["lr"], **kw)
            c["holdout_top1"], _ = score_net(
                net, target, held_set, device, dtype, batch_size, num_workers
            )
            del net
        best = max(range(len(cands)), key=lambda i: (cands[i]["holdout_top1"], -i))
    net = build_net(target, which, num_classes, seed, head_layer)
    train_net(net, train, rows, lr=cands[best]["lr"], **kw)
    top1, top5 = score_net(net, target, test, device, dtype, batch_size, num_workers)
    return FineTuneResult(
        top1=top1, top5=top5, lr=cands[best]["lr"], candidates=cands, epochs=epochs,
        batch_size=batch_size, train_images=int(rows.numel()), holdout_images=n_held,
        test_images=len(test),
    )  # fmt: skip
