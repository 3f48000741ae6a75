"""Publish stored images again under their own ids, so the tiers score them anew.

Shared by ``phenocascade replay`` and the re-scoring consumer
(:mod:`phenocascade.consumers.rescorer`): each image of the image store
(:mod:`phenocascade.store.images`) becomes an ``ImageSubmitted`` on the submitted topic,
carried as it was first sent where possible. The tiers score it with the models they
serve now; the joiner adds an output under the new model versions and keeps the old ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phenocascade.config import Settings
from phenocascade.errors import (
    NotFoundError,
    PathNotAllowedError,
    PhenocascadeError,
    ValidationError,
)
from phenocascade.imaging import resolve_under_roots
from phenocascade.store.images import ImageStore, StoredImage, content_digest
from phenocascade.store.slides import pyramid
from phenocascade.streams import events
from phenocascade.streams.kafka import plain_producer
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import Tiling, routing_key, tile_submissions


@dataclass
class ReplayPlan:
    """The submissions to publish again, and the images left out with the reason.

    ``records`` holds one record per image, or per tile of a slide; ``carried`` counts the
    images by how they travel (``path``, ``inline``, ``store``).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    carried: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def images(self) -> int:
        """How many images are sent (a slide's tiles count once)."""
        return sum(self.carried.values())


def _unchanged_path(image: StoredImage, roots: Sequence[Path]) -> Path | None:
    """Return the original file (or folder) of ``image`` if allowed and holding its content."""
    if image.uri is None:
        return None
    try:
        path = resolve_under_roots(image.uri, roots)
        digest = content_digest(path)
    except (PathNotAllowedError, ValidationError, OSError):
        return None
    return path if digest == image.sha256 else None


def _local_blob(store: ImageStore, image: StoredImage, roots: Sequence[Path]) -> Path | None:
    """Return the stored file (or folder) of ``image`` if the store is local, under ``roots``."""
    blob = store.local_path(image)
    if blob is None or not any(blob.resolve().is_relative_to(r) for r in roots):
        return None
    return blob


def replay_records(
    settings: Settings, store: ImageStore, image: StoredImage
) -> tuple[list[dict[str, Any]], str]:
    """Return the ``ImageSubmitted`` records that submit ``image`` again, and how they carry it.

    As it was first sent where possible: by its original path while that file is under the
    allowed roots and holds the same bytes (``"path"``); otherwise the stored bytes go
    inline when they fit ``max_inline_bytes`` (``"inline"``), or by the blob's path when
    the store is a local folder under the allowed roots (``"store"``). A slide (its
    manifest has a ``tiling``) is one record per tile, tiled as it was first, its tiles
    read from its original file or from the stored one, never inline (:func:`_slide_records`).

    Raises
    ------
    PhenocascadeError
        If the bytes cannot be read from the store, or can be sent no way.
    """
    if image.tiling is not None:
        return _slide_records(settings, store, image)
    roots = settings.roots()
    path = _unchanged_path(image, roots)
    if path is not None:
        record = events.image_submitted(image.image_id, uri=image.uri, fmt=image.format)
        how = "path"
    else:
        data = store.read(image)
        blob = _local_blob(store, image, roots)
        if len(data) <= settings.max_inline_bytes:
            record = events.image_submitted(image.image_id, inline=data, fmt=image.format)
            how = "inline"
        elif blob is not None:
            record = events.image_submitted(image.image_id, uri=str(blob), fmt=image.format)
            how = "store"
        else:
            raise ValidationError(
                f"{len(data)} bytes exceed PHENOCASCADE_MAX_INLINE_BYTES and its file has "
                "changed; put the image store's folder under PHENOCASCADE_ALLOWED_ROOTS"
            )
    record["metadata"] = {**record["metadata"], **image.metadata}
    return [record], how


def _slide_records(
    settings: Settings, store: ImageStore, image: StoredImage
) -> tuple[list[dict[str, Any]], str]:
    """Return the tiles' ``ImageSubmitted`` of a stored slide, and how they carry it.

    The workers read each tile lazily from a local file (an OME-Zarr slide: a folder): the
    slide's original one while it holds the stored content (``"path"``), else the stored
    copy (``"store"``), which must then be in a local image store under the allowed roots. A
    store reached by URL (``s3://``...) cannot serve lazy reads, so such a slide is refused
    with what to do.
    """
    roots = settings.roots()
    path, how = _unchanged_path(image, roots), "path"
    if path is None:
        path, how = _local_blob(store, image, roots), "store"
        if path is None:
            raise ValidationError(
                f"slide {image.image_id}: its file {image.uri} is gone or changed, and its "
                f"stored copy in {store.url} cannot be read tile by tile: the workers read "
                "tiles from a local file, so keep slides in a local image store folder under "
                "PHENOCASCADE_ALLOWED_ROOTS, or put the slide back at its path"
            )
        try:
            digest = content_digest(path)
        except FileNotFoundError:
            digest = None
        if digest != image.sha256:
            raise NotFoundError(
                f"slide {image.image_id}: its stored copy ({image.sha256[:12]}...) in "
                f"{store.url} is missing or damaged, and its file {image.uri} changed"
            )
    slide = events.image_submitted(image.image_id, uri=str(path), fmt=image.format)
    slide["metadata"] = {**slide["metadata"], **image.metadata}
    tiling = Tiling(**(image.tiling or {}))
    return tile_submissions(slide, levels=pyramid(path), tiling=tiling), how


def plan_replay(settings: Settings, store: ImageStore, images: Iterable[StoredImage]) -> ReplayPlan:
    """Build the submissions of ``images``; an image that cannot be sent is left out."""
    plan = ReplayPlan()
    for image in images:
        try:
            records, how = replay_records(settings, store, image)
        except PhenocascadeError as exc:
            plan.left_out[image.image_id] = str(exc)
            continue
        plan.records += records
        plan.carried[how] = plan.carried.get(how, 0) + 1
    return plan


def publish(settings: Settings, topic: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Produce ``ImageSubmitted`` records and wait for every acknowledgement.

    Each is keyed by its image id, a tile by its slide's.

    Raises
    ------
    ValidationError
        If Kafka did not acknowledge them all within 60 s.
    """
    codec = EventCodec()
    producer = plain_producer(settings.kafka)
    for record in records:
        producer.produce(
            topic, key=routing_key(record), value=codec.encode("ImageSubmitted", record)
        )
        producer.poll(0)
    remaining = producer.flush(60)
    if remaining:
        raise ValidationError(f"{remaining} replayed images were not acknowledged by Kafka in 60 s")
