"""A 20k x 20k pyramidal OME-TIFF through the real cascade: scored as tiles, one output.

The slide is generated here tile by tile (the test never holds a level in memory) and
submitted with ``submit_paths``, which publishes its tiles. The tier workers (the bundled
models) and the joiner are real ``phenocascade`` processes on the real Kafka and
Cassandra. Level 0, the full 20000 x 20000, is scored in ``submit``'s default tiles (1024
px, 128 px of overlap): 529 tiles. Each worker's peak resident memory is read from the
kernel (``VmHWM``) before it stops: it depends on the tile size and the tier's batch size,
not on the slide's (2048 px tiles took the batched tiers to 2.4 GiB).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from harness import Cascade
from PIL import Image

from phenocascade.cli.cascade import render_output
from phenocascade.config import Settings
from phenocascade.recipes import ensure_bootstrap
from phenocascade.store.cassandra import connect, get_outputs
from phenocascade.streams.tiling import Tiling, grid

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIDE = 20_000
TIFF_TILE = 512
LEVELS = 4  # 20000, 10000, 5000, 2500
CELL = 250  # one nucleus-like disk per CELL x CELL px of level 0
TILING = Tiling()  # submit's default: level 0, 1024 px, 128 px of overlap
WORKER_RSS_LIMIT = 2 * 1024**3


def _disks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres (x, y) and radii of the disks, in level-0 pixels: one per cell, jittered."""
    rng = np.random.default_rng(14)
    n = SIDE // CELL
    gy, gx = np.mgrid[0:n, 0:n]
    cx = gx * CELL + rng.integers(60, CELL - 60, (n, n))
    cy = gy * CELL + rng.integers(60, CELL - 60, (n, n))
    radius = rng.integers(25, 55, (n, n))
    return cx, cy, radius


def _tiles(
    downsample: int, disks: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> Iterator[np.ndarray]:
    """Yield the TIFF tiles of one level, row by row: bright disks on a dim background."""
    cx, cy, radius = disks
    side = SIDE // downsample
    for top in range(0, side, TIFF_TILE):
        for left in range(0, side, TIFF_TILE):
            tile = np.full((TIFF_TILE, TIFF_TILE), 18, np.uint8)
            x0, y0 = left * downsample, top * downsample  # the tile in level-0 pixels
            span = TIFF_TILE * downsample
            near = (
                (cx + radius > x0) & (cx - radius < x0 + span)
                & (cy + radius > y0) & (cy - radius < y0 + span)
            )  # fmt: skip
            for x, y, r in zip(cx[near], cy[near], radius[near], strict=True):
                lo_x, hi_x = (
                    max(0, (x - r - x0) // downsample),
                    min(TIFF_TILE, (x + r - x0) // downsample + 1),
                )
                lo_y, hi_y = (
                    max(0, (y - r - y0) // downsample),
                    min(TIFF_TILE, (y + r - y0) // downsample + 1),
                )
                yy, xx = np.mgrid[lo_y:hi_y, lo_x:hi_x]
                d2 = ((xx * downsample + x0 - x) ** 2 + (yy * downsample + y0 - y) ** 2) / r**2
                patch = tile[lo_y:hi_y, lo_x:hi_x]
                np.maximum(patch, np.clip(220 * (1.2 - d2), 0, 200).astype(np.uint8), out=patch)
            yield tile


def write_pyramid(path: Path) -> None:
    """Write the slide as a tiled, zlib-compressed OME-TIFF with its levels in SubIFDs."""
    disks = _disks()
    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        for level in range(LEVELS):
            side = SIDE // 2**level
            tif.write(
                _tiles(2**level, disks),
                shape=(side, side),
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                compression="zlib",
                compressionargs={"level": 1},
                **({"subifds": LEVELS - 1} if level == 0 else {"subfiletype": 1}),
            )


def _peak_rss(pid: int) -> int:
    """The peak resident set size of a live process, in bytes (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


@pytest.fixture
def cascade(infra: Settings, tmp_path: Path) -> Iterator[Cascade]:
    ensure_bootstrap(infra)
    c = Cascade(infra, tmp_path / "slides")
    c.start()
    yield c
    c.stop()


def test_a_20k_slide_is_scored_as_tiles_and_joined_into_one_output(cascade: Cascade) -> None:
    started = time.monotonic()
    path = cascade.roots / "slide-20k.ome.tif"
    write_pyramid(path)
    with tifffile.TiffFile(path) as tif:
        assert [lv.shape for lv in tif.series[0].levels] == [
            (SIDE >> k, SIDE >> k) for k in range(LEVELS)
        ]
    written = time.monotonic() - started

    [slide_id] = cascade.submit([path], prefix="slide-", tiling=TILING)
    count = len(grid(SIDE, SIDE, TILING))
    assert count == 23 * 23
    counts = cascade.wait_until_done([slide_id], timeout_s=600)
    scored = time.monotonic() - started - written
    # Peak memory of every worker, read while they still run.
    peaks = {name: _peak_rss(proc.pid) for name, proc in cascade.procs.items() if name != "joiner"}
    assert counts == {slide_id: 1}, cascade.log_tail()

    # Every tile was scored by the gate, and no tile has an output of its own.
    gate = cascade.read(cascade.topology.tiers[0].result_topic, "TierResult")
    tiles = [r for r in gate if r["tile"] and r["tile"]["parent_id"] == slide_id]
    assert sorted(r["tile"]["index"] for r in tiles) == list(range(count))
    assert {r["tile"]["count"] for r in tiles} == {count}
    outputs = [o for o in cascade.outputs() if o["image_id"].startswith(slide_id)]
    assert [o["image_id"] for o in outputs] == [slide_id]
    [output] = outputs
    assert output["uri"] == str(path)
    assert output["status"] in {"analyzed", "unusable", "awaiting_annotation"}
    assert "quality" in output["routes"]
    for box in output["boxes"]:  # in level-0 pixels of the slide
        assert 0 <= box["x_min"] < box["x_max"] <= SIDE and 0 <= box["y_min"] < box["y_max"] <= SIDE
    rows = get_outputs(session=connect(cascade.settings.cassandra), image_id=slide_id)
    assert [r["status"] for r in rows] == [output["status"]]

    # Bounded memory: every worker read all of level 0 (400 MB of pixels), a tile at a time.
    assert max(peaks.values()) < WORKER_RSS_LIMIT, peaks

    # The overlay: the slide downsampled, not decoded whole.
    png = render_output(cascade.settings, output, cascade.roots.parent / "slide.png")
    with Image.open(png) as overlay:
        assert max(overlay.size) <= 2500 and overlay.size[0] == overlay.size[1]
    print(
        f"\nslide written in {written:.0f} s, {count} tiles scored and joined in {scored:.0f} s; "
        "worker peak RSS (MiB): " + ", ".join(f"{n} {p / 2**20:.0f}" for n, p in peaks.items())
    )
