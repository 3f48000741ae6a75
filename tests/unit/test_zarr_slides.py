"""OME-Zarr slides read lazily: any region of any multiscale level, from the chunks it touches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr_images import write_ome_zarr

from phenocascade.cli.cascade import iter_images
from phenocascade.errors import CorruptImageError, UnsupportedImageError
from phenocascade.store.slides import ZarrSlide, is_slide, open_slide, pyramid

RGB = np.random.default_rng(7).integers(0, 255, (3, 700, 900), dtype=np.uint8)  # (c, y, x)


@pytest.mark.parametrize("version", ["0.5", "0.4"])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_a_region_reads_exactly_the_pixels_of_its_level(
    tmp_path: Path, version: str, level: int
) -> None:
    path = write_ome_zarr(tmp_path / "rgb.ome.zarr", RGB, "cyx", version=version)
    expected = RGB[:, :: 2**level, :: 2**level].transpose(1, 2, 0)
    height, width = expected.shape[:2]
    with open_slide(path, roots=[tmp_path], max_bytes=1) as slide:  # a folder has no size cap
        assert isinstance(slide, ZarrSlide)
        assert (slide.level(level).width, slide.level(level).height) == (width, height)
        assert slide.level(level).downsample == pytest.approx(900 / width)
        for x, y, w, h in [(0, 0, 64, 64), (50, 37, 150, 120), (width - 77, height - 33, 77, 33)]:
            got = slide.read(level, x, y, w, h)
            assert got.shape == (h, w, 3) and got.dtype == np.uint8
            np.testing.assert_array_equal(got, expected[y : y + h, x : x + w])


def test_a_grey_slide_with_singleton_axes_reads_as_one_channel(tmp_path: Path) -> None:
    grey = RGB[:1, None].astype(np.uint16) * 200  # (t=1, c=1, y, x)
    path = write_ome_zarr(tmp_path / "grey.ome.zarr", grey, "tcyx", version="0.5")
    assert pyramid(path) == [(900, 700, 1.0), (450, 350, 2.0), (225, 175, 4.0)]
    with ZarrSlide(path) as slide:
        got = slide.read(1, 10, 20, 30, 40)
        thumb, scale = slide.thumbnail(300)
    assert got.shape == (40, 30, 1) and got.dtype == np.uint16
    np.testing.assert_array_equal(got[:, :, 0], grey[0, 0, ::2, ::2][20:60, 10:40])
    assert scale == 2.0 * 2 and thumb.shape == (175, 225, 1)  # level 1 by every 2nd pixel


def test_a_corrupt_chunk_fails_only_the_regions_that_touch_it(tmp_path: Path) -> None:
    path = write_ome_zarr(tmp_path / "rgb.ome.zarr", RGB, "cyx", version="0.5")
    chunk = path / "0" / "c" / "0" / "5" / "6"  # channel 0, rows 640-700, columns 768-900
    assert chunk.is_file()
    chunk.write_bytes(b"\xff" * 40)
    with ZarrSlide(path) as slide:
        np.testing.assert_array_equal(
            slide.read(0, 0, 0, 512, 512), RGB[:, :512, :512].transpose(1, 2, 0)
        )
        with pytest.raises(CorruptImageError, match=r"does not decode .*a chunk is corrupt"):
            slide.read(0, 700, 600, 100, 100)


def test_slides_that_cannot_be_tiled_say_what_to_do(tmp_path: Path) -> None:
    two = write_ome_zarr(tmp_path / "two.ome.zarr", RGB[:2], "cyx", version="0.5")
    with pytest.raises(UnsupportedImageError, match=r"axes cyx .*save each channel"):
        ZarrSlide(two)
    floats = write_ome_zarr(
        tmp_path / "f.ome.zarr", RGB[:1].astype(np.float32), "cyx", version="0.5"
    )
    with pytest.raises(UnsupportedImageError, match=r"dtype float32 .*8- or 16-bit"):
        ZarrSlide(floats)
    plain = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(CorruptImageError, match="not a readable OME-Zarr image"):
        ZarrSlide(tmp_path / "plain.zarr")
    assert plain.attrs.asdict() == {}


def test_submit_takes_a_zarr_folder_as_one_slide(tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    path = write_ome_zarr(scans / "run1" / "s.ome.zarr", RGB, "cyx", version="0.5")
    (scans / "plate.png").write_bytes(b"png")
    assert is_slide(path, max_pixels=10**9) and not is_slide(scans / "plate.png", max_pixels=1)
    assert iter_images([scans]) == [scans / "plate.png", path]
    assert iter_images([path]) == [path]
