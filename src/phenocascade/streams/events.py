"""Builders of event records (dicts shaped by ``schemas/*.avsc``) from domain values."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from phenocascade.domain import Box, ImageMeta, OutputStatus, Route, StageKind, StageOutput

_FORMATS = {"tif": "TIFF", "tiff": "TIFF", "png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}
NOVEL = "novel"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def now_ms() -> int:
    """Return the current time in epoch milliseconds."""
    return int(time.time() * 1000)


def format_of(name: str) -> str:
    """Return the ``ImageFormat`` symbol for a file name's extension."""
    return _FORMATS.get(name.rsplit(".", 1)[-1].lower(), "UNKNOWN")


def box_record(box: Box) -> dict[str, Any]:
    """Return the Avro ``Box`` record of ``box``."""
    return {
        "x_min": box.x_min,
        "y_min": box.y_min,
        "x_max": box.x_max,
        "y_max": box.y_max,
        "label": box.label,
        "score": box.score,
    }


def boxes_from_records(records: Iterable[Mapping[str, Any]]) -> list[Box]:
    """Return domain boxes from Avro ``Box`` records."""
    return [
        Box(r["x_min"], r["y_min"], r["x_max"], r["y_max"], r["label"], r["score"]) for r in records
    ]


def image_submitted(
    image_id: str,
    *,
    uri: str | None = None,
    inline: bytes | None = None,
    fmt: str = "UNKNOWN",
    meta: ImageMeta | None = None,
) -> dict[str, Any]:
    """Return an ``ImageSubmitted`` record; exactly one of ``uri``/``inline`` must be set."""
    if (uri is None) == (inline is None):
        raise ValueError("exactly one of uri and inline must be given")
    m = meta or ImageMeta()
    return {
        "image_id": image_id,
        "submitted_at": now_ms(),
        "uri": uri,
        "inline": inline,
        "format": fmt,
        "metadata": {
            "study": m.study,
            "specimen": m.specimen,
            "modality": m.modality,
            "stain": m.stain,
            "scanner": m.scanner,
            "acquired_at": m.acquired_at,
        },
    }


def tier_result(
    submitted: Mapping[str, Any],
    *,
    tier: str,
    kind: StageKind,
    route: Route,
    output: StageOutput,
    model_name: str,
    model_version: str,
    pending: Sequence[str] = (),
) -> dict[str, Any]:
    """Return the ``TierResult`` of one tier for one submitted image.

    Its ``reason`` is :func:`route_reason` of ``output``; ``pending`` lists the labels an
    expert is asked (:func:`~phenocascade.domain.pending_labels`).
    """
    return {
        "image_id": submitted["image_id"],
        "tier": tier,
        "kind": kind.value,
        "route": route.value,
        "scores": {k: float(v) for k, v in output.scores.items()},
        "boxes": [box_record(b) for b in output.boxes],
        "model_name": model_name,
        "model_version": model_version,
        "study": submitted["metadata"]["study"],
        "uri": submitted["uri"],
        "produced_at": now_ms(),
        "reason": route_reason(output),
        "submitted_at": submitted["submitted_at"],
        "pending": list(pending),
        "tile": submitted.get("tile"),
    }


def route_reason(output: StageOutput) -> str | None:
    """Return ``"novel"`` if the tier found the image unlike its calibration data, else ``None``.

    A novel image goes to a person whatever its scores (:func:`~phenocascade.domain.route`).
    """
    return NOVEL if output.novel else None


def uncertainty(output: StageOutput) -> float:
    """Return a priority in ``[0, 1]``: 1 minus twice the least sure score's distance to 0.5.

    A novel image gets 1.0: its scores may look confident but carry no guarantee, and a
    new scanner or stain should reach an expert on its first images.
    """
    if output.novel:
        return 1.0
    probs = [*output.scores.values(), *(b.score for b in output.boxes)]
    if not probs:
        return 0.0
    return max(1.0 - 2.0 * abs(p - 0.5) for p in probs)


def annotation_request(
    submitted: Mapping[str, Any],
    submitted_bytes: bytes,
    *,
    tier: str,
    output: StageOutput,
    classes: Sequence[str],
    model_name: str,
    model_version: str,
    ask: Sequence[str] = (),
    priority: float | None = None,
) -> dict[str, Any]:
    """Return an ``AnnotationRequest`` carrying the prediction that caused it.

    Its ``reason`` is :func:`route_reason` of ``output``; ``ask`` lists the labels the
    expert is asked (empty: every class); ``priority`` (in ``[0, 1]``, highest served
    first) defaults to :func:`uncertainty` of ``output``.
    """
    return {
        "image_id": submitted["image_id"],
        "tier": tier,
        "priority": uncertainty(output) if priority is None else priority,
        "scores": {k: float(v) for k, v in output.scores.items()},
        "boxes": [box_record(b) for b in output.boxes],
        "classes": list(classes),
        "model_name": model_name,
        "model_version": model_version,
        "study": submitted["metadata"]["study"],
        "uri": submitted["uri"],
        "inline": submitted["inline"],
        "submitted": submitted_bytes,
        "created_at": now_ms(),
        "reason": route_reason(output),
        "ask": list(ask),
    }


def dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    tier: str,
    error_kind: str,
    message: str,
    payload: bytes | None,
    image_id: str | None = None,
) -> dict[str, Any]:
    """Return a ``DeadLetter`` record; the payload is truncated to 64 KiB."""
    return {
        "origin_topic": topic,
        "origin_partition": partition,
        "origin_offset": offset,
        "image_id": image_id,
        "tier": tier,
        "error_kind": error_kind,
        "message": message,
        "payload": (payload or b"")[:65536],
        "failed_at": now_ms(),
    }


def image_output(
    image_id: str,
    *,
    status: OutputStatus,
    study: str,
    uri: str | None,
    labels: Mapping[str, float],
    boxes: Sequence[Mapping[str, Any]],
    routes: Mapping[str, str],
    model_versions: Mapping[str, str],
    pending: Sequence[str] = (),
    annotators: Mapping[str, str] | None = None,
    expert_labels: Sequence[str] = (),
) -> dict[str, Any]:
    """Return the final ``ImageOutput`` record of one image.

    ``pending`` lists its labels that still await an expert; every other label and box
    in it is final. ``annotators`` names, per tier, the expert who answered what its model
    left open, and ``expert_labels`` the labels those experts decided.
    """
    return {
        "image_id": image_id,
        "status": status.value,
        "study": study,
        "uri": uri,
        "labels": dict(labels),
        "boxes": list(boxes),
        "routes": dict(routes),
        "model_versions": dict(model_versions),
        "produced_at": now_ms(),
        "pending": list(pending),
        "annotators": dict(annotators or {}),
        "expert_labels": list(expert_labels),
    }


def to_epoch_ms(value: datetime | int) -> int:
    """Return epoch milliseconds from a decoded ``timestamp-millis`` value.

    Exact: integer arithmetic on the time since the epoch, since the float seconds of
    ``datetime.timestamp`` can round one millisecond down. A naive ``datetime`` is local
    time, as for ``datetime.timestamp``.
    """
    if isinstance(value, int):
        return value
    return (value.astimezone(UTC) - _EPOCH) // _MILLISECOND
