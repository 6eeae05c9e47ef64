"""``ssl views``: the grid and per-view pictures of what training makes, through the
training code (crop geometry from the original image, multi-crop included)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sslcli import api
from sslcli.cli.app import main
from sslcli.preview import grid_image, view_rows, views_grid_png


@pytest.fixture(scope="module")
def marked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """480x240 uniform grey images whose left 40 px are white."""
    root = tmp_path_factory.mktemp("marked")
    for k in range(8):
        a = np.full((240, 480, 3), 100, np.uint8)
        a[:, :40] = 255
        Image.fromarray(a).save(root / f"m{k}.png")
    return root


def _shows_mark(path: Path) -> bool:
    # Every op after the crop maps a uniform image to a uniform one (jitter, grayscale,
    # blur, normalisation of a constant): only a crop that reaches the mark has structure.
    a = np.asarray(Image.open(path)).astype(int)
    return int(a.max() - a.min()) > 20


def test_views_dir_shows_the_left_edge_mark(marked: Path, tmp_path: Path) -> None:
    out = tmp_path / "views"
    assert main(["views", "simclr", "--data", str(marked), "--out", str(out)]) == 0
    views = sorted(out.glob("*_[0-9].png"))
    assert len(views) == 8 * 2 and len(list(out.glob("*_source.png"))) == 8
    assert Image.open(views[0]).size == (16, 16)  # simclr's default view size
    assert Image.open(out / "0_source.png").size == (480, 240)
    shown = [_shows_mark(p) for p in views]
    assert any(shown) and not all(shown)


def test_views_grid_png_and_multi_crop(marked: Path, tmp_path: Path) -> None:
    _, run, _ = api.resolve_config(
        "dino", overrides={"data": {"dataset": str(marked), "image_size": 32},
                           "backbone": {"name": "test_resnet"}},
    )  # fmt: skip
    rows = view_rows(run, n=3, seed=1)
    assert len(rows) == 3
    sizes = [int(v.shape[-1]) for v in rows[0].views]
    assert sizes[:2] == [32, 32] and len(sizes) > 2 and max(sizes[2:]) < 32  # local crops
    png = views_grid_png(run, n=3, seed=1)
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.height > 3 * 32
    assert views_grid_png(run, n=3, seed=1) == png  # seeded: the same picture
    grid = tmp_path / "grid.png"
    assert main(["views", "dino", "--data", str(marked), "--image-size", "32",
                 "--backbone", "test_resnet", "--n", "2", "--out", str(grid)]) == 0  # fmt: skip
    assert Image.open(grid).size[1] < img.height  # two rows instead of three


def test_views_on_in_memory_data() -> None:
    _, run, _ = api.resolve_config("simclr", overrides={"backbone": {"name": "test_resnet"}})
    rows = view_rows(run, n=2)
    assert len(rows) == 2 and len(rows[0].views) == 2  # simclr: two views of digits
    assert rows[0].views[0].shape == (3, 16, 16)
    # In the grid, 16 px views are enlarged 6x pixel for pixel (96 px tiles), not smoothed.
    grid = grid_image(rows)
    assert grid.height == 4 + 2 * (96 + 4)
    tile = np.asarray(grid)[4:100, -100:-4]  # the last view of the first row
    view = rows[0].views[-1].permute(1, 2, 0).numpy()
    assert (tile == view.repeat(6, axis=0).repeat(6, axis=1)).all()


def test_views_bad_input_is_one_line(marked: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    assert main(["views", "simclr", "--data", str(marked), "--n", "0",
                 "--out", str(tmp_path / "g.png")]) == 2  # fmt: skip
    assert main(["views", "simclr", "--data", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "g.png")]) == 2  # fmt: skip
    (tmp_path / "file").write_text("x")
    assert main(["views", "simclr", "--data", str(marked), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("ssl: error:") for line in err)
