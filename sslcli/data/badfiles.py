"""Unreadable image files: one record per file dataset, shared by every process reading it.

The rules (see :mod:`sslcli.data.datasets` for where they show to a user): a file found
unreadable is warned about once (:class:`UnreadableImageWarning`), marked in a mask that
lives in shared memory (so all DataLoader workers, the GPU decoder and the main process
see it) and replaced by the next readable file, whose index is returned with it, so image,
label and index always agree. When more than ``max_bad_fraction`` of the files are bad,
:class:`~sslcli.errors.TooManyBadImagesError` is raised by whichever reader crosses the
limit. Every path that reads a file dataset (PIL in the workers, encoded bytes for the GPU
decoder, the GPU decoder's own failures) goes through :class:`BadFiles`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from sslcli.data.decode import error_reason
from sslcli.errors import TooManyBadImagesError

T = TypeVar("T")


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and is being skipped."""


def warn_unreadable(path: str, reason: str, stacklevel: int = 1) -> None:
    """Warn about ``path`` (once: it is then marked bad); ``stacklevel`` 1 = the caller."""
    warnings.warn(
        f"skipping unreadable image {path} ({reason})", UnreadableImageWarning, stacklevel + 1
    )


class BadFiles:
    """The unreadable files of one dataset: those dropped when it was opened (``at_open``)
    and a shared-memory mask over the files it kept, marked as readers find bad ones.

    ``name``/``split`` name the dataset in messages; ``total_files`` counts the files
    before any were dropped, the base of ``max_bad_fraction``.
    """

    def __init__(self, name: str, split: str, total_files: int, max_bad_fraction: float) -> None:
        self.name, self.split = name, split
        self.total_files = total_files
        self.max_bad_fraction = max_bad_fraction
        self.at_open: list[str] = []
        self.mask = torch.zeros(0, dtype=torch.uint8)

    def drop_at_open(self, path: str, reason: str) -> None:
        """A file found unreadable before the dataset was built (header check)."""
        self.at_open.append(path)
        warn_unreadable(path, reason, stacklevel=3)

    def track(self, n: int) -> None:
        """Start the shared mask over the ``n`` files kept (after :meth:`drop_at_open`)."""
        # Shared memory: a worker that finds a bad file marks it for every other process,
        # and the main process can count bad files found by workers.
        self.mask = torch.zeros(n, dtype=torch.uint8).share_memory_()

    @property
    def count(self) -> int:
        """Files found unreadable so far, at open time and by any reader."""
        return len(self.at_open) + int(self.mask.sum())

    def check(self) -> None:
        """Raise :class:`TooManyBadImagesError` when more than ``max_bad_fraction`` are bad."""
        bad = self.count
        if bad > self.max_bad_fraction * self.total_files:
            raise TooManyBadImagesError(
                f"at least {bad} of {self.total_files} images in {self.name} ({self.split}) "
                f"are unreadable, more than max_bad_fraction={self.max_bad_fraction:g} "
                f"(a file's body is checked only when it is read, so more may follow); "
                f"fix or remove them, or raise data.max_bad_fraction"
            )

    def is_bad(self, j: int) -> bool:
        return bool(self.mask[j])

    def mark(self, j: int, path: str, reason: str, stacklevel: int = 1) -> None:
        """Record file ``j`` as unreadable: the mask, one warning, the fraction check."""
        self.mask[j] = 1
        warn_unreadable(path, reason, stacklevel + 1)
        self.check()

    def first_readable(
        self,
        i: int,
        load: Callable[[int], T],
        path: Callable[[int], str],
        errors: tuple[type[BaseException], ...] = (Exception,),
    ) -> tuple[T, int]:
        """``(load(j), j)`` for the first file ``j`` from ``i`` on (wrapping around) that is
        not marked bad and whose ``load`` does not raise one of ``errors``; each failure is
        marked on the way."""
        n = self.mask.shape[0]
        for step in range(n):
            j = (i + step) % n
            if self.mask[j]:
                continue
            try:
                return load(j), j
            except errors as e:
                self.mark(j, path(j), error_reason(e), stacklevel=3)
        raise TooManyBadImagesError(f"no readable image left in {self.name} ({self.split})")
