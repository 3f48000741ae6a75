"""Tiles of a slide: the grid, the tile events and their key, boxes in slide pixels."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given
from hypothesis import strategies as st

from phenocascade.cli.cascade import submit_paths
from phenocascade.config import KafkaSettings, Settings, load_topology
from phenocascade.domain import ImageMeta
from phenocascade.errors import UnsupportedImageError, ValidationError
from phenocascade.streams import events
from phenocascade.streams.tiling import Tiling, box_in_slide, grid, routing_key, tile_submissions

LEVELS = [(20_000, 12_000, 1.0), (10_000, 6_000, 2.0), (5_000, 3_000, 4.0)]


@given(
    width=st.integers(1, 9_000),
    height=st.integers(1, 9_000),
    size=st.integers(64, 2_048),
    overlap_share=st.floats(0.0, 0.49),
)
def test_the_grid_covers_the_level_with_at_least_the_overlap(
    width: int, height: int, size: int, overlap_share: float
) -> None:
    tiling = Tiling(size=size, overlap=int(size * overlap_share))
    cells = grid(width, height, tiling)
    xs = sorted({(x, w) for x, _, w, _ in cells})
    ys = sorted({(y, h) for _, y, _, h in cells})
    assert len(cells) == len(xs) * len(ys)
    for starts, length in ((xs, width), (ys, height)):
        assert starts[0][0] == 0 and starts[-1][0] + starts[-1][1] == length
        assert all(extent == min(size, length) for _, extent in starts)
        for (a, extent), (b, _) in itertools.pairwise(starts):
            assert a + extent - b >= tiling.overlap  # neighbours overlap at least that much


def test_each_tile_event_says_where_it_lies_and_is_keyed_by_its_slide() -> None:
    slide = events.image_submitted("s1", uri="/scans/s1.ome.tif", fmt="TIFF")
    tiles = tile_submissions(slide, levels=LEVELS, tiling=Tiling(size=1024, overlap=128, level=2))
    assert len(tiles) == len(grid(5_000, 3_000, Tiling(size=1024, overlap=128))) == 6 * 4
    assert len({t["image_id"] for t in tiles}) == len(tiles)
    last = tiles[-1]
    assert last["uri"] == slide["uri"] and last["metadata"] == slide["metadata"]
    assert last["tile"] == {
        "parent_id": "s1",
        "index": 23,
        "count": 24,
        "level": 2,
        "x": 5_000 - 1024,
        "y": 3_000 - 1024,
        "width": 1024,
        "height": 1024,
        "downsample": 4.0,
        "slide_width": 20_000,
        "slide_height": 12_000,
    }
    assert {routing_key(t) for t in tiles} == {b"s1"}
    assert routing_key(slide) == b"s1"  # a whole image is keyed by its own id


@pytest.mark.parametrize(
    ("tiling", "match"),
    [
        (dict(size=32), "below 64"),
        (dict(size=512, overlap=256), "below half the tile size"),
        (dict(level=-1), "negative"),
    ],
)
def test_a_bad_tiling_says_which_option_to_change(tiling: dict[str, int], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        Tiling(**tiling)


def test_a_missing_level_or_an_inline_slide_is_refused() -> None:
    slide = events.image_submitted("s1", uri="/scans/s1.tif")
    with pytest.raises(ValidationError, match=r"level 3 does not exist.*--level 0 to 2"):
        tile_submissions(slide, levels=LEVELS, tiling=Tiling(level=3))
    inline = events.image_submitted("s2", inline=b"II*\x00")
    with pytest.raises(ValidationError, match="submit it by path"):
        tile_submissions(inline, levels=LEVELS, tiling=Tiling())


def test_a_box_maps_to_level_0_pixels_of_the_slide_clipped() -> None:
    tile = tile_submissions(
        events.image_submitted("s1", uri="/s.tif"), levels=LEVELS, tiling=Tiling(level=1)
    )[-1]["tile"]
    box = {"x_min": 10.0, "y_min": 20.0, "x_max": 1030.0, "y_max": 40.0, "label": "n", "score": 0.9}
    mapped = box_in_slide(box, tile)
    assert mapped == {
        **box,
        "x_min": (tile["x"] + 10) * 2.0,
        "y_min": (tile["y"] + 20) * 2.0,
        "x_max": 20_000.0,  # past the slide's edge: clipped
        "y_max": (tile["y"] + 40) * 2.0,
    }


def test_submit_refuses_a_slide_it_cannot_tile_before_publishing_anything(tmp_path: Path) -> None:
    # No broker at this address: a refusal must come before any producer is made.
    settings = Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"))
    good = tmp_path / "good.ome.tif"
    with tifffile.TiffWriter(good, ome=True) as tif:
        tif.write(np.zeros((256, 256), np.uint8), tile=(128, 128), subifds=1)
        tif.write(np.zeros((128, 128), np.uint8), tile=(128, 128), subfiletype=1)
    floats = tmp_path / "floats.tif"
    tifffile.imwrite(floats, np.zeros((300, 300), np.float32), tile=(128, 128))
    small = settings.model_copy(update={"max_image_pixels": 256 * 256 - 1})
    meta = ImageMeta(study="s")
    with pytest.raises(UnsupportedImageError, match=r"floats.tif: dtype float32.*8- or 16-bit"):
        submit_paths(small, load_topology(), [good, floats], meta=meta, progress=False)
    with pytest.raises(ValidationError, match=r"good.ome.tif is a slide.*without --inline"):
        submit_paths(settings, load_topology(), [good], meta=meta, inline=True, progress=False)
    with pytest.raises(ValidationError, match="choose a smaller --tile-size"):
        submit_paths(small, load_topology(), [good], meta=meta, progress=False)
    with pytest.raises(ValidationError, match="level 2 does not exist"):
        submit_paths(
            settings, load_topology(), [good], meta=meta, progress=False, tiling=Tiling(level=2)
        )
