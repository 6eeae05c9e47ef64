"""Training crops from the original image: torchvision's box distribution on non-square
images, the image borders reachable, exact agreement of the worker and batched samplers,
the nvJPEG path's crops (run on the CPU), and a training step on non-square JPEGs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from sslcli import api
from sslcli.data import gpu_decode
from sslcli.data.augment import ViewPipeline
from sslcli.data.crops import (
    CropDataset,
    CropPlan,
    Crops,
    collate_crops,
    crop_box,
    crop_rng,
)
from sslcli.data.datasets import open_dataset
from sslcli.data.decode import decode_image_file
from sslcli.data.geometric import sample_crop_boxes
from sslcli.data.views import ViewSpec

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def _ours(h: int, w: int, n: int, scale: tuple[float, float] = SCALE) -> np.ndarray:
    """n boxes through the training path: one CropPlan draw per sample index."""
    plan = CropPlan.of([ViewSpec(size=32, scale=scale)], seed=5)
    return np.array([plan.boxes(3, i, h, w)[0] for i in range(n)], dtype=np.float64)


def _torchvision(h: int, w: int, n: int, scale: tuple[float, float] = SCALE) -> np.ndarray:
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    return np.array(
        [RandomResizedCrop.get_params(img, list(scale), list(RATIO)) for _ in range(n)],
        dtype=np.float64,
    )


def _features(b: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
    top, left, bh, bw = b.T
    return {
        "area": bh * bw / (h * w),
        "log_ratio": np.log(bw / bh),
        "centre_y": (top + bh / 2) / h,
        "centre_x": (left + bw / 2) / w,
    }


@pytest.mark.parametrize("hw", [(240, 480), (500, 300)])
def test_boxes_follow_torchvision_on_non_square_images(hw: tuple[int, int]) -> None:
    h, w = hw
    n = 3000
    ours, ref = _features(_ours(h, w, n), h, w), _features(_torchvision(h, w, n), h, w)
    for key in ours:
        p = stats.ks_2samp(ours[key], ref[key]).pvalue
        assert p > 1e-3, f"{key}: KS p={p:.2g}"
    # The area is uniform in the scale range (where the box fits) and the ratio log-uniform.
    assert abs(ours["area"].mean() - ref["area"].mean()) < 0.02
    assert abs(ours["log_ratio"].mean() - ref["log_ratio"].mean()) < 0.03


def test_every_corner_is_reachable_on_a_wide_image() -> None:
    h, w = 24, 48
    b = _ours(h, w, 4000).astype(int)
    top, left, bh, bw = b.T
    bottom, right = top + bh, left + bw
    assert ((top == 0) & (left == 0)).any()
    assert ((top == 0) & (right == w)).any()
    assert ((bottom == h) & (left == 0)).any()
    assert ((bottom == h) & (right == w)).any()
    # A centre square (the old geometry) never reaches the left or right border.
    assert (left == 0).mean() > 0.02 and (right == w).mean() > 0.02


def test_fallback_is_the_central_crop_clamped_to_the_ratio_range() -> None:
    # A 10:1 strip with scale near 1: no try fits, torchvision falls back to the centre.
    u = [0.999] * 10 + [0.5] * 10 + [0.3, 0.7]
    assert crop_box(20, 200, (0.99, 1.0), RATIO, u) == (0, (200 - 27) // 2, 20, 27)
    assert crop_box(200, 20, (0.99, 1.0), RATIO, u) == ((200 - 27) // 2, 0, 27, 20)


def test_worker_and_batched_samplers_draw_the_same_boxes() -> None:
    """The scalar sampler of the workers and the batched one of the in-memory path are
    one algorithm: the same uniforms give the same boxes, on non-square images too."""
    for h, w, scale in ((37, 91, SCALE), (120, 64, (0.05, 0.4)), (30, 30, (0.9, 1.0))):
        gen = torch.Generator().manual_seed(h * w)
        batched = sample_crop_boxes(500, h, w, scale, RATIO, generator=gen)
        gen = torch.Generator().manual_seed(h * w)
        u = torch.rand((500, 22), generator=gen).double().tolist()
        scalar = torch.tensor([crop_box(h, w, scale, RATIO, row) for row in u])
        assert torch.equal(batched, scalar)


def test_boxes_are_a_pure_function_of_seed_epoch_and_index() -> None:
    plan = CropPlan.of([ViewSpec(count=2, size=32)], seed=7)
    assert plan.boxes(1, 42, 240, 480) == plan.boxes(1, 42, 240, 480)
    assert plan.boxes(1, 42, 240, 480) != plan.boxes(2, 42, 240, 480)
    assert plan.boxes(1, 42, 240, 480) != plan.boxes(1, 43, 240, 480)
    a, b = plan.boxes(1, 42, 240, 480)
    assert a != b  # the two views of a sample differ
    assert crop_rng(7, 1, 42).random() == crop_rng(7, 1, 42).random()


# --------------------------------------------------------------------------------------------
# The mark near the left edge of a 2:1 image
# --------------------------------------------------------------------------------------------

MARK = (255, 0, 0)


def write_marked_folder(root: Path, n: int = 8, fmt: str = "png") -> Path:
    """480x240 grey images whose left 40 px are red."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        a = np.full((240, 480, 3), 128, np.uint8)
        a[:, :40] = MARK
        Image.fromarray(a).save(root / f"m{k}.{fmt}", quality=95)
    return root


def _has_mark(x: torch.Tensor) -> bool:
    r, g, b = x.int().unbind(-3)
    return bool(((r > 200) & (g < 80) & (b < 80)).any())


def test_a_mark_at_the_left_edge_shows_up_in_some_views(tmp_path: Path) -> None:
    folder = write_marked_folder(tmp_path / "marked")
    ds = open_dataset(str(folder), "train", 224)
    # The old geometry (and still the evaluation one): a centre square never shows it.
    assert not any(_has_mark(decode_image_file(ds.path(i), 224)) for i in range(len(ds)))
    plan = CropPlan.of([ViewSpec(count=2, size=224)], seed=0, full_size=224)
    crops = CropDataset(ds, plan, epoch=0)
    seen = [_has_mark(v) for i in range(len(ds)) for v in crops[i][0].views]
    assert any(seen) and not all(seen)
    assert crops[0][0].views[0].shape == (3, 224, 224)
    assert not _has_mark(crops[0][0].full)  # the probe's square is the evaluation one


def test_jpeg_draft_keeps_the_view_resolution(tmp_path: Path) -> None:
    """A small box of a big JPEG is decoded reduced, but never below the view's side: the
    crop equals the one from the fully decoded image up to resampling differences."""
    rng = np.random.default_rng(0)
    big = np.kron(rng.integers(0, 256, (60, 80, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)  # 1280 x 960
    ds = open_dataset(str(tmp_path), "train", 32)
    plan = CropPlan.of([ViewSpec(count=4, size=32, scale=(0.05, 0.1))], seed=1)
    crops, _, _ = CropDataset(ds, plan, 0)[0]
    with Image.open(tmp_path / "big.jpg") as img:
        img.load()
        for (top, left, h, w), v in zip(plan.boxes(0, 0, 960, 1280), crops.views, strict=True):
            assert min(h, w) / 32 >= 2  # small enough boxes for the draft to act
            ref = img.resize((32, 32), Image.Resampling.BILINEAR, (left, top, left + w, top + h))
            ref_t = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1)
            assert (v.float() - ref_t.float()).abs().mean() < 12


# --------------------------------------------------------------------------------------------
# Device side: the pipeline on crops, the nvJPEG path (run on the CPU)
# --------------------------------------------------------------------------------------------


def test_pipeline_applies_device_ops_to_pre_cropped_views() -> None:
    specs = [ViewSpec(count=2, size=8, normalize=False, jitter_p=0, grayscale_p=0, flip_p=1.0)]
    views = [torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).expand(3, 3, 8, 8)] * 2
    out = ViewPipeline(specs)(Crops(views), generator=torch.Generator().manual_seed(0))
    assert len(out) == 2 and out[0].shape == (3, 3, 8, 8)
    assert torch.allclose(out[0] * 255, views[0].flip(-1).float())  # flip p=1, nothing else
    with pytest.raises(ValueError, match="pre-cropped"):
        ViewPipeline(specs)(Crops(views[:1]))


def test_gpu_decode_crops_from_the_full_image_with_the_workers_boxes(tmp_path: Path) -> None:
    folder = write_marked_folder(tmp_path / "jpegs", n=6, fmt="jpg")
    ds = open_dataset(str(folder), "train", 64)
    plan = CropPlan.of([ViewSpec(count=2, size=64, scale=(0.3, 1.0))], seed=1, full_size=64)
    jb = gpu_decode.JpegBytesDataset(ds)  # type: ignore[arg-type]
    batch = gpu_decode.collate_jpeg([jb[i] for i in range(len(ds))])
    dec = gpu_decode.JpegDecoder(ds, device="cpu", plan=plan)  # type: ignore[arg-type]
    crops, _, index = dec(batch, epoch=2)
    ref, _, ref_index = collate_crops([CropDataset(ds, plan, 2)[i] for i in range(len(ds))])
    assert torch.equal(index, ref_index)
    for v, r in zip(crops.views, ref.views, strict=True):
        assert v.shape == r.shape == (len(ds), 3, 64, 64)
        # Same boxes, different resamplers (torch vs PIL): a few grey levels apart.
        assert (v.float() - r.float()).abs().mean() < 4
    assert any(_has_mark(v[k]) for v in crops.views for k in range(len(ds)))
    assert crops.full is not None and not _has_mark(crops.full)


def test_nvjpeg_side_stream_is_synchronised_before_the_decode(monkeypatch) -> None:  # noqa: ANN001
    import torchvision.io

    calls: list[str] = []

    def fake_decode(data, mode=None, device=None):  # noqa: ANN001, ANN202
        calls.append("decode")
        return [torch.zeros(3, 4, 4, dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(gpu_decode, "_synchronize", lambda device: calls.append("sync"))
    monkeypatch.setattr(torchvision.io, "decode_jpeg", fake_decode)
    t = torch.zeros(10, dtype=torch.uint8)
    gpu_decode._decode_jpeg([t, t], torch.device("cpu"))
    gpu_decode._decode_jpeg([t], torch.device("cpu"))
    assert calls == ["sync", "decode", "sync", "decode"]


# --------------------------------------------------------------------------------------------
# Training on a folder of variable-size, non-square JPEGs at 224 px
# --------------------------------------------------------------------------------------------


def write_photo_folder(root: Path, n: int = 8, seed: int = 0) -> Path:
    """JPEGs of 300-500 px per side, aspect ratios from 3:5 to 5:3."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(300, 501, 2))
        small = rng.integers(0, 256, (math.ceil(h / 20), math.ceil(w / 20), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
        img.save(root / f"p{k}.jpg", quality=90)
    return root


def test_a_training_step_runs_at_224px_on_non_square_jpegs(tmp_path: Path) -> None:
    folder = write_photo_folder(tmp_path / "photos", n=4)
    result = api.train(
        "simclr",
        overrides={
            "backbone": {"name": "test_resnet"},
            "data": {"dataset": str(folder), "image_size": 224, "num_workers": 0},
            "trainer": {"epochs": 1, "batch_size": 4, "max_steps": 1, "eval_knn": False,
                        "out": str(tmp_path / "run")},
        },  # fmt: skip
    )
    assert result.steps == 1 and result.final_loss is not None
    assert math.isfinite(result.final_loss)


def test_boxes_are_drawn_on_the_upright_image(tmp_path: Path) -> None:
    """A photo stored sideways with an EXIF rotation is cropped like the upright one."""
    a = np.full((240, 480, 3), 120, np.uint8)
    a[:, :40] = MARK
    upright = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "a.jpg", exif=exif, quality=95)
    upright.save(tmp_path / "b.jpg", quality=95)
    ds = open_dataset(str(tmp_path), "train", 32)
    plan = CropPlan.of([ViewSpec(count=6, size=32, scale=(0.05, 0.3))], seed=0)
    rotated, _, _ = CropDataset(ds, plan, 0).base.read(0, lambda im: _crops(im, plan))
    plain, _, _ = CropDataset(ds, plan, 0).base.read(1, lambda im: _crops(im, plan))
    for r, p in zip(rotated.views, plain.views, strict=True):
        assert (r.float() - p.float()).abs().mean() < 3


def _crops(img: Image.Image, plan: CropPlan) -> Crops:
    from sslcli.data.crops import crop_views_pil

    return crop_views_pil(img, plan, epoch=0, index=0)  # the same boxes for both files


def test_batches_of_crops_keep_their_type_through_the_device_copy() -> None:
    from sslcli.data.loader import to_device

    c = Crops([torch.zeros(2, 3, 4, 4, dtype=torch.uint8)], torch.ones(2, 3, 8, 8))
    moved = to_device((c, torch.zeros(2), torch.arange(2)), torch.device("cpu"))
    assert isinstance(moved[0], Crops) and moved[0].full is not None


def test_online_probe_reads_the_evaluation_square_from_worker_crops(tmp_path: Path) -> None:
    """Labelled image folder, one DataLoader worker, online probe on: the workers send the
    probe's centre square along with the crops."""
    from tests.helpers import write_image_tree

    tree = write_image_tree(tmp_path / "tree", per_class=4)
    result = api.train(
        "simclr",
        overrides={
            "backbone": {"name": "test_resnet"},
            "data": {"dataset": str(tree), "image_size": 16, "num_workers": 1},
            "trainer": {"epochs": 1, "batch_size": 4, "max_steps": 2, "eval_knn": False,
                        "online_probe": True, "out": str(tmp_path / "run")},
        },  # fmt: skip
    )
    assert result.steps == 2


def test_device_cache_gets_its_batch_indices_on_its_device() -> None:
    """The epoch's order is moved to a device cache once; get_batch never receives a host
    index to copy per batch (a blocking pageable copy on CUDA). "meta" stands in for the
    GPU here."""
    from sslcli.data.cache import index_on
    from sslcli.engine.batches import BatchSource

    seen: list[torch.device] = []

    class FakeCache:
        device = torch.device("meta")

        def __len__(self) -> int:
            return 12

        def get_batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
            seen.append(idx.device)
            return idx, idx, idx

    source = BatchSource(
        FakeCache(), seed=0, steps_per_epoch=3, global_batch=4, local_batch=4,  # type: ignore[arg-type]
    )  # fmt: skip
    batches = list(source.host(0, 1))
    assert len(batches) == 2 and seen == [torch.device("meta")] * 2
    on_device = torch.arange(3, device="meta")
    assert index_on(on_device, torch.device("meta")) is on_device  # no copy at all
