"""Tile events of a large slide: the grid, one ``ImageSubmitted`` per tile, their Kafka key.

A slide is submitted as tiles (``docs/lab.md``, "Large images"). Each tile is an
``ImageSubmitted`` whose ``uri`` is the slide's and whose ``tile`` record says where the
tile lies: its level, offset and size, the slide's size and how many tiles the slide has.
Workers read the tile's pixels lazily from the slide
(:class:`~phenocascade.store.slides.Slide`); nothing but the header is read here.

Every event of a tile (its submission, each tier's result, an annotation request) is keyed
by the slide's id, not the tile's: all tiles of a slide share one partition of every
topic, so one joiner folds them into the slide's one output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from phenocascade.errors import PhenocascadeError, ValidationError
from phenocascade.streams.serde import EventCodec

TILE_SEPARATOR = "#tile-"


@dataclass(frozen=True, slots=True)
class Tiling:
    """How slides are cut into tiles.

    Attributes
    ----------
    size : int, default 1024
        Side of a tile, in pixels of the level read (tiles at the slide's edges are as
        large, moved inwards, unless the level itself is smaller).
    overlap : int, default 128
        Least overlap of neighbouring tiles, in pixels of the level: an object up to this
        size that a tile border cuts lies whole in a neighbour, and the joiner merges the
        two detections.
    level : int, default 0
        Pyramid level scored: 0 is full resolution; each level up is usually half the
        size. A level the slide lacks is refused.

    Raises
    ------
    ValidationError
        If the size is below 64, the overlap negative or not below half the size, or the
        level negative, naming the ``submit`` option to change.
    """

    size: int = 1024
    overlap: int = 128
    level: int = 0

    def __post_init__(self) -> None:
        if self.size < 64:
            raise ValidationError(
                f"tile size {self.size} is below 64 px; use --tile-size 64 or more"
            )
        if not 0 <= self.overlap < self.size // 2:
            raise ValidationError(
                f"tile overlap {self.overlap} must be at least 0 and below half the tile size "
                f"({self.size // 2}); change --tile-overlap"
            )
        if self.level < 0:
            raise ValidationError(f"pyramid level {self.level} is negative; use --level 0 or more")


def _starts(length: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Return ``(start, extent)`` of tiles covering ``length`` px, spread evenly."""
    if length <= size:
        return [(0, length)]
    count = math.ceil((length - overlap) / (size - overlap))
    return [(round(i * (length - size) / (count - 1)), size) for i in range(count)]


def grid(width: int, height: int, tiling: Tiling) -> list[tuple[int, int, int, int]]:
    """Return the tiles ``(x, y, width, height)`` covering a ``width`` x ``height`` level.

    Row by row, top to bottom. Neighbours overlap by at least ``tiling.overlap`` px; the
    last tile of a row or column ends at the level's edge.
    """
    return [
        (x, y, w, h)
        for y, h in _starts(height, tiling.size, tiling.overlap)
        for x, w in _starts(width, tiling.size, tiling.overlap)
    ]


def tile_id(parent_id: str, index: int) -> str:
    """Return the image id of tile ``index`` of slide ``parent_id``."""
    return f"{parent_id}{TILE_SEPARATOR}{index}"


def tile_submissions(
    slide: Mapping[str, Any],
    *,
    levels: Sequence[tuple[int, int, float]],
    tiling: Tiling,
    max_pixels: int | None = None,
) -> list[dict[str, Any]]:
    """Return the ``ImageSubmitted`` of every tile of a slide.

    Parameters
    ----------
    slide : Mapping
        The slide's own ``ImageSubmitted`` (by ``uri``); each tile copies it.
    levels : sequence of (int, int, float)
        ``(width, height, downsample)`` of each pyramid level, level 0 first.
    tiling : Tiling
        Tile size, overlap and the level to read.
    max_pixels : int or None, default None
        Most pixels of one tile (``PHENOCASCADE_MAX_IMAGE_PIXELS``, the decode limit of one
        image); ``None``: no limit.

    Raises
    ------
    ValidationError
        If the slide has no level ``tiling.level``, is submitted inline, or a tile would
        exceed ``max_pixels``.
    """
    if slide["uri"] is None:
        raise ValidationError(
            f"{slide['image_id']}: a slide is tiled from its file; submit it by path, not inline"
        )
    if not 0 <= tiling.level < len(levels):
        raise ValidationError(
            f"{slide['uri']}: pyramid level {tiling.level} does not exist; the slide has "
            f"{len(levels)} level(s): choose --level 0 to {len(levels) - 1}"
        )
    width, height, downsample = levels[tiling.level]
    cells = grid(width, height, tiling)
    if max_pixels is not None and max(w * h for _, _, w, h in cells) > max_pixels:
        raise ValidationError(
            f"tiles of {tiling.size} px a side exceed PHENOCASCADE_MAX_IMAGE_PIXELS="
            f"{max_pixels}; choose a smaller --tile-size"
        )
    return [
        {
            **slide,
            "image_id": tile_id(slide["image_id"], index),
            "tile": {
                "parent_id": slide["image_id"],
                "index": index,
                "count": len(cells),
                "level": tiling.level,
                "x": x,
                "y": y,
                "width": w,
                "height": h,
                "downsample": float(downsample),
                "slide_width": levels[0][0],
                "slide_height": levels[0][1],
            },
        }
        for index, (x, y, w, h) in enumerate(cells)
    ]


def stored_id(image_id: str) -> str:
    """Return the id an image is kept under: its slide's for a tile, else its own."""
    return image_id.split(TILE_SEPARATOR, 1)[0]


def routing_key(record: Mapping[str, Any]) -> bytes:
    """Return the Kafka key of an event about ``record``'s image: its slide's id for a tile.

    ``record`` is an ``ImageSubmitted`` or a ``TierResult`` (records of writers older than
    the ``tile`` field have none).
    """
    tile = record.get("tile")
    return str(tile["parent_id"] if tile else record["image_id"]).encode()


def submission_tile(codec: EventCodec, submitted: bytes | None) -> dict[str, Any] | None:
    """Return the ``tile`` record of an encoded ``ImageSubmitted``.

    ``None`` for a whole image, and for bytes that are no readable ``ImageSubmitted`` (a
    dead letter's payload may be cut at 64 KiB; an annotation task may lack its
    submission).
    """
    try:
        _, record = codec.decode(submitted, expected="ImageSubmitted")
    except PhenocascadeError:
        return None
    tile: dict[str, Any] | None = record.get("tile")
    return tile


def box_in_slide(box: Mapping[str, Any], tile: Mapping[str, Any]) -> dict[str, Any]:
    """Return a tile's box in level-0 pixels of its slide, clipped to the slide.

    ``box`` is an Avro ``Box`` in pixels of the tile (``[x_min, y_min, x_max, y_max]``, max
    exclusive); ``tile`` the tile's ``tile`` record.
    """
    scale = tile["downsample"]

    def at(v: float, offset: int, limit: int) -> float:
        return float(min(max((offset + v) * scale, 0.0), limit))

    return {
        **box,
        "x_min": at(box["x_min"], tile["x"], tile["slide_width"]),
        "y_min": at(box["y_min"], tile["y"], tile["slide_height"]),
        "x_max": at(box["x_max"], tile["x"], tile["slide_width"]),
        "y_max": at(box["y_max"], tile["y"], tile["slide_height"]),
    }
