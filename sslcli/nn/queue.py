"""A first-in first-out queue of keys: MoCo's dictionary of negatives."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslcli.errors import ConfigError
from sslcli.nn import dist


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

    def __init__(self, dim: int, size: int, option: str = "method.queue_size") -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ConfigError([f"{option}: the queue needs size >= 1 and dim >= 1"])
        self.size = size
        self.option = option
        """Dotted config name quoted in errors, so the user knows which value to change."""
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def check_batch(self, keys_per_step: int) -> None:
        """One-line error unless ``keys_per_step`` divides the queue length."""
        n = keys_per_step
        if n <= 0 or self.size % n:
            near = n * max(1, round(self.size / n)) if n > 0 else self.size
            raise ConfigError(
                [
                    f"{self.option}: {self.size} is not a multiple of the {n} keys enqueued "
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
