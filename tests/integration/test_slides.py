"""A 20k x 20k pyramidal OME-TIFF through the real cascade: scored as tiles, one output.

The slide is generated here tile by tile (the test never holds a level in memory) and
submitted with ``submit_paths``, which publishes its tiles. The tier workers (the bundled
models) and the joiner are real ``phenocascade`` processes on the real Kafka and
Cassandra. Level 1 (10000 x 10000, read from the slide's first SubIFD) is scored in
``submit``'s default tiles, 1024 px with 128 px of overlap: 144 tiles, about a minute.
Level 0 in the same tiles is 529 tiles, four minutes on 2 busy cores (2026-12-01), with
the same worker peaks: a worker's memory depends on the tile size and its tier's batch
size, not on the level or the slide (2048 px tiles took the batched tiers to 2.4 GiB).
Each worker's peak resident memory is read from the kernel (``VmHWM``) before it stops.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import cv2
import numpy as np
import pytest
import tifffile
import yaml
import zarr
from harness import TEST_KEYSPACE, Cascade, read_events, settings_env
from PIL import Image

from phenocascade.cli.cascade import (
    build_report,
    render_output,
    start_process,
    stop_cascade,
    submit_paths,
)
from phenocascade.config import Settings, Topology, load_topology
from phenocascade.consumers.worker import TierWorker
from phenocascade.domain import (
    Box,
    DecodedImage,
    ImageMeta,
    LabelThresholds,
    StageKind,
    StageOutput,
)
from phenocascade.models.base import Stage
from phenocascade.recipes import ensure_bootstrap
from phenocascade.store.cassandra import connect, get_outputs
from phenocascade.streams.kafka import create_topics
from phenocascade.streams.tiling import Tiling, grid

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIDE = 20_000
TIFF_TILE = 512
LEVELS = 4  # 20000, 10000, 5000, 2500
CELL = 250  # one nucleus-like disk per CELL x CELL px of level 0
TILING = Tiling(level=1)  # submit's default tiles: 1024 px, 128 px of overlap
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
    count = len(grid(SIDE // 2, SIDE // 2, TILING))
    assert count == 12 * 12
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
    # `phenocascade report`: one image submitted, in exactly one terminal state.
    report = build_report(cascade.settings, cascade.topology, prefix=cascade.prefix + "slide-")
    assert report["submitted"] == 1 and report["balanced"], report

    # Bounded memory: every worker read all of level 1 (100 MB of pixels), a tile at a time.
    assert max(peaks.values()) < WORKER_RSS_LIMIT, peaks

    # The overlay: the slide downsampled, not decoded whole.
    png = render_output(cascade.settings, output, cascade.roots.parent / "slide.png")
    with Image.open(png) as overlay:
        assert max(overlay.size) <= 2500 and overlay.size[0] == overlay.size[1]
    print(
        f"\nslide written in {written:.0f} s, {count} tiles scored and joined in {scored:.0f} s "
        f"({output['status']}, {len(output['boxes'])} boxes, routes {output['routes']}); "
        "worker peak RSS (MiB): " + ", ".join(f"{n} {p / 2**20:.0f}" for n, p in peaks.items())
    )


# -- cross-tile duplicates, end to end, with stages whose answers are known ---------------
CONFIDENT = LabelThresholds(positive=0.9, negative=0.3)


class Blobs:
    """Stand-in stages that see bright blobs (8-connected pixels above 128).

    The gate passes every tile, the classifier scores ``bright`` 0.95 when a tile has a
    blob (else 0.05), and the detector boxes each blob, in pixels of the tile: a blob that
    a tile border cuts is boxed cut.
    """

    model_name = "blobs"
    gate_label = "clear"
    version = "v1"

    def __init__(self, kind: StageKind, label: str) -> None:
        self.kind, self.classes = kind, (label,)
        self.thresholds = {label: CONFIDENT}

    def predict(self, images: Sequence[DecodedImage]) -> list[StageOutput]:
        return [self._one(blob_boxes(img.pixels[:, :, 0], self.classes[0])) for img in images]

    def _one(self, boxes: list[Box]) -> StageOutput:
        label = self.classes[0]
        if self.kind is StageKind.GATE:
            return StageOutput(scores={label: 0.99})
        if self.kind is StageKind.CLASSIFIER:
            return StageOutput(scores={label: 0.95 if boxes else 0.05})
        return StageOutput(scores={label: 0.95 if boxes else 1e-6}, boxes=tuple(boxes))


def blob_boxes(grey: np.ndarray, label: str, scale: float = 1.0) -> list[Box]:
    """Boxes of the blobs of ``grey``, scaled by ``scale``, score 0.95."""
    _, _, stats, _ = cv2.connectedComponentsWithStats((grey > 128).astype(np.uint8), connectivity=8)
    return [
        Box(x * scale, y * scale, (x + w) * scale, (y + h) * scale, label, 0.95)
        for x, y, w, h, _ in stats[1:].tolist()
    ]


_STAND_INS = {
    "quality": (StageKind.GATE, "clear"),
    "majority": (StageKind.CLASSIFIER, "bright"),
    "minority": (StageKind.DETECTOR, "giant"),
}


@pytest.fixture
def blob_cascade(infra: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Topology]]:
    """The three tiers on :class:`Blobs` in threads here, and a real joiner process."""
    data = load_topology().namespaced(f"sl{uuid.uuid4().hex[:8]}-").model_dump()
    for tier in data["tiers"]:
        tier.update(replicas=1, threads=None)
    topology = Topology.model_validate(data)
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topology.model_dump()))
    (tmp_path / "scans").mkdir()
    settings = infra.model_copy(
        update={
            "topology": tmp_path / "topology.yaml",
            "home": tmp_path / "home",
            "allowed_roots": [tmp_path / "scans"],
            "cassandra": infra.cassandra.model_copy(update={"keyspace": TEST_KEYSPACE}),
        }
    )
    create_topics(settings.kafka, topology)
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=TierWorker(
                settings=settings,
                topology=topology,
                tier=tier,
                instance="0",
                stage_loader=lambda _, kind_label=_STAND_INS[tier.name]: cast(
                    Stage, Blobs(*kind_label)
                ),
            ).run,
            args=(stop,),
            daemon=True,
        )
        for tier in topology.tiers
    ]
    for thread in threads:
        thread.start()
    joiner = start_process(
        "joiner", ["joiner", "--metrics-port", "0"], tmp_path / "logs", settings_env(settings)
    )
    try:
        yield settings, topology
    finally:
        stop.set()
        stop_cascade({"joiner": joiner})
        for thread in threads:
            thread.join(30)


def write_levels(path: Path, levels: Sequence[np.ndarray]) -> Path:
    """Write grey ``levels`` (largest first) as an OME-TIFF (SubIFDs) or, for a ``.zarr``
    path, an OME-Zarr folder (OME-NGFF 0.5), both in 256 px tiles or chunks."""
    if path.suffix != ".zarr":
        with tifffile.TiffWriter(path, ome=True) as tif:
            tif.write(levels[0], tile=(256, 256), compression="zlib", subifds=len(levels) - 1)
            for level in levels[1:]:
                tif.write(level, tile=(256, 256), compression="zlib", subfiletype=1)
        return path
    group = zarr.open_group(path, mode="w")
    for i, level in enumerate(levels):
        array = group.create_array(str(i), shape=level.shape, chunks=(256, 256), dtype=level.dtype)
        array[:] = level
    axes = [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}]
    scales = [{"type": "scale", "scale": [2.0**i] * 2} for i in range(len(levels))]
    datasets = [{"path": str(i), "coordinateTransformations": [t]} for i, t in enumerate(scales)]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    return path


@pytest.mark.parametrize("name", ["blobs.ome.tif", "blobs.ome.zarr"])
def test_an_object_on_a_tile_border_is_one_box_in_slide_pixels(
    blob_cascade: tuple[Settings, Topology], name: str
) -> None:
    settings, topology = blob_cascade
    # 3000 x 2000 at level 0; level 1 (1500 x 1000) is scored in tiles of 512 with 96 px of
    # overlap: columns start at 0, 329, 659, 988 and rows at 0, 244, 488.
    slide = np.full((2_000, 3_000), 20, np.uint8)
    yy, xx = np.mgrid[0:2_000, 0:3_000]
    centres = [
        (300, 300),  # inside the first tile only
        (1_000, 300),  # across the border of columns 0 and 1 (cut at x = 1024)
        (840, 600),  # inside the overlap of columns 0 and 1: seen whole by both
        (1_360, 1_000),  # where four tiles overlap
        (2_900, 1_900),  # in the bottom-right corner
    ]
    for cx, cy in centres:
        slide[(xx - cx) ** 2 + (yy - cy) ** 2 <= 40**2] = 230
    path = write_levels(settings.allowed_roots[0] / name, [slide, slide[::2, ::2]])
    expected = sorted(b.as_list() for b in blob_boxes(slide[::2, ::2], "giant", scale=2.0))
    assert len(expected) == len(centres)

    tiling = Tiling(size=512, overlap=96, level=1)
    assert len(grid(1_500, 1_000, tiling)) == 12
    [slide_id] = submit_paths(
        settings,
        topology,
        [path],
        meta=ImageMeta(study=f"blobs-{uuid.uuid4().hex[:8]}"),
        progress=False,
        tiling=tiling,
    )

    deadline = time.monotonic() + 120
    while not (outputs := read_events(settings, topology.joiner.results_topic, "ImageOutput")):
        assert time.monotonic() < deadline, "no slide output in 120 s"
        time.sleep(1.0)
    time.sleep(3.0)  # a second output (there must be none) would come by now
    outputs = read_events(settings, topology.joiner.results_topic, "ImageOutput")
    assert [o["image_id"] for o in outputs] == [slide_id]
    [output] = outputs
    assert output["status"] == "analyzed" and output["labels"] == {"bright": 0.95}
    assert output["routes"] == {"quality": "PASS", "majority": "PASS", "minority": "PASS"}
    got = sorted([b["x_min"], b["y_min"], b["x_max"], b["y_max"]] for b in output["boxes"])
    assert got == expected  # one box per object, in level-0 pixels of the slide


def test_a_slide_with_a_corrupt_segment_ends_as_one_dead_letter_and_no_output(
    blob_cascade: tuple[Settings, Topology],
) -> None:
    settings, topology = blob_cascade
    grey = np.full((1_000, 1_000), 20, np.uint8)
    path = write_levels(settings.allowed_roots[0] / "corrupt.ome.tif", [grey, grey[::2, ::2]])
    with tifffile.TiffFile(path) as tif:
        offset = tif.series[0].levels[0].keyframe.dataoffsets[10]  # x and y 512 to 768
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 16)  # no longer a zlib stream
    prefix = f"bad-{uuid.uuid4().hex[:8]}-"
    # Tiles of 512 with 64 of overlap start at 0, 244 and 488: the tiles of the second and
    # third rows and columns touch the broken segment, four of the nine.
    tiling = Tiling(size=512, overlap=64)
    [slide_id] = submit_paths(
        settings, topology, [path], meta=ImageMeta(study="bad"), prefix=prefix,
        progress=False, tiling=tiling,
    )  # fmt: skip

    deadline = time.monotonic() + 120
    while len(dead := read_events(settings, topology.dead_letter_topic, "DeadLetter")) < 4:
        assert time.monotonic() < deadline, dead
        time.sleep(1.0)
    assert {d["image_id"] for d in dead} == {slide_id}
    assert {d["error_kind"] for d in dead} == {"corrupt_image"}
    assert sorted(d["message"].split(":")[0] for d in dead) == [
        f"tile {slide_id}#tile-{i}" for i in (4, 5, 7, 8)
    ]
    assert all("segment 10 of level 0 does not decode" in d["message"] for d in dead)
    time.sleep(3.0)
    outputs = read_events(settings, topology.joiner.results_topic, "ImageOutput")
    assert [o for o in outputs if o["image_id"].startswith(slide_id)] == []
    report = build_report(settings, topology, prefix=prefix)
    assert report["submitted"] == 1 and report["dead_lettered"] == 1, report
    assert report["balanced"], report
