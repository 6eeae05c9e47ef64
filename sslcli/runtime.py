"""Device, precision, seeding and RNG-state plumbing shared by training and evaluation."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sslcli.errors import SSLError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SSLError("--device cuda was asked for but no CUDA device is available")
    if name in ("cuda", "auto") and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local)
    return torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backends(device: torch.device) -> None:
    """Backend settings for training on ``device``.

    CUDA: cuDNN benchmark mode. Every view of every method has a fixed size (a
    ``ViewSpec`` size, a few of them for multi-crop), so the best convolution algorithm
    is searched once per shape in the first steps and reused for the rest of the run.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(aug_gen: torch.Generator | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every RNG that shapes the rest of a run, as tensors + JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    if aug_gen is not None:
        tensors["augment"] = aug_gen.get_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def set_rng_state(
    tensors: dict[str, Tensor], meta: dict[str, Any], aug_gen: torch.Generator | None
) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        states = [tensors[k] for k in cuda][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(states)
    if aug_gen is not None and "augment" in tensors:
        aug_gen.set_state(tensors["augment"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The data order of an epoch: a pure function of (seed, epoch), so resume needs no
    sampler state and every process agrees on it."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Evaluate ``module``, then give every submodule back its own mode: a method may keep
    parts in eval mode while training (``module.train(was)`` would flip them)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was
