"""Getting batches onto the training device without stalling it.

:class:`DevicePrefetcher` is optional and exact (it changes *when* work happens, never
what the step computes; :mod:`sslcli.data.cache` holds small datasets on the device
instead). It wraps any iterator of CPU batches ``(images, labels, index)`` (``images`` a uint8
    tensor ``[B, 3, S, S]``, the :class:`~sslcli.data.crops.Crops` that workers cut from
    image files, or, for GPU JPEG decoding, a list of encoded byte tensors).
    On CUDA it pins host memory, copies batch k+1 with ``non_blocking=True`` on a side
    stream and runs an optional function there (GPU JPEG decode, view generation) while
    the default stream computes step k; stream events order the two and
    ``Tensor.record_stream`` tells the caching allocator who uses the memory. On CPU it is
    a plain pass-through by default and gives identical results.

RNG semantics, which matter for exact resume: the prefetcher calls ``fn`` exactly once per
batch, in the order the batches come, from one thread (the iterating one, or its helper
thread with ``background=True``). A generator used only by ``fn`` therefore produces the
same numbers with or without look-ahead. With look-ahead, ``fn`` of batch k+1 has already
run when step k is handed out; pass the generators ``fn`` draws from as ``generators=``
and use the prefetcher as a context manager (or call :meth:`DevicePrefetcher.close`):
leaving it early rewinds them to their state right after the last *delivered* batch, so a
checkpoint written next resumes exactly. Random ops of the training step itself (dropout,
stochastic depth) must not use those generators; they use torch's default one.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")
U = TypeVar("U")


# --------------------------------------------------------------------------------------------
# Moving nested batches
# --------------------------------------------------------------------------------------------


def map_tensors(obj: Any, f: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``f`` to every tensor inside nested tuples, lists and dicts (others unchanged)."""
    if isinstance(obj, Tensor):
        return f(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(o, f) for o in obj]
        # A NamedTuple (e.g. the pre-cropped views of a batch) keeps its type.
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    if isinstance(obj, list):
        return [map_tensors(o, f) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, f) for k, v in obj.items()}
    return obj


def pin(obj: Any) -> Any:
    """Page-lock every CPU tensor that is not already (DataLoader's ``pin_memory`` pins in a
    background thread; pinning twice would only add a copy)."""

    def one(t: Tensor) -> Tensor:
        return t if t.device.type != "cpu" or t.is_pinned() else t.pin_memory()

    return map_tensors(obj, one)


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Every tensor of a nested batch on ``device`` (a no-op for tensors already there)."""
    return map_tensors(obj, lambda t: t.to(device, non_blocking=non_blocking))


def _record_stream(obj: Any, stream: Any) -> None:
    def one(t: Tensor) -> Tensor:
        if t.device.type == "cuda":
            # The tensor was allocated on the side stream; without this the allocator could
            # hand its memory to the side stream again while the default stream still
            # reads it.
            t.record_stream(stream)
        return t

    map_tensors(obj, one)


# --------------------------------------------------------------------------------------------
# Streams: CUDA streams and events, or nothing (CPU)
# --------------------------------------------------------------------------------------------


class _Streams:
    """The side stream the prefetcher works on, behind a CPU no-op twin.

    All prefetcher logic (look-ahead, ordering, generator snapshots) is the same code on
    both; only these four calls differ, so the CPU tests exercise the CUDA control flow.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.side: Any = torch.cuda.Stream(device) if self.cuda else None
        self.device = device

    def on_side(self) -> contextlib.AbstractContextManager[Any]:
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.side)

    def record(self) -> Any:
        """An event marking the end of the work queued on the side stream so far."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.side)
        return ev

    def wait(self, event: Any, batch: Any) -> None:
        """Make the current stream wait for ``event`` and own ``batch``'s memory."""
        if not self.cuda:
            return
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        _record_stream(batch, current)

    def side_waits_current(self) -> None:
        """Order the side stream after work already queued on the current stream.

        Needed once, at the start: anything the caller queued before iterating (e.g.
        moving the model, seeding a CUDA generator) must not race with the first copy.
        """
        if self.cuda:
            self.side.wait_stream(torch.cuda.current_stream(self.device))


# --------------------------------------------------------------------------------------------
# The prefetcher
# --------------------------------------------------------------------------------------------


class _Failure:
    """An exception raised while preparing a batch, re-raised when that batch is due."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class DevicePrefetcher(Generic[T, U]):
    """Iterate device-ready batches while the previous step still computes.

    Args:
        batches: any iterable of CPU batches (tuples/lists/dicts of tensors nest freely).
        device: the training device.
        fn: optional ``fn(batch) -> batch`` run on the side stream after the copy (GPU JPEG
            decode, view generation). Called exactly once per batch, in batch order, by one
            thread (see the module docstring for what that means for RNGs).
        generators: the ``torch.Generator`` objects ``fn`` draws from; they are snapshotted
            after each ``fn`` call and rewound by :meth:`close` to the last delivered batch.
        transfer: copy every tensor of the batch to ``device`` before ``fn``. Set False
            when ``fn`` wants host inputs (nvJPEG reads the encoded bytes from host memory)
            and moves what it needs itself.
        pin_memory: page-lock host tensors before the copy (default: on CUDA). Without it
            a ``non_blocking`` copy is synchronous.
        depth: batches prepared ahead of the one being trained on. Default 1 on CUDA, where
            the side stream makes the overlap real, and 0 (a plain pass-through) on CPU.
        background: prepare batches in a helper thread instead of inside ``__next__``. Use
            it when ``fn`` blocks the host: some torchvision builds wait for nvJPEG before
            returning, and in the foreground that wait would delay queueing the step. Torch
            kernels release the GIL, so the thread overlaps with the training step.

    Use it as a context manager so leaving the loop early (max_steps, a signal) drops the
    prepared batches, stops the helper thread and rewinds ``generators``::

        with DevicePrefetcher(loader, device, fn=make_views, generators=[gen]) as batches:
            for views, labels, index in batches:
                ...
    """

    def __init__(
        self,
        batches: Iterable[T],
        device: torch.device | str,
        *,
        fn: Callable[[Any], U] | None = None,
        generators: Sequence[torch.Generator] = (),
        transfer: bool = True,
        pin_memory: bool | None = None,
        depth: int | None = None,
        background: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.fn = fn
        self.generators = list(generators)
        self.transfer = transfer
        cuda = self.device.type == "cuda"
        self.pin_memory = cuda if pin_memory is None else pin_memory
        depth = (1 if cuda else 0) if depth is None else depth
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        self.background = background
        self.depth = max(depth, 1) if background else depth
        self._it: Iterator[T] = iter(batches)
        self._streams = _Streams(self.device)
        self._started = False
        self._source_done = False
        self._closed = False
        self._ready: collections.deque[Any] = collections.deque()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.depth))
        self._stop = threading.Event()
        self._gen_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._delivered_states = self._snapshot()
        self.delivered = 0
        """Batches handed out so far."""

    # -- the iterator protocol -------------------------------------------------------------
    def __iter__(self) -> DevicePrefetcher[T, U]:
        return self

    def __next__(self) -> U:
        if self._closed:
            raise StopIteration
        if self.depth == 0:
            item = self._produce()
        else:
            if not self._started:
                self._start()
            item = self._get() if self.background else self._take()
        if item is _END:
            self._closed = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._closed = True
            raise item.exc
        batch, event, states = item
        self._streams.wait(event, batch)
        self._delivered_states = states
        self.delivered += 1
        if self.depth and not self.background:
            # Queue the next copy (and fn) now, before the caller queues this step's
            # compute, so both run concurrently on the device.
            self._fill()
        return batch

    def _prepare(self, batch: Any) -> Any:
        if self.transfer:
            if self.pin_memory:
                batch = pin(batch)
            batch = to_device(batch, self.device, non_blocking=self.pin_memory)
        return self.fn(batch) if self.fn is not None else batch

    def _produce(self) -> Any:
        """The next prepared item: (batch, event, generator states), _END or a _Failure."""
        if self._source_done:
            return _END
        try:
            cpu_batch = next(self._it)
        except StopIteration:
            self._source_done = True
            return _END
        except Exception as e:  # noqa: BLE001 - delivered in order, raised by __next__
            self._source_done = True
            return _Failure(e)
        try:
            # The lock lets generators_at_delivered() swap generator states safely while a
            # helper thread prepares batches.
            with self._gen_lock, self._streams.on_side():
                batch = self._prepare(cpu_batch)
                event = self._streams.record()
                states = self._snapshot()
        except Exception as e:  # noqa: BLE001 - as above
            self._source_done = True
            return _Failure(e)
        # The CPU batch may be dropped now: the pinned source of a non_blocking copy is kept
        # alive by the caching host allocator until the copy's stream has passed it.
        return batch, event, states

    # -- foreground look-ahead --------------------------------------------------------------
    def _start(self) -> None:
        self._started = True
        self._streams.side_waits_current()
        if self.background:
            self._thread = threading.Thread(
                target=self._worker, name="sslcli-prefetch", daemon=True
            )
            self._thread.start()
        else:
            self._fill()

    def _fill(self) -> None:
        while len(self._ready) < self.depth and not self._source_done:
            self._ready.append(self._produce())

    def _take(self) -> Any:
        return self._ready.popleft() if self._ready else _END

    # -- background thread ------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            if self._streams.cuda:
                torch.cuda.set_device(self.device)  # the current device is per thread
        except Exception as e:  # noqa: BLE001 - handed to the consumer, never lost
            self._queue.put(_Failure(e))
            return
        while not self._stop.is_set():
            item = self._produce()
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item is _END or isinstance(item, _Failure):
                return

    def _get(self) -> Any:
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    # The worker always queues _END or a _Failure before it returns, so
                    # an empty queue and a dead thread means it was stopped.
                    return _END

    # -- generators and early exit -----------------------------------------------------------
    def _snapshot(self) -> list[Tensor]:
        return [g.get_state() for g in self.generators]

    def delivered_generator_states(self) -> list[Tensor]:
        """States of ``generators`` right after ``fn`` ran for the last delivered batch:
        what a checkpoint written now must hold (the live generators may be ahead)."""
        return [s.clone() for s in self._delivered_states]

    @contextlib.contextmanager
    def generators_at_delivered(self) -> Iterator[None]:
        """Inside the block, ``generators`` hold their delivered states; outside, their
        live ones. For checkpoints written mid-epoch while batches are prepared ahead::

            with batches.generators_at_delivered():
                trainer.save_checkpoint()

        A helper thread waits for the block before it prepares the next batch.
        """
        with self._gen_lock:
            live = self._snapshot()
            for g, s in zip(self.generators, self._delivered_states, strict=True):
                g.set_state(s)
            try:
                yield
            finally:
                for g, s in zip(self.generators, live, strict=True):
                    g.set_state(s)

    def close(self) -> None:
        """Stop preparing, drop prepared batches, rewind ``generators`` to the delivered state.

        The wrapped iterator stays advanced past what was delivered; the trainer never
        reuses it (it makes a new one from the step number on resume). Idempotent.
        """
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)
            self._thread.join()
            self._thread = None
        self._ready.clear()
        # fn is the generators' only user (the contract above), so rewinding to the
        # delivered snapshot undoes exactly the batches prepared but never delivered.
        for g, s in zip(self.generators, self._delivered_states, strict=True):
            g.set_state(s)
        self._closed = True
        self._source_done = True
        close = getattr(self._it, "close", None)
        if callable(close):  # a generator: run its finally blocks (DataLoader shutdown)
            close()

    def __enter__(self) -> DevicePrefetcher[T, U]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "DevicePrefetcher",
    "map_tensors",
    "pin",
    "to_device",
]
