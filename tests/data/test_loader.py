"""Device-side data path: prefetcher, whole-dataset cache, batched JPEG decode (CPU runs of
the code paths CUDA uses)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from sslcli.data.badfiles import UnreadableImageWarning
from sslcli.data.cache import CachedDataset, maybe_cache
from sslcli.data.datasets import open_dataset
from sslcli.data.gpu_decode import (
    JpegBytesDataset,
    JpegDecoder,
    apply_orientation,
    collate_jpeg,
    exif_orientation,
    unpack,
    use_gpu_decode,
)
from sslcli.data.images import FileImageDataset
from sslcli.data.loader import DevicePrefetcher
from sslcli.errors import DataError, TooManyBadImagesError

CPU = torch.device("cpu")
# Pass-through, foreground look-ahead (the CUDA default), deeper, and a helper thread.
MODES = [{"depth": 0}, {"depth": 1}, {"depth": 3}, {"depth": 2, "background": True}]


def _batches(
    n: int = 6, b: int = 4, s: int = 8
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g),
            torch.randint(0, 10, (b,), generator=g),
            torch.arange(k * b, (k + 1) * b),
        )
        for k in range(n)
    ]


# --------------------------------------------------------------------------------------------
# DevicePrefetcher
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_prefetcher_yields_same_batches_in_order(mode: dict[str, Any]) -> None:
    ref = _batches()
    got = list(DevicePrefetcher(iter(ref), CPU, **mode))
    assert len(got) == len(ref)
    for (x, y, i), (rx, ry, ri) in zip(got, ref, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry) and torch.equal(i, ri)


def test_prefetcher_defaults_to_pass_through_on_cpu() -> None:
    p = DevicePrefetcher(_batches(), "cpu")
    assert p.depth == 0 and not p.pin_memory and not p.background
    x, _, _ = next(p)
    assert x is _batches()[0][0] or torch.equal(x, _batches()[0][0])


@pytest.mark.parametrize("mode", MODES)
def test_prefetcher_passes_nested_structures_and_counts(mode: dict[str, Any]) -> None:
    batches = [{"img": torch.full((2, 3), k), "meta": [torch.tensor(k), "tag"]} for k in range(3)]
    p = DevicePrefetcher(batches, "cpu", **mode)
    out = list(p)
    assert [int(o["img"][0, 0]) for o in out] == [0, 1, 2]
    assert [int(o["meta"][0]) for o in out] == [0, 1, 2] and out[0]["meta"][1] == "tag"
    assert p.delivered == 3
    assert list(p) == []  # exhausted stays exhausted
    p.close()


def _views_fn(gen: torch.Generator, calls: list[int]) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A stand-in for view generation: records the order it is called in and draws noise."""

    def fn(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        x, y, i = batch
        calls.append(int(i[0]))
        noise = torch.rand(x.shape, generator=gen)
        return x.float() + noise, y, i

    return fn


@pytest.mark.parametrize("mode", MODES[:3])
def test_side_function_runs_once_per_batch_in_order(mode: dict[str, Any]) -> None:
    ref = _batches()
    calls: list[int] = []
    gen = torch.Generator().manual_seed(1)
    p = DevicePrefetcher(ref, CPU, fn=_views_fn(gen, calls), generators=[gen], **mode)
    seen = []
    for k, (_, _, i) in enumerate(p):
        seen.append(int(i[0]))
        # `depth` batches beyond the current one have been prepared when step k runs.
        assert len(calls) == min(k + 1 + mode["depth"], len(ref))
    assert calls == seen == [int(b[2][0]) for b in ref]


def test_side_function_in_background_thread_runs_in_order() -> None:
    ref = _batches(8)
    calls: list[int] = []
    gen = torch.Generator().manual_seed(1)
    with DevicePrefetcher(
        ref, CPU, fn=_views_fn(gen, calls), generators=[gen], depth=2, background=True
    ) as p:
        seen = [int(i[0]) for _, _, i in p]
    assert calls == seen == [int(b[2][0]) for b in ref]


@pytest.mark.parametrize("mode", MODES[1:])
def test_side_function_draws_identical_with_and_without_lookahead(mode: dict[str, Any]) -> None:
    outs = []
    for m in ({"depth": 0}, mode):
        gen = torch.Generator().manual_seed(7)
        with DevicePrefetcher(_batches(), CPU, fn=_views_fn(gen, []), generators=[gen], **m) as p:
            outs.append([x for x, _, _ in p])
    assert len(outs[0]) == len(outs[1])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES[1:])
def test_close_rewinds_generators_to_the_delivered_batch(mode: dict[str, Any]) -> None:
    """Leaving after 3 of 6 batches: the look-ahead already ran fn on later batches; close()
    must put the generator back where a plain loop would have left it, or resume is not
    exact."""
    states, nexts = [], []
    for m in ({"depth": 0}, mode):
        gen = torch.Generator().manual_seed(3)
        with DevicePrefetcher(_batches(), CPU, fn=_views_fn(gen, []), generators=[gen], **m) as p:
            for k, _ in enumerate(p):
                if k == 2:
                    if not m.get("background") and m["depth"]:
                        # the live generator is ahead here ...
                        assert not torch.equal(gen.get_state(), p.delivered_generator_states()[0])
                    break
        states.append(gen.get_state())
        nexts.append(torch.rand(4, generator=gen))
    assert torch.equal(states[0], states[1])  # ... and rewound on exit
    assert torch.equal(nexts[0], nexts[1])


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_mid_iteration_sees_delivered_states(mode: dict[str, Any]) -> None:
    """A checkpoint written after step 2 must hold the generator as a plain loop leaves it
    after 2 batches, and iterating on afterwards must be unaffected."""
    ref = torch.Generator().manual_seed(9)
    for x, _, _ in _batches()[:2]:
        torch.rand(x.shape, generator=ref)
    plain = [x for x, _, _ in DevicePrefetcher(
        _batches(), CPU, fn=_views_fn(torch.Generator().manual_seed(9), []), depth=0
    )]  # fmt: skip
    gen = torch.Generator().manual_seed(9)
    got = []
    with DevicePrefetcher(_batches(), CPU, fn=_views_fn(gen, []), generators=[gen], **mode) as p:
        for k, (x, _, _) in enumerate(p):
            got.append(x)
            if k == 1:
                with p.generators_at_delivered():
                    saved = gen.get_state()
    assert torch.equal(saved, ref.get_state())
    for a, b in zip(plain, got, strict=True):
        assert torch.equal(a, b)


def test_close_after_exhaustion_keeps_generator_state() -> None:
    gen = torch.Generator().manual_seed(5)
    with DevicePrefetcher(_batches(3), CPU, fn=_views_fn(gen, []), generators=[gen], depth=1) as p:
        n = sum(1 for _ in p)
    ref = torch.Generator().manual_seed(5)
    for x, _, _ in _batches(3):
        torch.rand(x.shape, generator=ref)
    assert n == 3 and torch.equal(gen.get_state(), ref.get_state())


@pytest.mark.parametrize("mode", MODES)
def test_errors_surface_at_the_batch_that_caused_them(mode: dict[str, Any]) -> None:
    def fn(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if int(batch[2][0]) == 8:  # the third batch
            raise TooManyBadImagesError("boom")
        return batch

    got = []
    with pytest.raises(TooManyBadImagesError, match="boom"):
        with DevicePrefetcher(_batches(), CPU, fn=fn, **mode) as p:
            for b in p:
                got.append(int(b[2][0]))
    assert got == [0, 4]  # both earlier batches were delivered first


def test_close_stops_the_background_thread_and_source() -> None:
    finished = []

    def source() -> Iterator[tuple[torch.Tensor, ...]]:
        try:
            yield from _batches(50)
        finally:
            finished.append(True)

    p = DevicePrefetcher(source(), CPU, depth=2, background=True)
    next(p)
    thread = p._thread
    p.close()
    assert thread is not None and not thread.is_alive() and finished == [True]
    assert list(p) == []


def test_transfer_false_hands_host_batch_to_fn() -> None:
    seen: list[torch.device] = []

    def fn(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        seen.append(batch[0].device)
        return batch

    list(DevicePrefetcher([[torch.zeros(2)]], "cpu", fn=fn, transfer=False, depth=1))
    assert seen == [CPU]


# --------------------------------------------------------------------------------------------
# CachedDataset
# --------------------------------------------------------------------------------------------


def test_cache_of_array_dataset_reuses_its_memory_and_serves_identical_images() -> None:
    ds = open_dataset("digits", "train", 16)
    c = CachedDataset(ds)
    assert c.images.data_ptr() == ds.images.data_ptr()  # no second copy
    idx = torch.tensor([5, 0, 1437, 5, 77])
    x, y, i = c.get_batch(idx)
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.uint8 and x.is_contiguous()
    for k, j in enumerate(idx.tolist()):
        rx, ry, ri = ds[j]
        assert torch.equal(x[k], rx) and int(y[k]) == ry and int(i[k]) == ri
    assert torch.equal(c[3][0], ds[3][0]) and len(c) == len(ds)


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus a red top-left block that makes orientation visible."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    r = np.random.default_rng(seed)
    a = np.stack(
        [128 + 100 * np.sin(6 * xx + 3 * r.random()), 128 + 100 * np.cos(5 * yy + r.random()),
         255 * xx * yy], -1,
    )  # fmt: skip
    a[: h // 3, : w // 3] = [250, 20, 20]
    return np.clip(a, 0, 255).astype(np.uint8)


def _write_jpeg(path: Path, h: int, w: int, seed: int, orientation: int = 1) -> None:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    Image.fromarray(_smooth(h, w, seed)).save(path, "JPEG", quality=95, exif=exif.tobytes())


@pytest.fixture
def jpeg_dir(tmp_path: Path) -> Path:
    d = tmp_path / "jpegs"
    d.mkdir()
    shapes = [(120, 80, 1), (64, 96, 1), (300, 200, 1), (90, 150, 6), (100, 70, 3), (33, 200, 8),
              (40, 40, 1), (77, 91, 2), (60, 110, 5), (95, 45, 7), (50, 50, 4)]  # fmt: skip
    for k, (h, w, o) in enumerate(shapes):
        _write_jpeg(d / f"{k:02d}.jpg", h, w, k, o)
    return d


def test_cache_of_file_dataset_fills_its_shared_cache(jpeg_dir: Path) -> None:
    ds = open_dataset(str(jpeg_dir), "train", 24, cache=True)
    assert isinstance(ds, FileImageDataset) and ds.decoded_cache is not None
    c = CachedDataset(ds)
    assert c.images.data_ptr() == ds.decoded_cache.data_ptr()
    fresh = open_dataset(str(jpeg_dir), "train", 24)
    x, y, i = c.get_batch(torch.arange(len(ds)).flip(0))
    for k in range(len(ds)):
        assert torch.equal(x[k], fresh[len(ds) - 1 - k][0])
    assert torch.equal(i, torch.arange(len(ds)).flip(0))


def test_cache_keeps_the_substitute_of_a_bad_file(jpeg_dir: Path) -> None:
    good = (jpeg_dir / "03.jpg").read_bytes()
    (jpeg_dir / "03.jpg").write_bytes(good[: len(good) // 2])  # header fine, body truncated
    ds = open_dataset(str(jpeg_dir), "train", 24, max_bad_fraction=0.5)
    with pytest.warns(UnreadableImageWarning):
        c = CachedDataset(ds)
    x, _, i = c.get_batch(torch.tensor([3, 4]))
    assert i.tolist() == [4, 4]  # file 3 is served by its substitute, the next one
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], ds[4][0])


def test_cache_size_limit(jpeg_dir: Path) -> None:
    ds = open_dataset(str(jpeg_dir), "train", 24)
    with pytest.raises(DataError, match="exceed"):
        CachedDataset(ds, max_bytes=len(ds) * 3 * 24 * 24 - 1)
    with pytest.warns(UserWarning, match="exceed"):
        assert maybe_cache(ds, max_bytes=100) is ds
    assert isinstance(maybe_cache(ds), CachedDataset)


def test_maybe_cache_leaves_host_batch_datasets_alone() -> None:
    ds = open_dataset("digits", "train", 16)
    if not callable(getattr(ds, "get_batch", None)):
        pytest.skip("this datasets.py has no get_batch fast path")
    assert maybe_cache(ds) is ds
    assert isinstance(maybe_cache(ds, device="meta"), CachedDataset)


# --------------------------------------------------------------------------------------------
# Batched JPEG decode (the GPU path, run on the CPU)
# --------------------------------------------------------------------------------------------


def _decode_all(
    ds: FileImageDataset, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, JpegDecoder]:
    raw = JpegBytesDataset(ds)
    dec = JpegDecoder(ds, size, device="cpu")
    batch = collate_jpeg([raw[k] for k in range(len(ds))])
    x, y, i = dec(batch)
    return x, y, i, dec


@pytest.mark.parametrize("size", [24, 48])
def test_batched_decode_matches_pil_path(jpeg_dir: Path, size: int) -> None:
    ds = open_dataset(str(jpeg_dir), "train", size)
    assert isinstance(ds, FileImageDataset) and ds.all_jpeg
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision's DeprecationWarning must stay silenced
        x, y, i, dec = _decode_all(ds, size)
    assert x.shape == (len(ds), 3, size, size) and x.dtype == torch.uint8
    assert dec.cpu_fallbacks == 0 and dec.bad_files == 0
    assert torch.equal(i, torch.arange(len(ds))) and torch.equal(y, ds.labels)
    for k in range(len(ds)):
        ref = ds[k][0]
        diff = (x[k].int() - ref.int()).abs()
        # PIL shrinks in the DCT domain first; the tensor path resizes the full decode.
        assert diff.float().mean() < 2.0 and diff.max() <= 24, (ds.path(k), diff.max())


def test_orientation_is_what_makes_rotated_files_match(jpeg_dir: Path) -> None:
    ds = open_dataset(str(jpeg_dir), "train", 24)
    raw = JpegBytesDataset(ds)
    k = 3  # 90x150 stored, orientation 6
    data = raw[k][0]
    assert exif_orientation(data.numpy().tobytes()) == 6
    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = decode_jpeg(data)
    from sslcli.data.decode import to_square

    unrotated = to_square(plain, 24)
    assert (unrotated.int() - ds[k][0].int()).abs().float().mean() > 20


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_equals_pil_exif_transpose(orientation: int) -> None:
    a = _smooth(5, 7, orientation)
    a[0, 0] = [0, 255, 0]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        ref = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    got = apply_orientation(torch.from_numpy(a).permute(2, 0, 1), orientation)
    assert np.array_equal(got.permute(1, 2, 0).numpy(), ref)


def test_exif_orientation_parser_both_byte_orders() -> None:
    def jpeg_with(tiff: bytes) -> bytes:
        seg = b"Exif\x00\x00" + tiff
        return b"\xff\xd8" + b"\xff\xe1" + (len(seg) + 2).to_bytes(2, "big") + seg + b"\xff\xda"

    little = b"II*\x00" + (8).to_bytes(4, "little") + (1).to_bytes(2, "little")
    little += b"\x12\x01" + b"\x03\x00" + (1).to_bytes(4, "little") + b"\x06\x00\x00\x00"
    big = b"MM\x00*" + (8).to_bytes(4, "big") + (1).to_bytes(2, "big")
    big += b"\x01\x12" + b"\x00\x03" + (1).to_bytes(4, "big") + b"\x00\x08\x00\x00"
    assert exif_orientation(jpeg_with(little)) == 6
    assert exif_orientation(jpeg_with(big)) == 8
    assert exif_orientation(b"\x89PNG\r\n") == 1
    assert exif_orientation(b"\xff\xd8\xff\xda") == 1  # no EXIF before the scan


def test_non_jpeg_bytes_take_the_pil_path_exactly(jpeg_dir: Path) -> None:
    # A PNG saved with a .jpg name: nvJPEG/libjpeg refuse it, PIL reads it fine.
    Image.fromarray(_smooth(70, 50, 99)).save(jpeg_dir / "05.jpg", "PNG")
    ds = open_dataset(str(jpeg_dir), "train", 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a bad file: no UnreadableImageWarning
        x, _, i, dec = _decode_all(ds, 24)
    assert dec.cpu_fallbacks == 1 and dec.bad_files == 0 and int(i[5]) == 5
    assert torch.equal(x[5], ds[5][0])


def test_corrupt_file_follows_dataset_rules(jpeg_dir: Path) -> None:
    good = (jpeg_dir / "04.jpg").read_bytes()
    (jpeg_dir / "04.jpg").write_bytes(good[: len(good) // 2])  # passes the header probe
    ds = open_dataset(str(jpeg_dir), "train", 24, max_bad_fraction=0.2)
    with pytest.warns(UnreadableImageWarning, match="04.jpg"):
        x, y, i, dec = _decode_all(ds, 24)
    assert dec.bad_files == 1 and ds.bad_count == 1
    # Replaced by the next readable image; image, label and index agree.
    assert int(i[4]) == 5 and int(y[4]) == int(ds.labels[5])
    assert torch.equal(x[4], ds[5][0])
    # Workers skip it from now on, as they do for files they found bad themselves.
    assert JpegBytesDataset(ds)[4][2] == 5


def test_too_many_bad_files_raise(jpeg_dir: Path) -> None:
    for name in ("01.jpg", "02.jpg"):
        good = (jpeg_dir / name).read_bytes()
        (jpeg_dir / name).write_bytes(good[: len(good) // 2])
    ds = open_dataset(str(jpeg_dir), "train", 24, max_bad_fraction=0.1)
    with pytest.warns(UnreadableImageWarning), pytest.raises(TooManyBadImagesError):
        _decode_all(ds, 24)


def test_garbage_bytes_without_probe(tmp_path: Path) -> None:
    """Files a header probe would have dropped (large folders skip the probe)."""
    paths = []
    for k in range(4):
        p = tmp_path / f"{k}.jpg"
        _write_jpeg(p, 40, 30, k)
        paths.append(str(p))
    Path(paths[1]).write_bytes(b"<html>not an image</html>")
    ds = FileImageDataset("t", "train", paths, [0, 1, 2, 3], None, 16, probe=False,
                          max_bad_fraction=0.5)  # fmt: skip
    with pytest.warns(UnreadableImageWarning):
        x, y, i, _ = _decode_all(ds, 16)
    assert i.tolist() == [0, 2, 2, 3] and y.tolist() == [0, 2, 2, 3]
    assert torch.equal(x[1], ds[2][0])  # the substitute comes from the dataset's own path
    assert (x[1].int() - x[2].int()).abs().max() <= 24


def test_packing_round_trip_and_gpu_gate(jpeg_dir: Path) -> None:
    ds = open_dataset(str(jpeg_dir), "train", 24)
    raw = JpegBytesDataset(ds)
    samples = [raw[k] for k in (3, 0, 7)]
    (data, offsets), y, i = collate_jpeg(samples)
    assert offsets[0] == 0 and offsets[-1] == data.numel() and i.tolist() == [3, 0, 7]
    for t, s in zip(unpack((data, offsets)), samples, strict=True):
        assert torch.equal(t, s[0])
    assert not use_gpu_decode(ds, "cpu")  # only where nvJPEG exists


def test_prefetcher_with_decoder_as_side_function(jpeg_dir: Path) -> None:
    """The wiring the trainer uses on CUDA (transfer=False, decoder as fn), run on the CPU."""
    ds = open_dataset(str(jpeg_dir), "train", 24)
    loader = torch.utils.data.DataLoader(
        JpegBytesDataset(ds), batch_size=4, collate_fn=collate_jpeg, num_workers=0
    )
    dec = JpegDecoder(ds, device="cpu")
    got = list(DevicePrefetcher(loader, CPU, fn=dec, transfer=False, depth=2, background=True))
    x = torch.cat([b[0] for b in got])
    i = torch.cat([b[2] for b in got])
    ref, _, ref_i, _ = _decode_all(ds, 24)
    assert torch.equal(x, ref) and torch.equal(i, ref_i)
