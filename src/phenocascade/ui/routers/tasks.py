"""Annotation tasks: the queue, one task with its image facts, claiming, and the pixels.

A user sees only the tasks of the studies they may access
(:meth:`~phenocascade.ui.security.User.may_access`): the queue leaves the others out, and
a task of another study is answered 404 exactly as a task that does not exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from phenocascade.errors import NotFoundError, ValidationError
from phenocascade.store.annotations import claim_task, get_task, list_open_tasks
from phenocascade.ui.deps import AppContext, Ctx, CurrentUser
from phenocascade.ui.images import image_info, windowed_png
from phenocascade.ui.security import User
from phenocascade.ui.validation import check_image_id, check_study, check_window, task_kind

router = APIRouter(prefix="/api/tasks", tags=["tasks"])


def known_tier(ctx: AppContext, tier: str) -> None:
    """Refuse a tier the topology does not have.

    Raises
    ------
    ValidationError
        Naming the known tiers.
    """
    names = [t.name for t in ctx.topology.tiers]
    if tier not in names:
        raise ValidationError(f"unknown tier {tier!r}; the topology has {names}")


def load_task(ctx: AppContext, tier: str, image_id: str, user: User) -> dict[str, Any]:
    """Return a task of a known tier that ``user`` may access.

    Raises
    ------
    ValidationError
        If the tier is unknown or the image id malformed (before any query).
    NotFoundError
        If there is no such task, or it belongs to a study ``user`` may not access: the
        same answer, so the refusal does not reveal that the task exists.
    """
    known_tier(ctx, tier)
    task = get_task(session=ctx.session, image_id=check_image_id(image_id), tier=tier)
    if task is None or not user.may_access(task["study"]):
        raise NotFoundError(f"no annotation task for image {image_id!r} in tier {tier!r}")
    return task


def task_view(ctx: AppContext, task: dict[str, Any], *, with_image: bool) -> dict[str, Any]:
    """Return a task as the viewer needs it: no raw bytes, plus its kind (and image facts)."""
    spec = ctx.topology.tier(task["tier"])
    view = {k: v for k, v in task.items() if k not in ("inline", "submitted")}
    view["kind"] = task_kind(spec, task["boxes"]).value
    if with_image:
        view["image"] = image_info(ctx.pixels.get(task))
    return view


@router.get("")
def list_tasks(
    ctx: Ctx,
    user: CurrentUser,
    tier: str | None = None,
    study: str | None = None,
    min_priority: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """List the tasks waiting for this user, most uncertain first, then oldest first.

    Only tasks of the studies the user may access; a ``study`` they may not access lists
    nothing. Empty ``tier`` or ``study`` parameters mean "all". The answer also holds the
    topology's tiers and the user's studies (``null``: every study).
    """
    if tier:
        known_tier(ctx, tier)
    studies = user.accessible_studies()
    tasks = list_open_tasks(
        session=ctx.session,
        tier=tier or None,
        study=check_study(study) if study else None,
        studies=studies,
        min_priority=min_priority,
        limit=limit,
        user=user.username,
    )
    return {
        "tasks": tasks,
        "tiers": [t.name for t in ctx.topology.tiers],
        "studies": None if studies is None else sorted(studies),
    }


@router.get("/{tier}/{image_id}")
def read_task(tier: str, image_id: str, ctx: Ctx, user: CurrentUser) -> dict[str, Any]:
    """Return one task with its prediction, kind and image facts (size, dtype, window)."""
    return task_view(ctx, load_task(ctx, tier, image_id, user), with_image=True)


@router.post("/{tier}/{image_id}/claim")
def claim(tier: str, image_id: str, ctx: Ctx, user: CurrentUser) -> dict[str, Any]:
    """Claim the task for the user (or extend their claim); 409 if someone else holds it."""
    load_task(ctx, tier, image_id, user)
    task = claim_task(session=ctx.session, image_id=image_id, tier=tier, user=user.username)
    if task is None:
        raise NotFoundError(f"no annotation task for image {image_id!r} in tier {tier!r}")
    return task_view(ctx, task, with_image=False)


@router.get("/{tier}/{image_id}/image")
def image(
    tier: str,
    image_id: str,
    ctx: Ctx,
    user: CurrentUser,
    low: float | None = None,
    high: float | None = None,
) -> Response:
    """Return the image as an 8-bit PNG windowed to ``[low, high]`` raw units.

    Without ``low``/``high`` the default window (0.5th-99.5th percentile) is used.
    """
    pixels = ctx.pixels.get(load_task(ctx, tier, image_id, user))
    info = image_info(pixels)
    lo, hi = check_window(
        info["window_low"] if low is None else low,
        info["window_high"] if high is None else high,
        max_value=info["max_value"],
    )
    return Response(
        windowed_png(pixels, lo, hi),
        media_type="image/png",
        headers={"Cache-Control": "private, max-age=300"},
    )
