"""Publish stored images again under their own ids, so the tiers score them anew.

Shared by ``phenocascade replay`` and the re-scoring consumer
(:mod:`phenocascade.consumers.rescorer`): each image of the image store
(:mod:`phenocascade.store.images`) becomes an ``ImageSubmitted`` on the submitted topic,
carried as it was first sent where possible. The tiers score it with the models they
serve now; the joiner adds an output under the new model versions and keeps the old ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phenocascade.config import Settings
from phenocascade.errors import PathNotAllowedError, PhenocascadeError, ValidationError
from phenocascade.imaging import resolve_under_roots
from phenocascade.store.images import ImageStore, StoredImage
from phenocascade.streams import events
from phenocascade.streams.kafka import plain_producer
from phenocascade.streams.serde import EventCodec


@dataclass
class ReplayPlan:
    """The submissions to publish again, and the images left out with the reason."""

    records: list[dict[str, Any]] = field(default_factory=list)
    carried: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)


def _unchanged_path(image: StoredImage, roots: Sequence[Path]) -> Path | None:
    """Return the image's original file if it is allowed and still holds the stored bytes."""
    if image.uri is None:
        return None
    try:
        path = resolve_under_roots(image.uri, roots)
        data = path.read_bytes()
    except (PathNotAllowedError, OSError):
        return None
    return path if hashlib.sha256(data).hexdigest() == image.sha256 else None


def replay_record(
    settings: Settings, store: ImageStore, image: StoredImage
) -> tuple[dict[str, Any], str]:
    """Return the ``ImageSubmitted`` that submits ``image`` again, and how it carries it.

    As it was first sent where possible: by its original path while that file is under the
    allowed roots and holds the same bytes (``"path"``); otherwise the stored bytes go
    inline when they fit ``max_inline_bytes`` (``"inline"``), or by the blob's path when
    the store is a local folder under the allowed roots (``"store"``).

    Raises
    ------
    PhenocascadeError
        If the bytes cannot be read from the store, or can be sent no way.
    """
    roots = settings.roots()
    path = _unchanged_path(image, roots)
    if path is not None:
        record = events.image_submitted(image.image_id, uri=image.uri, fmt=image.format)
        how = "path"
    else:
        data = store.read(image)
        blob = store.local_path(image)
        if len(data) <= settings.max_inline_bytes:
            record = events.image_submitted(image.image_id, inline=data, fmt=image.format)
            how = "inline"
        elif blob is not None and any(blob.resolve().is_relative_to(r) for r in roots):
            record = events.image_submitted(image.image_id, uri=str(blob), fmt=image.format)
            how = "store"
        else:
            raise ValidationError(
                f"{len(data)} bytes exceed PHENOCASCADE_MAX_INLINE_BYTES and its file has "
                "changed; put the image store's folder under PHENOCASCADE_ALLOWED_ROOTS"
            )
    record["metadata"] = {**record["metadata"], **image.metadata}
    return record, how


def plan_replay(settings: Settings, store: ImageStore, images: Iterable[StoredImage]) -> ReplayPlan:
    """Build the submissions of ``images``; an image that cannot be sent is left out."""
    plan = ReplayPlan()
    for image in images:
        try:
            record, how = replay_record(settings, store, image)
        except PhenocascadeError as exc:
            plan.left_out[image.image_id] = str(exc)
            continue
        plan.records.append(record)
        plan.carried[how] = plan.carried.get(how, 0) + 1
    return plan


def publish(settings: Settings, topic: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Produce ``ImageSubmitted`` records keyed by image id; wait for every acknowledgement.

    Raises
    ------
    ValidationError
        If Kafka did not acknowledge them all within 60 s.
    """
    codec = EventCodec()
    producer = plain_producer(settings.kafka)
    for record in records:
        producer.produce(
            topic, key=record["image_id"].encode(), value=codec.encode("ImageSubmitted", record)
        )
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining:
        raise ValidationError(f"{remaining} replayed images were not acknowledged by Kafka in 60 s")
