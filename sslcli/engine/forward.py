"""The module each step calls, compiled with ``trainer.compile`` and falling back to eager
when the compiler fails.

With ``torch.compile`` the compiled module is the DDP wrapper under torchrun (compiling
the wrapper is what lets the compiler split the graph at DDP's bucket boundaries, so
gradient all-reduces still overlap the backward pass; a compiled module inside DDP would
deliver all its gradients at the end), the method alone otherwise. The method itself stays
the plain module: checkpoints hold its plain parameter names, so a run compiled or not
resumes either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sslcli.method import Batch, Method, StepInfo, StepOutput


def first_line(e: BaseException) -> str:
    """``Type: first line`` of the root cause (the compiler wraps what its backend raised)."""
    while True:
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class StepForward:
    """``forward(batch, info)``: the step's forward through :attr:`model`.

    ``compile=True`` compiles ``model``; the compiler only runs at the first call, which
    falls back to eager on failure (see :meth:`__call__`).
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        say: Callable[[str], None],
        *,
        device: torch.device,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.method = method
        self.say = say
        self._cuda = device.type == "cuda"
        self._eager: nn.Module | None = None
        if compile:
            try:
                compiled = torch.compile(model)
            except Exception as e:  # noqa: BLE001 - any backend failure falls back to eager
                say(f"torch.compile unavailable ({first_line(e)}); running eagerly")
            else:
                self._eager, self.model = model, compiled  # type: ignore[assignment]

    def __call__(self, batch: Batch, info: StepInfo) -> StepOutput:
        """The model's forward; the first compiled one falls back to eager on failure.

        Compilation errors (no C++ compiler, no Python headers, an unsupported backend)
        surface at the first call, not at ``torch.compile``. A failure there restores
        the buffers and RNG state a partly run forward may have changed, tells the user
        in one line and runs the step eagerly; an error of the model itself then recurs
        in the eager forward and propagates as it would without ``--compile``.
        """
        eager = self._eager
        if eager is None:
            return self.model(batch, info)  # type: ignore[no-any-return]
        self._eager = None
        saved = [b.detach().clone() for b in self.method.buffers()]
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if self._cuda else None
        try:
            return self.model(batch, info)  # type: ignore[no-any-return]
        except Exception as e:  # noqa: BLE001 - whatever the compiler raised
            with torch.no_grad():
                for b, v in zip(self.method.buffers(), saved, strict=True):
                    b.copy_(v)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
            self.model = eager
            self.say(f"torch.compile failed at the first step ({first_line(e)}); "
                     "running eagerly")  # fmt: skip
            return self.model(batch, info)  # type: ignore[no-any-return]
