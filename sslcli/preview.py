"""What a method is trained on: the views ``ssl train`` makes, as pictures (``ssl views``).

Everything goes through the training code itself: the dataset is opened as the trainer
opens it, image files are cropped by :class:`~sslcli.data.crops.CropDataset` (the workers'
code) and in-memory arrays by the batched pipeline, and the device-side operations are
those of :class:`~sslcli.data.augment.ViewPipeline` with the method's own
:class:`~sslcli.data.views.ViewSpec` list. Only the final normalisation is left out, so
that the pictures show colours, not standardised values (it draws no random numbers, so
the views are otherwise the ones training would make with these draws).

The ``N`` source images are the first ``N`` of epoch 0's data order for the seed, and the
crop boxes and device-side parameters are drawn from that seed as training draws them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from sslcli.config import RunConfig
from sslcli.data.views import ViewSpec
from sslcli.errors import DataError

# Layout of the grid picture (pixels).
_GAP = 4
# Grid tiles smaller than this (digits' 16 px views) are enlarged by a whole factor, pixel
# for pixel, so what the model sees can be looked at; the per-view files keep their size.
_MIN_TILE = 96
_BACKGROUND = (32, 32, 32)


@dataclass
class ViewRow:
    """One source image and its views: uint8 ``[3, H, W]`` tensors, views un-normalised."""

    index: int
    source: Tensor
    views: list[Tensor]


def _views_of(config: RunConfig) -> list[ViewSpec]:
    """The method's views for ``config``: the method is built as the trainer builds it."""
    from sslcli import registry
    from sslcli.backbones import make_spec

    method_cls = registry.load(config.method)
    mcfg = method_cls.Config(**config.method_options)
    b, d = config.backbone, config.data
    backbone = make_spec(b.name, d.image_size, b.small_stem, b.drop_path_rate, b.kwargs).build()
    return list(method_cls(mcfg, backbone).views())


def _source_image(ds: object, index: int) -> Tensor:
    """The image as stored: the original file (upright, RGB) or the in-memory array row."""
    from sslcli.data.images import FileImageDataset

    if isinstance(ds, FileImageDataset):
        with Image.open(ds.path(index)) as img:
            img.load()
            rgb = (ImageOps.exif_transpose(img) or img).convert("RGB")
            return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
    x, _, _ = ds[index]  # type: ignore[index]
    return x


def view_rows(config: RunConfig, n: int = 8, seed: int = 0) -> list[ViewRow]:
    """The first ``n`` images of epoch 0 (for ``seed``) and the views training makes."""
    from sslcli.data.augment import ViewPipeline
    from sslcli.data.crops import CropDataset, CropPlan, collate_crops
    from sslcli.data.datasets import open_dataset
    from sslcli.data.images import FileImageDataset
    from sslcli.runtime import epoch_order

    if n < 1:
        raise DataError(f"--n must be at least 1, got {n}")
    specs = _views_of(config)
    d = config.data
    ds = open_dataset(
        d.dataset, "train", d.load_size or d.image_size, max_bad_fraction=d.max_bad_fraction
    )
    order = epoch_order(len(ds), seed, 0)[: min(n, len(ds))]
    shown = [s.model_copy(update={"normalize": False}) for s in specs]
    pipeline = ViewPipeline(shown)
    # The trainer's augmentation generator for this seed (rank 0), on the CPU.
    gen = torch.Generator().manual_seed(seed * 7919)
    if isinstance(ds, FileImageDataset):
        crops_ds = CropDataset(ds, CropPlan.of(specs, seed), epoch=0)
        crops, _, index = collate_crops([crops_ds[int(i)] for i in order])
        views = pipeline(crops, generator=gen)
    else:
        images, _, index = ds.get_batch(order) if hasattr(ds, "get_batch") else _stack(ds, order)
        views = pipeline(images, generator=gen)
    as_u8 = [(v.clamp(0, 1) * 255).round().to(torch.uint8) for v in views]
    return [
        ViewRow(int(j), _source_image(ds, int(j)), [v[r] for v in as_u8])
        for r, j in enumerate(index.tolist())
    ]


def _stack(ds: object, order: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    items = [ds[int(i)] for i in order]  # type: ignore[index]
    return (
        torch.stack([x for x, _, _ in items]),
        torch.tensor([y for _, y, _ in items]),
        torch.tensor([j for _, _, j in items]),
    )


def _pil(x: Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def grid_image(rows: list[ViewRow]) -> Image.Image:
    """One row per image: the source (its aspect kept, as tall as the largest view), then
    its views at their own sizes, top-aligned; small views enlarged by a whole factor
    (nearest neighbour, so each pixel stays one block) until the largest is ``_MIN_TILE``."""
    largest = max(int(v.shape[-1]) for r in rows for v in r.views)
    zoom = max(1, -(-_MIN_TILE // largest))
    height = largest * zoom
    sources = []
    for r in rows:
        h, w = int(r.source.shape[-2]), int(r.source.shape[-1])
        sources.append(_pil(r.source).resize((max(1, round(w * height / h)), height)))
    src_w = max(s.width for s in sources)
    widths = [int(v.shape[-1]) * zoom for v in rows[0].views]
    total_w = _GAP + src_w + _GAP + sum(w + _GAP for w in widths) + _GAP
    total_h = _GAP + len(rows) * (height + _GAP)
    canvas = Image.new("RGB", (total_w, total_h), _BACKGROUND)
    for k, (r, src) in enumerate(zip(rows, sources, strict=True)):
        y = _GAP + k * (height + _GAP)
        canvas.paste(src, (_GAP + (src_w - src.width) // 2, y))
        x = _GAP + src_w + 2 * _GAP
        for v in r.views:
            tile = _pil(v)
            if zoom > 1:
                tile = tile.resize((tile.width * zoom, tile.height * zoom), Image.NEAREST)
            canvas.paste(tile, (x, y))
            x += tile.width + _GAP
    return canvas


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def views_grid_png(config: RunConfig, n: int = 8, seed: int = 0) -> bytes:
    """PNG bytes of the grid of :func:`view_rows` for the resolved run ``config``."""
    return _png(grid_image(view_rows(config, n, seed)))


def is_grid_path(out: Path) -> bool:
    """``--out`` names a grid picture (a ``.png`` path that is not a directory)."""
    return out.suffix.lower() == ".png" and not out.is_dir()


def write_views(config: RunConfig, out: Path, n: int = 8, seed: int = 0) -> list[Path]:
    """The grid at ``out`` (a ``.png`` path), or every picture in the directory ``out``
    (created if needed): ``IMAGE_source.png`` and one ``IMAGE_VIEW.png`` per view, IMAGE
    the row (0-based) and VIEW the view's position in the method's view list."""
    rows = view_rows(config, n, seed)
    if is_grid_path(out):
        if not out.parent.is_dir():
            raise DataError(f"directory for --out does not exist: {out.parent}")
        out.write_bytes(_png(grid_image(rows)))
        return [out]
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory or a .png path")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, r in enumerate(rows):
        pictures = [("source", r.source)] + [(str(v), x) for v, x in enumerate(r.views)]
        for name, x in pictures:
            path = out / f"{k}_{name}.png"
            _pil(x).save(path)
            written.append(path)
    return written


__all__ = ["ViewRow", "grid_image", "view_rows", "views_grid_png", "write_views"]
