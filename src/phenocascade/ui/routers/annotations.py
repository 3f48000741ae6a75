"""Annotations: save one (validated, published, stored, task done) and list them for review.

Both keep to the studies the user may access: saving an annotation of another study's task
is answered 404 (as for a task that does not exist), and the review lists leave out every
annotation whose task is of another study.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field

from phenocascade.domain import StageKind
from phenocascade.errors import ValidationError
from phenocascade.store.annotations import (
    annotations_for_image,
    claim_task,
    complete_task,
    recent_annotations,
    save_annotation,
)
from phenocascade.streams import events
from phenocascade.ui.deps import Ctx, CurrentUser, ReviewerUser
from phenocascade.ui.routers.tasks import known_tier, load_task
from phenocascade.ui.validation import check_annotation, check_image_id, task_kind

router = APIRouter(prefix="/api/annotations", tags=["annotations"])


class BoxIn(BaseModel):
    """A box as drawn: pixels, ``x_max``/``y_max`` exclusive, a label from the class list."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    label: str


class AnnotationIn(BaseModel):
    """One expert annotation of a task."""

    image_id: str = Field(min_length=1)
    tier: str = Field(min_length=1)
    labels: list[str] = Field(default_factory=list)
    boxes: list[BoxIn] = Field(default_factory=list)


@router.post("", status_code=status.HTTP_201_CREATED)
def save(body: AnnotationIn, ctx: Ctx, user: CurrentUser) -> dict[str, Any]:
    """Validate and save an annotation.

    Order: find the task (404 if none, or of a study the user may not access) -> validate
    (nothing stored on error) -> claim (409 if another user holds the task) -> store the
    label -> publish the ``Annotation`` event (and, for a gate annotation saying the gate
    label, the original submission to the gate's pass topic) -> mark the task done.
    """
    task = load_task(ctx, body.tier, body.image_id, user)
    spec = ctx.topology.tier(body.tier)
    kind = task_kind(spec, task["boxes"])
    pixels = ctx.pixels.get(task)
    labels, boxes = check_annotation(
        kind=kind,
        classes=task["classes"],
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        labels=body.labels,
        boxes=[b.model_dump() for b in body.boxes],
    )
    annotation = {
        "annotation_id": uuid.uuid4().hex,
        "image_id": body.image_id,
        "tier": body.tier,
        "annotator": user.username,
        "labels": labels,
        "boxes": [events.box_record(b) for b in boxes],
        "uri": task["uri"],
        "model_version": task["model_version"],
        "created_at": events.now_ms(),
    }
    reenters = kind is StageKind.GATE and bool(labels)
    if reenters and not task["submitted"]:
        raise ValidationError(
            f"task {body.tier}/{body.image_id} has no original submission to send back into "
            "the cascade"
        )
    claim_task(session=ctx.session, image_id=body.image_id, tier=body.tier, user=user.username)
    save_annotation(session=ctx.session, annotation=annotation)
    ctx.publisher.publish(
        annotation, reentry=(spec.routes["pass"], task["submitted"]) if reenters else None
    )
    complete_task(
        session=ctx.session,
        image_id=body.image_id,
        tier=body.tier,
        user=user.username,
        annotation_id=annotation["annotation_id"],
    )
    return {"annotation_id": annotation["annotation_id"], "labels": labels, "reentered": reenters}


@router.get("")
def list_annotations(
    ctx: Ctx,
    user: ReviewerUser,
    tier: str | None = None,
    image_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Return the newest annotations of a tier, or every annotation of an image (reviewers).

    Only annotations whose task is of a study the reviewer may access.
    """
    studies = user.accessible_studies()
    if image_id:
        found = annotations_for_image(
            session=ctx.session, image_id=check_image_id(image_id), studies=studies
        )
        return {"annotations": [a for a in found if not tier or a["tier"] == tier][:limit]}
    if not tier:
        raise ValidationError("give a tier or an image_id")
    known_tier(ctx, tier)
    return {
        "annotations": recent_annotations(
            session=ctx.session, tier=tier, limit=limit, studies=studies
        )
    }
