"""The pure slide rule: tile outputs of one slide -> its one output.

Each tile of a slide is joined as an image of its own
(:func:`~phenocascade.consumers.joining.merge`); the joiner publishes none of those tile
outputs, but stores each in the slide's state (:func:`tile_part`), and once every tile of
the slide has one, :func:`slide_emission` gives the slide's output. Kept free of faust and
Cassandra, as :mod:`~phenocascade.consumers.joining` is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from phenocascade.domain import OutputStatus
from phenocascade.store.cassandra import versions_key
from phenocascade.streams import events
from phenocascade.streams.tiling import box_in_slide

# Two detections from different tiles are one object when they overlap this much, as
# intersection over union or over the smaller box (a tile border cuts one of them).
MERGE_IOU = 0.5
MERGE_IOS = 0.7
# A tier's route on the slide: the most demanding of its tiles' routes.
_ROUTE_ORDER = ("SKIP", "PASS", "ANNOTATE")
# Emission keys of a slide's outputs start with this, then its versions key.
_SLIDE_KEY = "tiles:"


def tile_of(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the ``tile`` record of an image's join state, ``None`` if it is no tile."""
    for tier in state.get("tiers", {}).values():
        if tier.get("tile"):
            return dict(tier["tile"])
    return None


def tile_part(
    tile: Mapping[str, Any], key: str, output: Mapping[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Return the ``(name, value)`` of a tile's output in its slide's join state.

    Parameters
    ----------
    tile : Mapping
        The tile's ``tile`` record (parent id, offset, level, count...).
    key : str
        The emission key of the tile's output (a newer output of the tile, e.g. after an
        expert answered it, has another).
    output : Mapping
        The tile's ``ImageOutput``, boxes in pixels of the tile.

    Returns
    -------
    tuple of (str, dict)
        The tile's id, and its output without its time, boxes in level-0 pixels of the
        slide: the same value for a re-delivered result.
    """
    return output["image_id"], {
        "key": key,
        "index": tile["index"],
        "status": output["status"],
        "labels": dict(output["labels"]),
        "boxes": [box_in_slide(b, tile) for b in output["boxes"]],
        "routes": dict(output["routes"]),
        "model_versions": dict(output["model_versions"]),
        "pending": list(output.get("pending") or []),
        "annotators": dict(output.get("annotators") or {}),
        "expert_labels": list(output.get("expert_labels") or []),
        "study": output["study"],
        "uri": output["uri"],
    }


def slide_emission(
    state: Mapping[str, Any], tile: Mapping[str, Any]
) -> tuple[str, dict[str, Any]] | None:
    """Return the slide's output due now, with its emission key; ``None`` if none is.

    Parameters
    ----------
    state : Mapping
        The slide's join state: ``{"tile_outputs": {tile id: tile_part value},
        "emitted": [emission keys]}``.
    tile : Mapping
        The ``tile`` record of any tile of the slide (its ``parent_id`` and ``count``).

    Notes
    -----
    An output is due once ``tile["count"]`` tiles have an output, and again whenever a
    tile's output changes, but never halfway through a re-scoring: once the slide has had
    an output, one whose tiles a tier scored with several model versions is due only if
    the slide already had an output under those same versions (an expert's answer changed
    a tile). So a slide replayed after a promotion gets one new output, when its last
    tile is re-scored, not one per tile; its first output is due whatever the versions (a
    promotion may come while it is scored). The emission key names the versions and
    covers every tile's key, so a re-delivered tile result emits nothing twice. The
    output is :func:`slide_output`.
    """
    tiles = state.get("tile_outputs", {})
    if len(tiles) < tile["count"]:
        return None
    versions = versions_key(_joined(t["model_versions"] for t in tiles.values()))
    digest = hashlib.sha256(
        json.dumps(sorted((name, t["key"]) for name, t in tiles.items())).encode()
    ).hexdigest()[:24]
    key = f"{_SLIDE_KEY}{versions}:{digest}"
    emitted = [k for k in state.get("emitted", []) if k.startswith(_SLIDE_KEY)]
    if key in emitted:
        return None
    if (
        emitted
        and _mixed(t["model_versions"] for t in tiles.values())
        and not any(k.startswith(f"{_SLIDE_KEY}{versions}:") for k in emitted)
    ):
        return None  # re-scoring under way: wait for the slide's last tile
    return key, slide_output(tile["parent_id"], list(tiles.values()))


def _mixed(maps: Iterable[Mapping[str, str]]) -> bool:
    """Whether some key has several distinct values in ``maps``."""
    seen: dict[str, str] = {}
    return any(seen.setdefault(k, v) != v for m in maps for k, v in m.items())


def slide_output(slide_id: str, tiles: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Return the ``ImageOutput`` of a slide from its tiles' compact outputs.

    * status: ``unusable`` when every tile is; ``awaiting_annotation`` when a tile is;
      else ``analyzed``;
    * labels: each label's highest score over the usable tiles (a slide shows a label
      when one of its tiles does);
    * boxes: every usable tile's boxes in level-0 pixels of the slide, duplicates of one
      object seen by overlapping tiles merged (:func:`merge_boxes`);
    * routes: per tier, ``ANNOTATE`` if any tile's was, else ``PASS`` if any tile's was,
      else ``SKIP``;
    * model versions and experts: per tier, the distinct ones of the tiles joined by
      ``+`` (one, unless a promotion came while the slide was scored);
    * pending and expert labels: those of every tile.
    """
    statuses = {t["status"] for t in tiles}
    if statuses == {OutputStatus.UNUSABLE.value}:
        status = OutputStatus.UNUSABLE
    elif OutputStatus.AWAITING_ANNOTATION.value in statuses:
        status = OutputStatus.AWAITING_ANNOTATION
    else:
        status = OutputStatus.ANALYZED
    usable = [t for t in tiles if t["status"] != OutputStatus.UNUSABLE.value]
    labels: dict[str, float] = {}
    for t in usable:
        for label, score in t["labels"].items():
            labels[label] = max(score, labels.get(label, 0.0))
    routes: dict[str, str] = {}
    for t in tiles:
        for tier, r in t["routes"].items():
            routes[tier] = max(r, routes.get(tier, r), key=_ROUTE_ORDER.index)
    ordered = sorted(tiles, key=lambda t: t["index"])
    return events.image_output(
        slide_id,
        status=status,
        study=ordered[0]["study"],
        uri=ordered[0]["uri"],
        labels=labels,
        boxes=merge_boxes((t["index"], b) for t in usable for b in t["boxes"]),
        routes=routes,
        model_versions=_joined(t["model_versions"] for t in ordered),
        pending=list(dict.fromkeys(label for t in ordered for label in t["pending"])),
        annotators=_joined(t["annotators"] for t in ordered),
        expert_labels=list(dict.fromkeys(label for t in ordered for label in t["expert_labels"])),
    )


def _joined(maps: Iterable[Mapping[str, str]]) -> dict[str, str]:
    """Per key, the distinct values of ``maps`` in order, joined by ``+``."""
    seen: dict[str, list[str]] = {}
    for m in maps:
        for k, v in m.items():
            if v not in seen.setdefault(k, []):
                seen[k].append(v)
    return {k: "+".join(vs) for k, vs in seen.items()}


def _overlaps(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two boxes are one object: IoU >= MERGE_IOU or IoS >= MERGE_IOS."""
    w = min(a["x_max"], b["x_max"]) - max(a["x_min"], b["x_min"])
    h = min(a["y_max"], b["y_max"]) - max(a["y_min"], b["y_min"])
    if w <= 0 or h <= 0:
        return False
    inter = w * h
    area_a = (a["x_max"] - a["x_min"]) * (a["y_max"] - a["y_min"])
    area_b = (b["x_max"] - b["x_min"]) * (b["y_max"] - b["y_min"])
    return (
        inter / (area_a + area_b - inter) >= MERGE_IOU or inter / min(area_a, area_b) >= MERGE_IOS
    )


def merge_boxes(boxes: Iterable[tuple[int, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Merge the detections of one object made by overlapping tiles.

    Parameters
    ----------
    boxes : iterable of (int, Mapping)
        ``(tile index, Box record)``, boxes in slide pixels ``[x_min, y_min, x_max, y_max]``.

    Returns
    -------
    list of dict
        Box records, highest score first. Greedily, by score: a box joins a kept box of its
        class from another tile when they overlap (:data:`MERGE_IOU` as IoU, or
        :data:`MERGE_IOS` over the smaller box, for a box a tile border cut); the kept box
        grows to cover both and keeps the higher score. Boxes of one tile are never merged:
        the detector already chose among them.
    """
    kept: list[tuple[set[int], dict[str, Any]]] = []
    for index, box in sorted(boxes, key=lambda ib: -ib[1]["score"]):
        for tiles, merged in kept:
            if index in tiles or merged["label"] != box["label"] or not _overlaps(merged, box):
                continue
            tiles.add(index)
            merged.update(
                x_min=min(merged["x_min"], box["x_min"]),
                y_min=min(merged["y_min"], box["y_min"]),
                x_max=max(merged["x_max"], box["x_max"]),
                y_max=max(merged["y_max"], box["y_max"]),
            )
            break
        else:
            kept.append(({index}, dict(box)))
    return [merged for _, merged in kept]
