"""JPEG decoding on the training device: workers read bytes, the GPU decodes the batch.

For a JPEG folder the PIL decode in the workers is usually the slowest part of training a
small model. Here the workers only read files (:class:`JpegBytesDataset`, collated into
one packed byte tensor by :func:`collate_jpeg`), and the main process decodes the whole
batch with nvJPEG (``torchvision.io.decode_jpeg(list, device="cuda")``). For training
(:class:`JpegDecoder` with a :class:`~sslcli.data.crops.CropPlan`) every view's box is
drawn on the full decoded image, with the same numbers as the worker path draws, and
resampled from it on the device; for evaluation every image is brought to the dataset's
square load size with :func:`sslcli.data.decode.to_square`. On the CPU the very same code runs with
``device="cpu"`` (libjpeg-turbo), which is how it is tested without a GPU.

Agreement with the worker (PIL) path of :class:`~sslcli.data.images.FileImageDataset`:

* geometry: identical (shorter side to ``S``, centre crop, same rounding); pixels differ
  by a few levels because PIL first shrinks in the DCT domain (``Image.draft``) and then
  resizes, while here the full-size decode is resized with an antialiased bilinear filter;
* EXIF orientation: applied, as ``ImageOps.exif_transpose`` does (nvJPEG ignores it, so
  the tag is read from the bytes by :func:`exif_orientation`);
* files nvJPEG/libjpeg cannot decode but PIL can (a PNG named ``.jpg``, exotic JPEG
  variants) and files that look truncated (no end-of-image marker) are decoded by the
  worker path's own function on the CPU, so they come out exactly as they would there;
* unreadable files follow the dataset's corrupt-file rules: one
  :class:`~sslcli.data.badfiles.UnreadableImageWarning`, the file marked in the dataset's
  shared bad-file mask (so workers skip it from then on), ``max_bad_fraction`` enforced,
  and the sample replaced by the next readable image, whose index is returned.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from sslcli.data.crops import CropDataset, CropPlan, Crops, crop_views_pil, resized_crop_tensor
from sslcli.data.decode import decode_pil, error_reason, to_square
from sslcli.data.images import FileImageDataset

# A packed batch of encoded files: all bytes back to back + B+1 offsets. One tensor crosses
# the worker -> main-process queue per batch, instead of one shared-memory segment (and
# file descriptor) per image.
Packed = tuple[Tensor, Tensor]

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
# Some cameras append data after the end-of-image marker; look for it this far back.
_EOI_SEARCH = 4096


# --------------------------------------------------------------------------------------------
# Worker side: read bytes only
# --------------------------------------------------------------------------------------------


class JpegBytesDataset(Dataset[tuple[Tensor, int, int]]):
    """``ds[i] -> (uint8 [nbytes] encoded file, label, index)`` for a file dataset.

    Files already marked bad (by workers or by :class:`JpegDecoder`) are skipped like
    :meth:`FileImageDataset.__getitem__` skips them: the next usable file is returned
    with its own index. A file that cannot be read at all is marked bad here.
    """

    def __init__(self, base: FileImageDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        data, label, j = self.base.read_encoded(i)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, j


def collate_jpeg(samples: Sequence[tuple[Tensor, int, int]]) -> tuple[Packed, Tensor, Tensor]:
    """DataLoader ``collate_fn`` for :class:`JpegBytesDataset`: ``((bytes, offsets), y, i)``."""
    sizes = torch.tensor([s[0].numel() for s in samples], dtype=torch.int64)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=offsets[1:])
    data = torch.cat([s[0] for s in samples]) if samples else torch.empty(0, dtype=torch.uint8)
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    index = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return (data, offsets), labels, index


def unpack(encoded: Packed | Sequence[Tensor]) -> list[Tensor]:
    """The per-file byte tensors of a packed batch (views, no copy); lists pass through."""
    if isinstance(encoded, tuple) and len(encoded) == 2 and encoded[1].dtype == torch.int64:
        data, offsets = encoded
        o = offsets.tolist()
        return [data[o[k] : o[k + 1]] for k in range(len(o) - 1)]
    return list(encoded)


# --------------------------------------------------------------------------------------------
# EXIF orientation, read from the bytes
# --------------------------------------------------------------------------------------------


def exif_orientation(data: bytes | memoryview) -> int:
    """The EXIF orientation tag (1..8) of a JPEG, 1 when absent or unreadable.

    Scans the marker segments before the image data for APP1 ``Exif``, then IFD0 for tag
    0x0112. Only the header is touched, so this is cheap enough for the main process.
    """
    b = bytes(data[:65536])  # APP segments are at most 64 KiB each and come first
    if b[:2] != _SOI:
        return 1
    pos = 2
    while pos + 4 <= len(b):
        if b[pos] != 0xFF:
            return 1
        marker = b[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan: no EXIF before data
            return 1
        seg_len = int.from_bytes(b[pos + 2 : pos + 4], "big")
        seg = b[pos + 4 : pos + 2 + seg_len]
        if marker == 0xE1 and seg[:6] == b"Exif\x00\x00":
            return _tiff_orientation(seg[6:])
        pos += 2 + seg_len
    return 1


def _tiff_orientation(t: bytes) -> int:
    if t[:4] == b"II*\x00":
        order = "little"
    elif t[:4] == b"MM\x00*":
        order = "big"
    else:
        return 1

    def u(off: int, size: int) -> int:
        return int.from_bytes(t[off : off + size], order)  # type: ignore[arg-type]

    ifd = u(4, 4)
    if ifd + 2 > len(t):
        return 1
    for k in range(u(ifd, 2)):
        e = ifd + 2 + 12 * k
        if e + 12 > len(t):
            break
        if u(e, 2) == 0x0112:
            v = u(e + 8, 2)  # SHORT, stored left-aligned in the value field
            return v if 1 <= v <= 8 else 1
    return 1


def apply_orientation(img: Tensor, orientation: int) -> Tensor:
    """``[..., C, H, W]`` as ``PIL.ImageOps.exif_transpose`` would show it."""
    h, w = -2, -1
    if orientation == 2:
        return img.flip(w)
    if orientation == 3:
        return img.flip(h, w)
    if orientation == 4:
        return img.flip(h)
    if orientation == 5:  # PIL TRANSPOSE: mirror over the main diagonal
        return img.transpose(h, w)
    if orientation == 6:  # PIL ROTATE_270 (counter-clockwise) = 90 degrees clockwise
        return torch.rot90(img, -1, (h, w))
    if orientation == 7:  # PIL TRANSVERSE: mirror over the anti-diagonal
        return img.transpose(h, w).flip(h, w)
    if orientation == 8:  # PIL ROTATE_90, counter-clockwise
        return torch.rot90(img, 1, (h, w))
    return img


# --------------------------------------------------------------------------------------------
# Main-process side: decode a batch on the device
# --------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _decode_jpeg(data: list[Tensor], device: torch.device) -> list[Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision's CUDA decode runs on nvJPEG's own stream without waiting for the
    # caller's: memory that the caching allocator hands it may still be read by kernels
    # queued on our (side) stream, e.g. the previous batch's crops, and the decode would
    # overwrite it under them. Draining the current stream first closes that window; it
    # costs one host wait per batch, in the prefetcher's helper thread.
    _synchronize(device)
    # torchvision 0.29 deprecates its codecs in favour of TorchCodec and warns on every
    # call; nothing else in our dependencies decodes a batch with nvJPEG, and the warning
    # would repeat once per training step, so it is silenced here only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        out = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(out)


def _looks_complete(t: Tensor) -> bool:
    """Starts with SOI and has EOI near the end. libjpeg rejects truncated files but nvJPEG
    may decode them with a grey tail, so such files go to the PIL path, which decides."""
    head = bytes(t[:2].tolist()) if t.numel() >= 2 else b""
    tail = t[-_EOI_SEARCH:].numpy().tobytes() if t.numel() else b""
    return head == _SOI and _EOI in tail


class JpegDecoder:
    """Decode packed JPEG batches from :class:`JpegBytesDataset` on ``device``.

    ``decoder(((bytes, offsets), labels, index)) -> (uint8 [B, 3, S, S], labels, index)``,
    all on ``device``, ready for the view pipeline. Use it as the ``fn`` of a
    :class:`~sslcli.data.loader.DevicePrefetcher` with ``transfer=False`` so the decode of
    batch k+1 overlaps step k. ``cpu_fallbacks`` and ``bad_files`` count what took the
    PIL path and what was unreadable.
    """

    def __init__(
        self,
        dataset: FileImageDataset,
        size: int | None = None,
        device: Any = "cpu",
        plan: CropPlan | None = None,
    ):
        self.dataset = dataset
        self.size = size or dataset.load_size
        self.device = torch.device(device)
        self.plan = plan
        self.cpu_fallbacks = 0
        self.bad_files = 0

    def __call__(
        self, batch: tuple[Any, Tensor, Tensor], epoch: int = 0
    ) -> tuple[Tensor | Crops, Tensor, Tensor]:
        """Squares of the load size, or with a ``plan`` the training :class:`Crops` of
        ``epoch`` (cut from the full decoded images, boxes as the workers draw them)."""
        encoded, labels, index = batch
        data = unpack(encoded)
        labels, index = labels.clone(), index.clone()
        images: Tensor | Crops
        if self.plan is None:
            images = self.decode(data, labels, index)
        else:
            images = self.decode_crops(data, labels, index, epoch)
        dev = self.device
        return images, labels.to(dev, non_blocking=True), index.to(dev, non_blocking=True)

    def _decode_ready(self, data: list[Tensor]) -> dict[int, Tensor]:
        """Batch position -> decoded upright image, for the files the fast path decodes."""
        fast = [k for k in range(len(data)) if _looks_complete(data[k])]
        ready: dict[int, Tensor] = {}
        for k, img in zip(fast, self._decode_fast([data[k] for k in fast]), strict=True):
            if img is not None:
                o = exif_orientation(memoryview(data[k].numpy()))
                ready[k] = apply_orientation(img, o) if o != 1 else img
        return ready

    def decode_crops(self, data: list[Tensor], labels: Tensor, index: Tensor, epoch: int) -> Crops:
        """Each view's box drawn on the full decoded image (:meth:`CropPlan.boxes`, the same
        numbers as the worker path) and resampled from it on the device, one sample at a
        time (the boxes differ in size). Rewrites ``labels``/``index`` like :meth:`decode`."""
        plan = self.plan
        assert plan is not None
        dev, b = self.device, len(data)
        views = [
            torch.empty((b, 3, s.size, s.size), dtype=torch.uint8, device=dev) for s in plan.specs
        ]
        fs = plan.full_size
        full = torch.empty((b, 3, fs, fs), dtype=torch.uint8, device=dev) if fs else None
        ready = self._decode_ready(data)
        for k, img in ready.items():
            _, h, w = img.shape
            boxes = plan.boxes(epoch, int(index[k]), h, w)
            for v, (box, spec) in enumerate(zip(boxes, plan.specs, strict=True)):
                views[v][k] = resized_crop_tensor(img, box, spec.size, spec.interpolation)
            if full is not None and fs is not None:
                full[k] = to_square(img[None], fs)[0]
        for k in range(b):
            if k in ready:
                continue
            crops = self._slow_crops(data[k], k, labels, index, epoch)
            for v, x in enumerate(crops.views):
                views[v][k] = x.to(dev)
            if full is not None and crops.full is not None:
                full[k] = crops.full.to(dev)
        return Crops(views, full)

    def _slow_crops(
        self, data: Tensor, k: int, labels: Tensor, index: Tensor, epoch: int
    ) -> Crops:
        """The worker path's crops of one file, or of its substitute when unreadable."""
        plan = self.plan
        assert plan is not None
        self.cpu_fallbacks += 1
        j = int(index[k])
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                return crop_views_pil(img, plan, epoch, j)
        except Exception as e:  # PIL raises many types for broken files; all mean "bad"
            reason = error_reason(e)
        self.bad_files += 1
        self.dataset.mark_bad(j, reason)
        crops, y, j2 = CropDataset(self.dataset, plan, epoch)[j]
        labels[k], index[k] = y, j2
        return crops

    def decode(self, data: list[Tensor], labels: Tensor, index: Tensor) -> Tensor:
        """Decode ``data`` into ``[B, 3, S, S]``; rewrites ``labels``/``index`` in place where
        a bad file was replaced by its substitute."""
        s, dev = self.size, self.device
        b = len(data)
        out = torch.empty((b, 3, s, s), dtype=torch.uint8, device=dev)
        ready = self._decode_ready(data)
        # Group by decoded shape so every shape is resized in one call.
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, img in ready.items():
            groups.setdefault(tuple(img.shape), []).append(k)
        for ks in groups.values():
            out[ks] = to_square(torch.stack([ready[k] for k in ks]), s)
        for k in range(b):
            if k not in ready:
                out[k] = self._slow(data[k], k, labels, index).to(dev)
        return out

    def _decode_fast(self, data: list[Tensor]) -> list[Tensor | None]:
        if not data:
            return []
        try:
            return list(_decode_jpeg(data, self.device))
        except RuntimeError:
            pass
        # A batched decode returns nothing when one file fails: find the failures one by
        # one (rare: a broken file is decoded this way once, then skipped by the workers).
        result: list[Tensor | None] = []
        for t in data:
            try:
                result.append(_decode_jpeg([t], self.device)[0])
            except RuntimeError:
                result.append(None)
        return result

    def _slow(self, data: Tensor, k: int, labels: Tensor, index: Tensor) -> Tensor:
        """The worker path's PIL decode of one file, or its substitute when unreadable."""
        self.cpu_fallbacks += 1
        try:
            with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
                img.load()  # full decode, so truncation is detected, as in decode_image_file
                return decode_pil(img, self.size)
        except Exception as e:  # PIL raises many types for broken files; all mean "bad"
            reason = error_reason(e)
        ds = self.dataset
        j = int(index[k])
        self.bad_files += 1
        ds.mark_bad(j, reason)
        # The dataset's own rule: the next readable image (it skips j, now marked bad).
        x, y, j2 = ds[j]
        labels[k], index[k] = y, j2
        return x


_AVAILABLE: dict[str, bool] = {}


def gpu_decode_available(device: torch.device | str) -> bool:
    """Whether nvJPEG decoding works on ``device`` (tried once with a tiny JPEG)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    key = str(dev)
    if key not in _AVAILABLE:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, "JPEG")
        try:
            t = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
            _AVAILABLE[key] = _decode_jpeg([t], dev)[0].shape == (3, 16, 16)
        except Exception:  # noqa: BLE001 - a build without nvJPEG raises various types
            _AVAILABLE[key] = False
    return _AVAILABLE[key]


def use_gpu_decode(dataset: object, device: torch.device | str) -> bool:
    """True when GPU decoding applies: a JPEG-only file dataset without a decoded cache, on
    a CUDA device whose torchvision build has nvJPEG."""
    return (
        isinstance(dataset, FileImageDataset)
        and dataset.all_jpeg
        and dataset.decoded_cache is None
        and gpu_decode_available(device)
    )


__all__ = [
    "JpegBytesDataset",
    "JpegDecoder",
    "apply_orientation",
    "collate_jpeg",
    "exif_orientation",
    "gpu_decode_available",
    "unpack",
    "use_gpu_decode",
]
