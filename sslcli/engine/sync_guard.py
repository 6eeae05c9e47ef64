"""Count the host synchronisations a piece of training code asks for.

On a GPU every read of a device value by the host (``.item()``, ``.tolist()``, ``.cpu()``,
``bool(t)`` in an ``if``, ``int(t)``) waits for all queued kernels, and a host value copied
to the device from pageable memory (``torch.tensor(..., device=cuda)``) blocks too; one
such wait per step costs the overlap of host and device work. CUDA can report syncs
(``torch.cuda.set_sync_debug_mode``), a CPU cannot, so this guard patches the Tensor
operations that sync on a GPU and records where each call came from (the first frame
outside torch and this module). The engine's own sync, the agreed finiteness check of
each step (:meth:`sslcli.engine.stopping.StopFlag.agree`), is in :data:`ENGINE_SYNCS` so
callers can account for it explicitly; tests run every method's step under the guard and
fail on any other.

Patched: ``item``, ``tolist``, ``cpu``, ``numpy``, ``__bool__``, ``__int__``,
``__float__``, ``__index__``, ``nonzero`` (method and function), ``torch.unique``,
``torch.masked_select``, boolean-mask indexing (``t[mask]``, ``t[mask] = v``: their
output size depends on the data), and ``torch.tensor`` / ``torch.as_tensor`` given a
``device`` (a host-to-device copy).

Not counted: reads of the optimisers' step counters inside ``torch.optim`` (host tensors
by design unless ``capturable``/``fused``) and ``torch.tensor(..., device="cpu")`` made
inside torch. With ``device_only=True`` (a CUDA run) only device tensors count.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor

ENGINE_SYNCS: frozenset[str] = frozenset({"StopFlag.agree"})
"""Call sites allowed one sync per step: the agreed finite/stop decision."""

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS = str(Path(__file__).resolve())

# torch-internal functions whose reads are of host tensors by design
_TORCH_HOST_SIDE = frozenset({"_get_value"})

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
          "nonzero")  # fmt: skip


@dataclass(frozen=True)
class SyncCall:
    kind: str
    """The operation (``item``, ``__bool__``, ``bool-mask index``, ``h2d tensor``...)."""
    site: str
    """``Class.function`` (or ``function``) of the calling frame outside torch."""
    where: str
    """``file:line`` of that frame."""

    def __str__(self) -> str:
        return f"{self.kind} in {self.site} ({self.where})"


def _caller(frame: FrameType | None) -> tuple[str, str]:
    while frame is not None:
        path = frame.f_code.co_filename
        try:
            resolved = str(Path(path).resolve())
        except OSError:
            resolved = path
        if not resolved.startswith(_TORCH_DIR) and resolved != _THIS:
            code = frame.f_code
            qual = getattr(code, "co_qualname", code.co_name)
            return qual, f"{Path(path).name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?", "?"


def _has_bool_mask(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in items)


class HostSyncGuard:
    """``with HostSyncGuard() as g: ...`` then ``g.calls`` (every sync-prone call), or
    ``g.unexpected()`` (those not in :data:`ENGINE_SYNCS`). Not thread-safe; meant for
    tests and diagnostics, it slows every patched operation down."""

    def __init__(self, device_only: bool = False) -> None:
        self.device_only = device_only
        self.calls: list[SyncCall] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._depth = 0

    def _record(self, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        frame = sys._getframe(2)
        direct = frame.f_code
        inside_torch = str(Path(direct.co_filename).resolve()).startswith(_TORCH_DIR)
        if kind == "h2d tensor":
            dev = torch.device(kwargs["device"])
            if dev.type == "cpu" and (inside_torch or self.device_only):
                return
        else:
            if inside_torch and direct.co_name in _TORCH_HOST_SIDE:
                return
            t = args[0] if args and isinstance(args[0], Tensor) else None
            if self.device_only and (t is None or t.device.type == "cpu"):
                return
        site, where = _caller(frame)
        self.calls.append(SyncCall(kind, site, where))

    def _wrap(self, owner: Any, name: str, kind: str, when: Any = None) -> None:
        orig = getattr(owner, name)
        guard = self

        def patched(*args: Any, **kwargs: Any) -> Any:
            # A patched op called by another one (tolist inside __bool__...) counts once.
            if guard._depth == 0 and (when is None or when(*args, **kwargs)):
                guard._record(kind, args, kwargs)
            guard._depth += 1
            try:
                return orig(*args, **kwargs)
            finally:
                guard._depth -= 1

        self._saved.append((owner, name, orig))
        setattr(owner, name, patched)

    def __enter__(self) -> HostSyncGuard:
        for name in _READS:
            self._wrap(Tensor, name, name)
        self._wrap(torch, "nonzero", "nonzero")
        self._wrap(torch, "unique", "unique")
        self._wrap(torch, "masked_select", "masked_select")
        self._wrap(Tensor, "__getitem__", "bool-mask index", lambda t, i: _has_bool_mask(i))
        self._wrap(
            Tensor, "__setitem__", "bool-mask index", lambda t, i, v: _has_bool_mask(i)
        )
        for fn in ("tensor", "as_tensor"):
            self._wrap(torch, fn, "h2d tensor", lambda *a, **k: k.get("device") is not None)
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, orig in reversed(self._saved):
            setattr(owner, name, orig)
        self._saved.clear()

    def unexpected(self) -> list[SyncCall]:
        """Calls outside the engine's accounted sync sites."""
        return [c for c in self.calls if c.site not in ENGINE_SYNCS]

    def engine_syncs(self) -> int:
        return sum(1 for c in self.calls if c.site in ENGINE_SYNCS)

    def summary(self) -> dict[str, int]:
        """``{"kind in site (file:line)": count}``."""
        return dict(Counter(str(c) for c in self.calls))
