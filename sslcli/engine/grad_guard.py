"""What keeps a bad step from reaching the weights: gradient clipping, and for a step
whose loss (or clipped gradient norm) is not finite, no update and the buffers put back.

``trainer.skip_nonfinite`` steps may be skipped so; one more stops the run in one line
that names the last good checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from sslcli.config import OptimConfig
from sslcli.errors import NonFiniteLoss


def clip_gradients(module: nn.Module, optim: OptimConfig) -> Tensor | None:
    """Clip ``module``'s gradients as ``optim.grad_clip`` / ``grad_clip_mode`` say; returns
    the gradient norm (the sum of the per-tensor norms in per-tensor mode), or None when
    nothing is clipped."""
    if not optim.grad_clip:
        return None
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    if optim.grad_clip_mode == "norm":
        return torch.nn.utils.clip_grad_norm_(
            [p for p in module.parameters() if p.grad is not None], optim.grad_clip
        )
    # Per tensor, as DINO's clip_gradients: g *= min(1, clip / (||g|| + 1e-6)).
    # (on the stacked norms: a fixed number of kernels however many tensors)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = torch.clamp(optim.grad_clip / (norms + 1e-6), max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind(0)))
    return norms.sum()


class BufferBackup:
    """A copy of a module's buffers taken before the forward pass (which changes BN
    statistics, queues, banks), put back when the step is discarded."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._saved: list[Tensor] | None = None

    def save(self) -> None:
        bufs = list(self.module.buffers())
        if self._saved is None or len(self._saved) != len(bufs):
            self._saved = [b.detach().clone() for b in bufs]
        else:
            torch._foreach_copy_(self._saved, bufs)

    def restore(self) -> None:
        if self._saved is None:
            return
        with torch.no_grad():
            torch._foreach_copy_(list(self.module.buffers()), self._saved)


def nonfinite_error(
    step: int, epoch: int, last_checkpoint: Path, last_saved_step: int | None
) -> NonFiniteLoss:
    """The error that stops a run after one non-finite step too many."""
    if last_checkpoint.is_file():
        where = f"last good checkpoint: {last_checkpoint} (step {last_saved_step})"
    else:
        where = "no checkpoint was written yet"
    return NonFiniteLoss(
        f"loss became non-finite at step {step} (epoch {epoch}); {where}; "
        "try a lower learning rate (--set optim.lr=...), --precision fp32, or "
        "--skip-nonfinite N to tolerate N such steps"
    )
