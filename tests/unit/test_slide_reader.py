"""Slides read lazily: any region of any pyramid level, exactly, from the segments it touches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from phenocascade.config import Settings
from phenocascade.errors import (
    DecompressionBombError,
    PathNotAllowedError,
    UnsupportedImageError,
)
from phenocascade.store.slides import Slide, is_slide, open_slide, read_tile
from phenocascade.streams import events
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import Tiling, tile_submissions
from phenocascade.ui.images import task_pixels

RNG = np.random.default_rng(5)
RGB = RNG.integers(0, 255, (1_100, 1_300, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RGB OME-TIFF, tiled 256 px, zlib, with two reduced levels in SubIFDs."""
    path = tmp_path_factory.mktemp("slides") / "rgb.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(RGB, tile=(256, 256), compression="zlib", subifds=2)
        for step in (2, 4):
            tif.write(RGB[::step, ::step], tile=(256, 256), compression="zlib", subfiletype=1)
    return path


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("region", [(0, 0, 64, 64), (20, 25, 150, 100), "bottom-right", "whole"])
def test_a_region_reads_exactly_the_pixels_of_its_level(
    pyramid: Path, level: int, region: tuple[int, int, int, int] | str
) -> None:
    expected_level = RGB[:: 2**level, :: 2**level]
    height, width = expected_level.shape[:2]
    if region == "bottom-right":  # partial TIFF tiles at both edges
        region = (width - 77, height - 33, 77, 33)
    elif region == "whole":
        region = (0, 0, width, height)
    assert isinstance(region, tuple)
    x, y, w, h = region
    with Slide(pyramid) as slide:
        assert slide.level(level).downsample == pytest.approx(RGB.shape[1] / width)
        got = slide.read(level, x, y, w, h)
    assert got.shape == (h, w, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected_level[y : y + h, x : x + w])


def test_a_flat_striped_grey_tiff_reads_by_strips(tmp_path: Path) -> None:
    grey = RNG.integers(0, 65535, (700, 500), dtype=np.uint16)
    path = tmp_path / "grey.tif"
    tifffile.imwrite(path, grey, rowsperstrip=64, compression="zlib")
    with Slide(path) as slide:
        assert len(slide.levels) == 1
        got = slide.read(0, 10, 100, 300, 333)
    np.testing.assert_array_equal(got[:, :, 0], grey[100:433, 10:310])


def test_the_thumbnail_reads_a_small_level(pyramid: Path) -> None:
    with Slide(pyramid) as slide:
        pixels, scale = slide.thumbnail(300)
    # Level 2 (325 px wide) is the smallest at least 300 px: read whole, then halved.
    assert scale == 8.0
    np.testing.assert_array_equal(pixels, RGB[::4, ::4][::2, ::2])


def test_a_slide_is_a_pyramid_or_over_the_pixel_limit(pyramid: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, RGB)
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert is_slide(pyramid, max_pixels=64_000_000)
    assert not is_slide(flat, max_pixels=64_000_000)
    assert is_slide(flat, max_pixels=1_000_000)
    assert not is_slide(png, max_pixels=1)


def test_bad_slides_and_regions_say_what_to_do(pyramid: Path, tmp_path: Path) -> None:
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
    with pytest.raises(UnsupportedImageError, match=r"axes .*own slide"):
        Slide(stack)
    floats = tmp_path / "float.tif"
    tifffile.imwrite(floats, np.zeros((64, 64), np.float32))
    with pytest.raises(UnsupportedImageError, match="8- or 16-bit"):
        Slide(floats)
    one_strip = tmp_path / "strip.tif"
    tifffile.imwrite(one_strip, np.zeros((6_000, 6_000), np.uint16), rowsperstrip=6_000)
    with (
        Slide(one_strip) as slide,
        pytest.raises(UnsupportedImageError, match="save the slide tiled"),
    ):
        slide.read(0, 0, 0, 64, 64)
    with Slide(pyramid) as slide:
        with pytest.raises(UnsupportedImageError, match="level 3 does not exist"):
            slide.read(3, 0, 0, 8, 8)
        with pytest.raises(UnsupportedImageError, match="leaves level 1"):
            slide.read(1, 600, 0, 100, 8)
    with pytest.raises(PathNotAllowedError):
        open_slide(pyramid, roots=[tmp_path / "elsewhere"])
    with pytest.raises(DecompressionBombError, match="max_file_bytes"):
        open_slide(pyramid, roots=[pyramid.parent], max_bytes=100)


def test_a_tile_task_shows_the_tile_and_a_bad_tile_names_itself(pyramid: Path) -> None:
    settings = Settings(allowed_roots=[pyramid.parent])
    slide = events.image_submitted("s1", uri=str(pyramid), fmt="TIFF")
    tile = tile_submissions(
        slide,
        levels=[(1_300, 1_100, 1.0), (650, 550, 2.0)],
        tiling=Tiling(size=256, overlap=32, level=1),
    )[4]
    task = {"image_id": tile["image_id"], "uri": str(pyramid), "inline": None,
            "submitted": EventCodec().encode("ImageSubmitted", tile)}  # fmt: skip
    t = tile["tile"]
    np.testing.assert_array_equal(
        task_pixels(settings, task),
        RGB[::2, ::2][t["y"] : t["y"] + t["height"], t["x"] : t["x"] + t["width"]],
    )
    with pytest.raises(DecompressionBombError, match=r"^tile s1#tile-4: 256x256 px exceed"):
        read_tile(
            str(pyramid),
            t,
            settings=settings.model_copy(update={"max_image_pixels": 1_000}),
            what=tile["image_id"],
        )


def test_jpeg_slides_read_and_a_forged_jpeg_frame_is_a_bomb(tmp_path: Path) -> None:
    path = tmp_path / "jpeg.tif"
    tifffile.imwrite(path, RGB[:512, :512], tile=(256, 256), compression="jpeg")
    with Slide(path) as slide:
        got = slide.read(0, 100, 100, 200, 200)
    np.testing.assert_array_equal(got, tifffile.imread(path)[100:300, 100:300])  # lossy, alike
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0", offset, offset + count)
    data[frame + 5 : frame + 9] = b"\xff\xff\xff\xff"  # 65535 x 65535 px
    path.write_bytes(bytes(data))
    with Slide(path) as slide, pytest.raises(DecompressionBombError, match=r"segment 3 .* forged"):
        slide.read(0, 300, 300, 10, 10)
