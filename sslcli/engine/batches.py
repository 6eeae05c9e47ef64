"""The training batches of one process: which images, in which order, cut how.

Exact resume: the order of an epoch is a permutation drawn from ``(seed, epoch)`` and a
resumed epoch starts at batch ``step % steps_per_epoch``; every crop box is a pure function
of the seed, the epoch and the sample. Every process computes the same permutation and
takes its slice of each global batch, so ``trainer.batch_size`` is the global batch and
the data a run sees does not depend on the number of processes.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from sslcli.data.crops import CropDataset, CropPlan, collate_crops
from sslcli.data.gpu_decode import JpegBytesDataset, JpegDecoder, collate_jpeg
from sslcli.data.images import ImageDataset
from sslcli.data.loader import DevicePrefetcher
from sslcli.data.views import ViewSpec
from sslcli.nn import dist
from sslcli.runtime import epoch_order

HostBatch = tuple[Tensor, Tensor, Tensor]
"""``(images, labels, index)`` as the loader gives them (images: a Tensor or Crops)."""


def worker_init(worker_id: int) -> None:
    """Signal set-up of a DataLoader worker.

    Ctrl-C reaches the whole foreground process group: a worker killed by it would crash
    the loader before the main process could write its checkpoint, and the main process
    shuts its workers down itself. SIGTERM keeps its default action, because that is how
    the loader (and multiprocessing at exit) stops a worker; a SIGTERM sent to the whole
    group is handled by :meth:`sslcli.engine.stopping.StopFlag.next_batch`. Slurm sends its
    pre-emption warning (--signal=USR1@T) to every process of the job step: it is the main
    process's to act on.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def cpus_per_process() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cpus // max(1, local))


def num_workers(stated: int | None, dataset: Any) -> int:
    """``data.num_workers``, or the default for ``dataset``."""
    if stated is not None:
        return stated
    # An in-memory item is a memory copy: worker processes would only add IPC.
    return 0 if dataset.in_memory else min(8, cpus_per_process())


@dataclass
class BatchSource:
    """This process's batches of any epoch, from any batch on."""

    dataset: ImageDataset
    seed: int
    steps_per_epoch: int
    global_batch: int
    local_batch: int
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable
    view_specs: Callable[[], Sequence[ViewSpec]] = list
    """The method's views (:meth:`Method.views`): what image files are cut into."""
    probe_size: int | None = None
    """With the online probe: the size of the uncropped square it reads, else None."""
    decoder: JpegDecoder | None = None
    """nvJPEG decoding on the device (``data.gpu_decode``), or None."""
    workers: int | None = None
    """``data.num_workers`` (None: the default for the data)."""

    @property
    def num_workers(self) -> int:
        return num_workers(self.workers, self.dataset)

    def crop_plan(self) -> CropPlan:
        """The training crops of image files (plus the probe's evaluation square)."""
        return CropPlan.of(self.view_specs(), self.seed, self.probe_size)

    def epoch(self, epoch: int, skip: int = 0) -> DevicePrefetcher[Any, Any]:
        """The batches of ``epoch`` from batch ``skip`` on, already on the device.

        On CUDA the next batch is copied (or JPEG-decoded) on a side stream while the
        current step computes; on CPU this is a plain pass-through. Close it (or leave its
        ``with``) to shut a DataLoader's workers down.
        """
        if self.decoder is not None:
            self.decoder.plan = self.crop_plan()
        return DevicePrefetcher(
            self.host(epoch, skip),
            self.device,
            fn=None if self.decoder is None else functools.partial(self.decoder, epoch=epoch),
            transfer=self.decoder is None,
            background=self.decoder is not None,
        )

    def host(self, epoch: int, skip: int = 0) -> Iterator[HostBatch]:
        """The batches of ``epoch`` from batch ``skip`` on, as the loader gives them."""
        order = epoch_order(len(self.dataset), self.seed, epoch)
        order = order[: self.steps_per_epoch * self.global_batch]
        chunks = order.view(self.steps_per_epoch, self.global_batch)
        r, lb = dist.rank(), self.local_batch
        get_batch = getattr(self.dataset, "get_batch", None)
        where = getattr(self.dataset, "device", None)
        if callable(get_batch) and isinstance(where, torch.device) and where.type != "cpu":
            # A device cache indexes on the device: one copy of the order per epoch instead
            # of a blocking host-to-device index copy per batch.
            chunks = chunks.to(where)
        index_lists = [c[r * lb : (r + 1) * lb] for c in chunks[skip:]]
        if callable(get_batch):
            # In-memory data: one gather per batch, no per-item collate, no workers.
            for idx in index_lists:
                yield get_batch(idx)
            return
        yield from self._loader(epoch, index_lists)

    def _loader(self, epoch: int, index_lists: list[Tensor]) -> DataLoader[Any]:
        workers = self.num_workers
        # Image files: every view is cut from the original image in the workers (or, with
        # nvJPEG, from the full decode on the device), boxes a pure function of the seed,
        # the epoch and the sample.
        source: Any = (
            JpegBytesDataset(self.dataset)  # type: ignore[arg-type]
            if self.decoder
            else CropDataset(self.dataset, self.crop_plan(), epoch)
        )
        return DataLoader(
            source,
            batch_sampler=[i.tolist() for i in index_lists],
            num_workers=workers,
            collate_fn=collate_jpeg if self.decoder else collate_crops,
            pin_memory=self.device.type == "cuda" and self.decoder is None,
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
            worker_init_fn=worker_init if workers else None,
            # A private generator: otherwise every new loader iterator draws its workers'
            # base seed from the global torch RNG, and a run resumed mid-epoch would draw
            # it at a different point of that stream than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed + epoch),
        )
