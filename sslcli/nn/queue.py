"""A first-in first-out queue of keys: MoCo's dictionary of negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.errors import ConfigError
from sslcli.nn import dist

OFFICIAL_QUEUE_SIZE = 65536
"""MoCo's K on ImageNet (1.28 M images: the queue holds about 5 % of the data set)."""


def default_queue_size(dataset_size: int) -> int:
    """K when the user gives none: the largest power of two at most N/8, capped at the
    official 65,536 (reached from 524,288 images). CIFAR-10's 50,000 images give 4096, the
    official CIFAR-10 demo's value; ImageNet keeps 65,536. A power of two divides every
    power-of-two global batch, as the queue requires. Unknown N (0): the official value.

    A fixed 65,536 on a small set would leave most negatives the random start vectors for
    the whole run (a 4-epoch run on 1,797 images enqueues 7,168 keys) and, once filled,
    hold several stale copies of every image.
    """
    if dataset_size < 1:
        return OFFICIAL_QUEUE_SIZE
    return min(OFFICIAL_QUEUE_SIZE, 1 << max(0, (dataset_size // 8).bit_length() - 1))


def queue_size_warning(method: str, size: int, dataset_size: int) -> str:
    """Why a queue longer than the data set is a poor dictionary."""
    return (
        f"{method}: method.queue_size={size} > {dataset_size} images: the queue holds "
        f"{size / dataset_size:.1f} copies of every image (older encodings of the query's "
        "own image among its negatives) and starts as random vectors that take "
        f"{size / dataset_size:.1f} epochs to leave; use a queue well below the data set "
        f"size, e.g. method.queue_size={default_queue_size(dataset_size)} (the default)"
    )


class KeyQueue(nn.Module):
    """K key vectors of width D, overwritten oldest-first as new batches arrive.

    "We maintain the dictionary as a queue of data samples: the encoded representations
    of the current mini-batch are enqueued, and the oldest are dequeued" (He et al. 2019,
    Sec. 3.2). The queue starts as random unit vectors (normalised Gaussian rows, as in
    the official code) so the first steps already have K well-spread negatives.

    Rows are keys (``[K, D]``), the transpose of the official ``D x K`` buffer, so
    ``q @ queue.keys.T`` gives the ``[B, K]`` negative logits. Both the keys and the write
    pointer are buffers: ``state_dict()`` holds the exact queue, so resume is exact.

    Call :meth:`enqueue` after the logits of the step have been computed ("enqueue the
    current mini-batch, dequeue the earliest", Alg. 1); it all-gathers the keys so every
    process holds the same queue. The number of keys enqueued per step (the global batch,
    or twice that with a symmetric loss) must divide K, as in the official code, so a
    write never straddles the end of the buffer and the queue always holds whole batches.
    """

    keys: Tensor
    ptr: Tensor

    def __init__(
        self, dim: int, size: int, option: str = "method.queue_size", origin: str = ""
    ) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError([f"{option}: the queue needs size >= 1 and dim >= 1"])
        self.size = size
        self.option = option
        """Dotted config name quoted in errors, so the user knows which value to change."""
        self.origin = origin
        """Where ``size`` came from when the user did not state it (quoted in errors)."""
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_batch(self, keys_per_step: int) -> None:
        """One-line error unless ``keys_per_step`` divides the queue length."""
        n = keys_per_step
        if n <= 0 or self.size % n:
            near = n * max(1, round(self.size / n)) if n > 0 else self.size
            raise ConfigError(
                [
                    f"{self.option}: {self.size}{self.origin} is not a multiple of the {n} "
                    "keys enqueued "
                    f"per step (the global batch size, doubled by a symmetric loss); "
                    f"use a multiple of {n}, e.g. {near}"
                ]
            )

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Overwrite the oldest rows with ``keys`` (this process's; gathered from all).

        The write position is computed on the device (no host sync per step); the
        pointer wraps to 0 after the last row.
        """
        keys = dist.gather(keys.detach())
        n = keys.shape[0]
        self.check_batch(n)
        rows = self.ptr + torch.arange(n, device=self.keys.device)
        self.keys.index_copy_(0, rows, keys.to(self.keys.dtype))
        self.ptr.add_(n).remainder_(self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.keys.shape[1]}"
