"""Export image outputs: COCO detection JSON, and CSV or Parquet tables.

An output is a decoded ``ImageOutput`` (as :func:`phenocascade.store.cassandra.get_latest_output`
returns it): status, study, URI, image-level label scores, boxes
``[x_min, y_min, x_max, y_max]`` in pixels with label and score, and the route and model
version of each tier that produced it. Every export states the model versions and the
routes: as columns in a table, and in the ``info`` block of a COCO file.

* COCO: :func:`coco_document` builds on :func:`~phenocascade.data.importers.to_coco`, so
  that :func:`~phenocascade.data.importers.import_coco` reads it back (each image's
  ``file_name`` relative to ``info.images_root``); each annotation has its ``score``, each
  image an ``attributes`` object with the phenocascade id, status, label scores, routes and
  model versions.
* Tables: :func:`image_rows` (one row per image) or :func:`box_rows` (one row per box),
  written by :func:`write_csv` or :func:`write_parquet` with the same columns.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from phenocascade.data.importers import image_size, to_coco
from phenocascade.data.labelled import LabelledSet
from phenocascade.domain import Box, Sample
from phenocascade.errors import PhenocascadeError
from phenocascade.imaging import resolve_under_roots
from phenocascade.store.cassandra import versions_key

Output = Mapping[str, Any]
Per = Literal["image", "box"]

# Columns every row has, in order; per-label, per-route and per-version columns follow.
_IMAGE_COLUMNS = ("image_id", "study", "status", "uri", "produced_at", "versions_key", "n_boxes")
_BOX_COLUMNS = (
    "image_id",
    "study",
    "status",
    "uri",
    "produced_at",
    "versions_key",
    "box",
    "label",
    "score",
    "x_min",
    "y_min",
    "x_max",
    "y_max",
)
_ARROW_TYPES: dict[str, pa.DataType] = {
    "produced_at": pa.timestamp("ms", tz="UTC"),
    "n_boxes": pa.int64(),
    "box": pa.int64(),
    **{c: pa.float64() for c in ("score", "x_min", "y_min", "x_max", "y_max")},
}


def summary(outputs: Sequence[Output]) -> dict[str, Any]:
    """Return what an export holds: counts, model versions and routes.

    Returns
    -------
    dict
        ``images``, ``boxes``, ``statuses`` (count per status), ``model_versions`` (count
        of images per versions key) and ``routes`` (``{tier: {route: count}}``).
    """
    routes: dict[str, Counter[str]] = defaultdict(Counter)
    for o in outputs:
        for tier, route in o["routes"].items():
            routes[tier][route] += 1
    return {
        "images": len(outputs),
        "boxes": sum(len(o["boxes"]) for o in outputs),
        "statuses": dict(Counter(o["status"] for o in outputs)),
        "model_versions": dict(Counter(versions_key(o["model_versions"]) for o in outputs)),
        "routes": {tier: dict(counts) for tier, counts in sorted(routes.items())},
    }


def produced_at(output: Output) -> datetime:
    """Return when an output was produced, as an aware UTC datetime.

    The store gives naive UTC datetimes, the results topic epoch milliseconds.
    """
    value = output["produced_at"]
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def local_path(uri: str | None) -> Path | None:
    """Return the file path of a submission URI (plain or ``file://``), ``None`` if inline."""
    if not uri:
        return None
    return Path(uri.removeprefix("file://"))


# -- COCO ------------------------------------------------------------------------------------
def coco_document(
    outputs: Sequence[Output],
    *,
    study: str,
    images_root: Path | None = None,
    roots: Sequence[Path] | None = None,
    exported_at: datetime | None = None,
) -> dict[str, Any]:
    """Return a COCO detection document of ``outputs``.

    Parameters
    ----------
    outputs : sequence of Mapping
        Decoded ``ImageOutput`` records (one per image).
    study : str
        Recorded in ``info``.
    images_root : pathlib.Path or None, default None
        Folder the ``file_name`` of each image is relative to; ``None`` takes the
        deepest folder that holds every image file.
    roots : sequence of pathlib.Path or None, default None
        If given, only files under these folders are read (the allowed roots).
    exported_at : datetime or None, default None
        Recorded as ``info.date_created``; ``None`` is now.

    Returns
    -------
    dict
        ``info`` (study, images root, :func:`summary` of the exported images, and
        ``left_out``: each image that could not be exported with the reason), ``images``,
        ``annotations`` (``bbox = [x, y, width, height]``, ``score``), ``categories`` (the
        box labels, sorted).

    Notes
    -----
    COCO names an image by its file and size, so an image without a readable file is
    left out: one submitted inline, one whose file is gone, unreadable or outside ``roots``,
    or one whose file was since rewritten and scored again (the newer output keeps the path).
    """
    kept, left_out = _coco_images(outputs, roots)
    root = images_root or _common_folder([p for _, p in kept])
    samples = []
    for o, path in kept:
        if not path.is_relative_to(root):
            left_out.append({"image_id": o["image_id"], "reason": f"file outside {root}"})
            continue
        boxes = [
            Box(b["x_min"], b["y_min"], b["x_max"], b["y_max"], b["label"], b["score"])
            for b in o["boxes"]
        ]
        samples.append((o, Sample(str(path.relative_to(root)), path, boxes=tuple(boxes))))
    classes = tuple(sorted({b.label for _, s in samples for b in s.boxes}))
    doc = to_coco(LabelledSet(f"phenocascade/{study}", classes, tuple(s for _, s in samples)))
    annotations = iter(doc["annotations"])
    for image, (o, sample) in zip(doc["images"], samples, strict=True):
        image["attributes"] = {
            "image_id": o["image_id"],
            "status": o["status"],
            "labels": dict(o["labels"]),
            "routes": dict(o["routes"]),
            "model_versions": dict(o["model_versions"]),
        }
        for box in sample.boxes:
            next(annotations)["score"] = box.score
    created = exported_at or datetime.now(tz=UTC)
    doc["info"] = {
        "description": f"phenocascade outputs of study {study}",
        "date_created": created.isoformat(),
        "study": study,
        "images_root": str(root),
        **summary([o for o, _ in samples]),
        "left_out": left_out,
    }
    return doc


def _coco_images(
    outputs: Sequence[Output], roots: Sequence[Path] | None
) -> tuple[list[tuple[Output, Path]], list[dict[str, str]]]:
    """Split outputs into those with a readable file of their own and the rest, with reasons."""
    left_out: list[dict[str, str]] = []
    by_path: dict[Path, list[Output]] = defaultdict(list)
    for o in outputs:
        path = local_path(o["uri"])
        if path is None:
            left_out.append({"image_id": o["image_id"], "reason": "submitted inline: no file"})
        else:
            by_path[path].append(o)
    kept: list[tuple[Output, Path]] = []
    for path, group in by_path.items():
        *older, newest = sorted(group, key=produced_at)
        left_out += [
            {"image_id": o["image_id"], "reason": f"its file now holds {newest['image_id']}"}
            for o in older
        ]
        try:
            if roots is not None:
                resolve_under_roots(path, roots)
            image_size(path)
        except PhenocascadeError as exc:
            left_out.append({"image_id": newest["image_id"], "reason": str(exc)})
            continue
        kept.append((newest, path))
    return kept, left_out


def _common_folder(paths: Sequence[Path]) -> Path:
    if not paths:
        return Path("/")
    return Path(os.path.commonpath([p.parent for p in paths]))


# -- tables ----------------------------------------------------------------------------------
def _common(o: Output) -> dict[str, Any]:
    return {
        "image_id": o["image_id"],
        "study": o["study"],
        "status": o["status"],
        "uri": o["uri"],
        "produced_at": produced_at(o),
        "versions_key": versions_key(o["model_versions"], o.get("annotators")),
    }


def _per_tier(o: Output) -> dict[str, Any]:
    return {
        **{f"route_{tier}": route for tier, route in o["routes"].items()},
        **{f"version_{tier}": version for tier, version in o["model_versions"].items()},
        **{f"annotator_{tier}": who for tier, who in (o.get("annotators") or {}).items()},
    }


def image_rows(outputs: Sequence[Output]) -> list[dict[str, Any]]:
    """Return one row per image.

    Columns: ``image_id, study, status, uri, produced_at, versions_key, n_boxes``, then
    ``label_<name>`` (each image-level label's score), ``route_<tier>`` and
    ``version_<tier>`` (each tier's route and model version; empty where a tier did not
    score the image, e.g. after a gate's SKIP) and ``annotator_<tier>`` (the expert who
    decided what that tier's model left open; empty where the model decided alone).
    """
    return [
        {
            **_common(o),
            "n_boxes": len(o["boxes"]),
            **{f"label_{name}": float(score) for name, score in o["labels"].items()},
            **_per_tier(o),
        }
        for o in outputs
    ]


def box_rows(outputs: Sequence[Output]) -> list[dict[str, Any]]:
    """Return one row per box (an image without boxes has none).

    Columns: ``image_id, study, status, uri, produced_at, versions_key``, ``box`` (its
    index in the image's output), ``label, score, x_min, y_min, x_max, y_max`` (pixels,
    ``x_max``/``y_max`` exclusive), then ``route_<tier>``, ``version_<tier>`` and
    ``annotator_<tier>``.
    """
    return [
        {
            **_common(o),
            "box": i,
            "label": b["label"],
            "score": float(b["score"]),
            **{k: float(b[k]) for k in ("x_min", "y_min", "x_max", "y_max")},
            **_per_tier(o),
        }
        for o in outputs
        for i, b in enumerate(o["boxes"])
    ]


def columns(rows: Sequence[Mapping[str, Any]], *, per: Per) -> list[str]:
    """Return the column order of ``rows``.

    The fixed columns of ``per`` (``image`` or ``box``) come first, then the label, route,
    version and annotator columns, each group in name order.
    """
    fixed = _IMAGE_COLUMNS if per == "image" else _BOX_COLUMNS
    extra = {k for r in rows for k in r} - set(fixed)
    order = {"label_": 0, "route_": 1, "version_": 2, "annotator_": 3}
    return [*fixed, *sorted(extra, key=lambda c: (order[c[: c.index("_") + 1]], c))]


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path, *, per: Per) -> None:
    """Write ``rows`` as CSV with a header; missing values are empty, times ISO 8601."""
    names = columns(rows, per=per)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})


def _csv_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def arrow_table(
    rows: Sequence[Mapping[str, Any]], *, per: Per, metadata: Mapping[str, Any] | None = None
) -> pa.Table:
    """Return ``rows`` as an Arrow table (label scores and coordinates float64, times UTC ms).

    ``metadata`` is stored as JSON under the schema key ``phenocascade``.
    """
    fields = [
        pa.field(
            name, _ARROW_TYPES.get(name, pa.float64() if name.startswith("label_") else pa.string())
        )
        for name in columns(rows, per=per)
    ]
    meta = {"phenocascade": json.dumps(metadata, default=str)} if metadata is not None else None
    return pa.Table.from_pylist(list(rows), schema=pa.schema(fields, metadata=meta))


def write_parquet(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    per: Per,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write ``rows`` as one Parquet file (see :func:`arrow_table`)."""
    pq.write_table(arrow_table(rows, per=per, metadata=metadata), path)
