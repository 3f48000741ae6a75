"""Cassandra repository of the active-learning loop: annotation tasks and labels.

Tables are designed around the queries they serve:

* ``annotation_tasks``: one row per ``(image_id, tier)``, the authority on a task's
  state. Every write to it is a lightweight transaction (``IF NOT EXISTS`` /
  ``IF revision = ?``), so a replayed request never duplicates or reopens a task and two
  annotators never both hold a claim. A task ends once: ``done`` (an expert answered) or
  ``superseded`` (a newer model decides the image on its own, :func:`supersede_task`);
  only a superseded one opens again, when a model asks about the image once more.
* ``annotation_queue``: the tasks not done yet, one partition per ``(tier, study)``,
  clustered by ``priority DESC, created_at ASC`` so a partition reads in serving order
  and ``priority >= ?`` is a slice. ``annotation_queue_partitions`` lists the
  ``(tier, study)`` partitions so the queue of a tier (or of every tier) is a merge of
  already sorted partitions.
* ``annotations_by_tier`` (clustered by ``created_at``) feeds retraining: "every label of
  tier T since time S"; ``annotations_by_image`` answers "every label of this image".
  ``annotation_ids`` (written first, ``IF NOT EXISTS``) pins each annotation id to one
  ``(tier, created_at)`` key, so a re-sent annotation is stored once whatever its clock.

The users of the annotation app live in :mod:`phenocascade.store.users`.

Store functions are keyword-only, take an explicit session and return ``None`` (or an
empty list) when nothing is found. Times are timezone-aware UTC ``datetime`` objects.
Boxes are ``{"x_min", "y_min", "x_max", "y_max", "label", "score"}`` dicts in pixels,
``[x_min, x_max)`` half-open, as in the Avro ``Box`` record.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Collection, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from cassandra.cluster import Session
from cassandra.concurrent import execute_concurrent_with_args

from phenocascade.errors import ConflictError
from phenocascade.store.cql import add_missing_columns, prepare, qualified

TASK_OPEN = "open"
TASK_CLAIMED = "claimed"
TASK_DONE = "done"
TASK_SUPERSEDED = "superseded"
_CLOSED = (TASK_DONE, TASK_SUPERSEDED)
DEFAULT_CLAIM_S = 15 * 60

# Columns added after the tables were first made (see add_missing_columns).
_ADDED_COLUMNS = (
    ("annotation_tasks", "ask", "list<text>"),
    ("annotation_tasks", "superseded_by", "text"),
)

# Annotation rows read per page when a listing is filtered by study, and the most read in
# all before it stops (a reviewer granted a rare study gets what the newest rows hold).
_STUDY_SCAN_PAGE = 200
STUDY_SCAN_LIMIT = 5000

# One tiny partition: the list of (tier, study) queue partitions (a few dozen rows).
_PARTITIONS_BUCKET = "all"

_TABLES = (
    """
    CREATE TABLE IF NOT EXISTS {ks}.annotation_tasks (
        image_id text,
        tier text,
        status text,
        revision int,
        claimed_by text,
        claim_expires_at timestamp,
        priority double,
        scores map<text, double>,
        boxes text,
        classes list<text>,
        model_name text,
        model_version text,
        study text,
        uri text,
        inline blob,
        submitted blob,
        created_at timestamp,
        completed_by text,
        completed_at timestamp,
        annotation_id text,
        ask list<text>,
        superseded_by text,
        PRIMARY KEY ((image_id), tier)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS {ks}.annotation_queue (
        tier text,
        study text,
        priority double,
        created_at timestamp,
        image_id text,
        claimed_by text,
        claim_expires_at timestamp,
        model_version text,
        PRIMARY KEY ((tier, study), priority, created_at, image_id)
    ) WITH CLUSTERING ORDER BY (priority DESC, created_at ASC, image_id ASC)
    """,
    """
    CREATE TABLE IF NOT EXISTS {ks}.annotation_queue_partitions (
        bucket text,
        tier text,
        study text,
        PRIMARY KEY ((bucket), tier, study)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS {ks}.annotations_by_tier (
        tier text,
        created_at timestamp,
        annotation_id text,
        image_id text,
        annotator text,
        labels list<text>,
        boxes text,
        uri text,
        model_version text,
        PRIMARY KEY ((tier), created_at, annotation_id)
    ) WITH CLUSTERING ORDER BY (created_at ASC, annotation_id ASC)
    """,
    """
    CREATE TABLE IF NOT EXISTS {ks}.annotations_by_image (
        image_id text,
        tier text,
        created_at timestamp,
        annotation_id text,
        annotator text,
        labels list<text>,
        boxes text,
        uri text,
        model_version text,
        PRIMARY KEY ((image_id), tier, created_at, annotation_id)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS {ks}.annotation_ids (
        annotation_id text PRIMARY KEY,
        tier text,
        image_id text,
        created_at timestamp
    )
    """,
)


def create_tables(session: Session) -> None:
    """Create this module's tables in the session's keyspace (idempotent)."""
    for ddl in _TABLES:
        session.execute(qualified(session, ddl))
    add_missing_columns(session, _ADDED_COLUMNS)


def _utc(value: datetime | int | None) -> datetime | None:
    """Return an aware UTC datetime from a driver value (naive UTC) or epoch milliseconds."""
    if value is None:
        return None
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, tz=UTC)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _now(now: datetime | None) -> datetime:
    return datetime.now(tz=UTC) if now is None else now.astimezone(UTC)


def _claim_is_live(claimed_by: str | None, expires: datetime | None, now: datetime) -> bool:
    return claimed_by is not None and expires is not None and expires > now


# -- tasks ---------------------------------------------------------------------------------
def _row_to_task(row: Any) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "tier": row.tier,
        "status": row.status,
        "revision": row.revision,
        "claimed_by": row.claimed_by,
        "claim_expires_at": _utc(row.claim_expires_at),
        "priority": row.priority,
        "scores": dict(row.scores or {}),
        "boxes": json.loads(row.boxes or "[]"),
        "classes": list(row.classes or []),
        "model_name": row.model_name or "",
        "model_version": row.model_version or "",
        "study": row.study or "",
        "uri": row.uri,
        "inline": row.inline,
        "submitted": row.submitted or b"",
        "created_at": _utc(row.created_at),
        "completed_by": row.completed_by,
        "completed_at": _utc(row.completed_at),
        "annotation_id": row.annotation_id,
        "ask": list(row.ask or []),
        "superseded_by": row.superseded_by,
    }


def _write_queue_entry(session: Session, task: Mapping[str, Any]) -> None:
    session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.annotation_queue (tier, study, priority, created_at, image_id, "
            "claimed_by, claim_expires_at, model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ),
        (
            task["tier"],
            task["study"],
            task["priority"],
            task["created_at"],
            task["image_id"],
            task["claimed_by"],
            task["claim_expires_at"],
            task["model_version"],
        ),
    )
    session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.annotation_queue_partitions (bucket, tier, study) VALUES (?, ?, ?)",
        ),
        (_PARTITIONS_BUCKET, task["tier"], task["study"]),
    )


def _delete_queue_entry(session: Session, task: Mapping[str, Any]) -> None:
    session.execute(
        prepare(
            session,
            "DELETE FROM {ks}.annotation_queue WHERE tier = ? AND study = ? AND priority = ? "
            "AND created_at = ? AND image_id = ?",
        ),
        (task["tier"], task["study"], task["priority"], task["created_at"], task["image_id"]),
    )


# The columns of a task that its request sets (what was asked, by which model, of what).
_ASKED = (
    "priority",
    "scores",
    "boxes",
    "classes",
    "model_name",
    "model_version",
    "study",
    "uri",
    "inline",
    "submitted",
    "created_at",
    "ask",
)


def _asked(task: Mapping[str, Any]) -> tuple[Any, ...]:
    """Return the values of :data:`_ASKED` of ``task``, as bound in CQL."""
    return tuple(json.dumps(task[c]) if c == "boxes" else task[c] for c in _ASKED)


def add_task(*, session: Session, request: Mapping[str, Any]) -> bool:
    """Create the task of one ``AnnotationRequest`` unless ``(image_id, tier)`` has one.

    A repeated request neither duplicates nor reopens a task; it only re-writes the queue
    entry of a task that is not closed, which repairs a queue write lost in a crash. A
    newer request from another model (a promoted one re-scored the image) renews the
    task instead: an unanswered task takes the request's scores, boxes, labels asked,
    priority, model and time (a claim on it stays), and a superseded task opens again
    with them. A done task is never touched.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    request : Mapping
        A decoded ``AnnotationRequest`` record (``created_at`` as datetime or epoch ms).

    Returns
    -------
    bool
        ``True`` if this call created the task or opened a superseded one again.
    """
    task = {
        "image_id": request["image_id"],
        "tier": request["tier"],
        "status": TASK_OPEN,
        "revision": 0,
        "claimed_by": None,
        "claim_expires_at": None,
        "priority": float(request["priority"]),
        "scores": {k: float(v) for k, v in request["scores"].items()},
        "boxes": [dict(b) for b in request["boxes"]],
        "classes": list(request["classes"]),
        "ask": list(request.get("ask") or []),
        "model_name": request["model_name"],
        "model_version": request["model_version"],
        "study": request["study"],
        "uri": request["uri"],
        "inline": request["inline"],
        "submitted": request["submitted"],
        "created_at": _utc(request["created_at"]),
    }
    result = session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.annotation_tasks (image_id, tier, status, revision, "
            f"{', '.join(_ASKED)}) VALUES (?, ?, ?, ?{', ?' * len(_ASKED)}) IF NOT EXISTS",
        ),
        (task["image_id"], task["tier"], task["status"], task["revision"], *_asked(task)),
    )
    if result.was_applied:
        _write_queue_entry(session, task)
        return True
    existing = get_task(session=session, image_id=task["image_id"], tier=task["tier"])
    if existing is None or existing["status"] == TASK_DONE:
        return False
    if existing["status"] == TASK_SUPERSEDED:
        return task["created_at"] > existing["completed_at"] and _renew(session, existing, task)
    if task["model_version"] != existing["model_version"] and (
        task["created_at"] > existing["created_at"]
    ):
        _renew(session, existing, task)
    else:
        _write_queue_entry(session, existing)
    return False


def _renew(session: Session, existing: Mapping[str, Any], task: dict[str, Any]) -> bool:
    """Give a task a newer request's fields (reopening a superseded one); whether it took.

    An unanswered task keeps its status and claim; a superseded one opens, unclaimed. The
    change is a compare-and-set on the revision, and the queue entry moves with it.
    """
    if existing["status"] != TASK_SUPERSEDED:
        task.update(
            status=existing["status"],
            claimed_by=existing["claimed_by"],
            claim_expires_at=existing["claim_expires_at"],
        )
    task["revision"] = existing["revision"] + 1
    result = session.execute(
        prepare(
            session,
            "UPDATE {ks}.annotation_tasks SET status = ?, revision = ?, claimed_by = ?, "
            f"claim_expires_at = ?, {' = ?, '.join(_ASKED)} = ?, completed_at = null, "
            "superseded_by = null WHERE image_id = ? AND tier = ? IF revision = ?",
        ),
        (
            task["status"],
            task["revision"],
            task["claimed_by"],
            task["claim_expires_at"],
            *_asked(task),
            task["image_id"],
            task["tier"],
            existing["revision"],
        ),
    )
    if not result.was_applied:
        return False
    if existing["status"] != TASK_SUPERSEDED:
        _delete_queue_entry(session, existing)
    _write_queue_entry(session, task)
    return True


def get_task(*, session: Session, image_id: str, tier: str) -> dict[str, Any] | None:
    """Return the task of ``(image_id, tier)``, or ``None`` if there is none.

    Returns
    -------
    dict or None
        Keys: ``image_id, tier, status ("open" | "claimed" | "done" | "superseded"),
        revision, claimed_by, claim_expires_at, priority, scores, boxes, classes, ask (the
        labels asked; empty: all), model_name, model_version, study, uri, inline,
        submitted, created_at, completed_by, completed_at (when it was done or
        superseded), annotation_id, superseded_by`` (the model version that decides the
        image now, for a superseded task). A ``"claimed"`` task whose ``claim_expires_at`` has
        passed is claimable again (see :func:`is_claimable`).
    """
    row = session.execute(
        prepare(
            session,
            "SELECT * FROM {ks}.annotation_tasks WHERE image_id = ? AND tier = ?",
        ),
        (image_id, tier),
    ).one()
    return None if row is None else _row_to_task(row)


def is_claimable(task: Mapping[str, Any], *, user: str, now: datetime | None = None) -> bool:
    """Whether ``user`` may claim (or save) ``task`` now.

    True for an open task, an expired claim, or ``user``'s own claim; false for a done or
    superseded task or another user's live claim.
    """
    if task["status"] in _CLOSED:
        return False
    if task["claimed_by"] == user:
        return True
    return not _claim_is_live(task["claimed_by"], task["claim_expires_at"], _now(now))


def list_open_tasks(
    *,
    session: Session,
    tier: str | None = None,
    study: str | None = None,
    studies: Collection[str] | None = None,
    min_priority: float | None = None,
    limit: int = 100,
    user: str | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Return the tasks waiting for an annotator, most uncertain first, then oldest first.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    tier, study : str or None, default None
        Only this tier / study; ``None`` for all.
    studies : Collection of str or None, default None
        Only tasks of these studies (a user's access); ``None`` for all, empty for none.
        The queue partitions of other studies are never read.
    min_priority : float or None, default None
        Only tasks with ``priority >= min_priority``.
    limit : int, default 100
        Most tasks returned.
    user : str or None, default None
        Also list the tasks this user has claimed; other users' live claims are always
        left out, and expired claims count as open.
    now : datetime or None, default None
        The time claims are judged at (``None``: the current time).

    Returns
    -------
    list of dict
        ``{tier, study, priority, created_at, image_id, claimed_by, claim_expires_at,
        model_version}`` in serving order: ``priority`` descending, then ``created_at``
        ascending, then ``image_id``.
    """
    at = _now(now)
    waiting = (
        e
        for e in _queue(session, tier=tier, study=study, studies=studies, min_priority=min_priority)
        if e["claimed_by"] == user or not _claim_is_live(e["claimed_by"], e["claim_expires_at"], at)
    )
    return list(itertools.islice(waiting, limit))


def unanswered_tasks(*, session: Session, tier: str) -> list[dict[str, Any]]:
    """Return every task of ``tier`` that is neither done nor superseded, claimed ones too.

    Returns
    -------
    list of dict
        As :func:`list_open_tasks` gives them, in serving order.
    """
    return list(_queue(session, tier=tier))


def _queue(
    session: Session,
    *,
    tier: str | None = None,
    study: str | None = None,
    studies: Collection[str] | None = None,
    min_priority: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield the queue entries (tasks not closed) in serving order, whoever claimed them."""
    partitions = [
        (r.tier, r.study)
        for r in session.execute(
            prepare(
                session,
                "SELECT tier, study FROM {ks}.annotation_queue_partitions WHERE bucket = ?",
            ),
            (_PARTITIONS_BUCKET,),
        )
        if (tier is None or r.tier == tier)
        and (study is None or r.study == study)
        and (studies is None or r.study in studies)
    ]
    select = (
        "SELECT tier, study, priority, created_at, image_id, claimed_by, claim_expires_at, "
        "model_version FROM {ks}.annotation_queue WHERE tier = ? AND study = ?"
    )

    def entries(part: tuple[str, str]) -> Iterator[dict[str, Any]]:
        if min_priority is None:
            rows = session.execute(prepare(session, select), part)
        else:
            rows = session.execute(
                prepare(session, select + " AND priority >= ?"), (*part, min_priority)
            )
        for r in rows:
            yield {
                "tier": r.tier,
                "study": r.study,
                "priority": r.priority,
                "created_at": _utc(r.created_at),
                "image_id": r.image_id,
                "claimed_by": r.claimed_by,
                "claim_expires_at": _utc(r.claim_expires_at),
                "model_version": r.model_version or "",
            }

    return heapq.merge(
        *(entries(p) for p in partitions),
        key=lambda e: (-e["priority"], e["created_at"], e["image_id"]),
    )


def claim_task(
    *,
    session: Session,
    image_id: str,
    tier: str,
    user: str,
    claim_s: float = DEFAULT_CLAIM_S,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """Claim a task for ``user`` for ``claim_s`` seconds (or extend ``user``'s own claim).

    The claim is a compare-and-set on the task's revision (a lightweight transaction), so
    of two annotators claiming at once exactly one wins.

    Returns
    -------
    dict or None
        The claimed task (as :func:`get_task`), or ``None`` if there is no such task.

    Raises
    ------
    ConflictError
        If the task is done, or another user holds a live claim on it.
    """
    at = _now(now)
    task = get_task(session=session, image_id=image_id, tier=tier)
    if task is None:
        return None
    _check_claimable(task, user=user, now=at)
    expires = at + timedelta(seconds=claim_s)
    result = session.execute(
        prepare(
            session,
            "UPDATE {ks}.annotation_tasks SET status = ?, claimed_by = ?, claim_expires_at = ?, "
            "revision = ? WHERE image_id = ? AND tier = ? IF revision = ?",
        ),
        (TASK_CLAIMED, user, expires, task["revision"] + 1, image_id, tier, task["revision"]),
    )
    if not result.was_applied:
        raise ConflictError(
            f"task {tier}/{image_id} changed while {user} claimed it (someone else claimed or "
            "completed it); reload the queue"
        )
    task.update(
        status=TASK_CLAIMED,
        claimed_by=user,
        claim_expires_at=expires,
        revision=task["revision"] + 1,
    )
    _write_queue_entry(session, task)
    return task


def _check_claimable(task: Mapping[str, Any], *, user: str, now: datetime) -> None:
    where = f"task {task['tier']}/{task['image_id']}"
    if task["status"] == TASK_DONE:
        raise ConflictError(f"{where} is already done (by {task['completed_by']}); pick another")
    if task["status"] == TASK_SUPERSEDED:
        raise ConflictError(
            f"{where} was withdrawn: model {task['superseded_by']} now decides this image "
            "without an expert; pick another"
        )
    if not is_claimable(task, user=user, now=now):
        raise ConflictError(
            f"{where} is claimed by {task['claimed_by']} until "
            f"{task['claim_expires_at']:%Y-%m-%d %H:%M:%S} UTC; pick another task"
        )


def complete_task(
    *,
    session: Session,
    image_id: str,
    tier: str,
    user: str,
    annotation_id: str,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """Mark a task done by ``user`` with the annotation ``annotation_id``.

    ``user`` must be able to claim it (open, expired claim, or their own claim); the change
    is a compare-and-set on the revision. The task leaves the queue.

    Returns
    -------
    dict or None
        The completed task, or ``None`` if there is no such task.

    Raises
    ------
    ConflictError
        If the task is done already, or another user holds a live claim on it.
    """
    at = _now(now)
    task = get_task(session=session, image_id=image_id, tier=tier)
    if task is None:
        return None
    _check_claimable(task, user=user, now=at)
    result = session.execute(
        prepare(
            session,
            "UPDATE {ks}.annotation_tasks SET status = ?, completed_by = ?, completed_at = ?, "
            "annotation_id = ?, revision = ? WHERE image_id = ? AND tier = ? IF revision = ?",
        ),
        (
            TASK_DONE,
            user,
            at,
            annotation_id,
            task["revision"] + 1,
            image_id,
            tier,
            task["revision"],
        ),
    )
    if not result.was_applied:
        raise ConflictError(
            f"task {tier}/{image_id} changed while {user} completed it; reload the queue"
        )
    _delete_queue_entry(session, task)
    task.update(
        status=TASK_DONE,
        completed_by=user,
        completed_at=at,
        annotation_id=annotation_id,
        revision=task["revision"] + 1,
    )
    return task


def supersede_task(
    *,
    session: Session,
    image_id: str,
    tier: str,
    model_version: str,
    now: datetime | None = None,
) -> dict[str, Any] | None:
    """Withdraw a task no expert answered: model ``model_version`` decides the image itself.

    The task leaves the queue and ends ``superseded``; an expert who then tries to claim
    or save it is told why. A task an expert holds a live claim on is left to them (their
    answer still counts), and so is one done or superseded already. The change is a
    compare-and-set on the revision, so of an expert's answer and this at most one wins.

    Returns
    -------
    dict or None
        The superseded task, or ``None`` if it was left as it is (or there is none).
    """
    at = _now(now)
    task = get_task(session=session, image_id=image_id, tier=tier)
    if (
        task is None
        or task["status"] in _CLOSED
        or _claim_is_live(task["claimed_by"], task["claim_expires_at"], at)
    ):
        return None
    revision = task["revision"]
    result = session.execute(
        prepare(
            session,
            "UPDATE {ks}.annotation_tasks SET status = ?, superseded_by = ?, completed_at = ?, "
            "revision = ? WHERE image_id = ? AND tier = ? IF revision = ?",
        ),
        (TASK_SUPERSEDED, model_version, at, revision + 1, image_id, tier, revision),
    )
    if not result.was_applied:
        return None
    _delete_queue_entry(session, task)
    task.update(
        status=TASK_SUPERSEDED,
        superseded_by=model_version,
        completed_at=at,
        revision=revision + 1,
    )
    return task


# -- annotations ---------------------------------------------------------------------------
def save_annotation(*, session: Session, annotation: Mapping[str, Any]) -> bool:
    """Store one ``Annotation`` record in both annotation tables (idempotent per id).

    The first write of an id claims it in ``annotation_ids`` (a lightweight transaction)
    with its ``tier`` and ``created_at``. A later write of the same id (a replay, or a
    producer re-sending with a new ``created_at``) goes to that first key, so it never
    becomes a second label; it also repairs a row a crash left out.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    annotation : Mapping
        An ``Annotation`` record: ``annotation_id, image_id, tier, annotator, labels, boxes,
        uri, model_version, created_at`` (datetime or epoch ms).

    Returns
    -------
    bool
        ``True`` if this call stored the id for the first time.
    """
    tier, image_id = annotation["tier"], annotation["image_id"]
    created = _utc(annotation["created_at"])
    claim = session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.annotation_ids (annotation_id, tier, image_id, created_at) "
            "VALUES (?, ?, ?, ?) IF NOT EXISTS",
        ),
        (annotation["annotation_id"], tier, image_id, created),
    )
    first = bool(claim.was_applied)
    if not first:
        existing = claim.one()
        tier, image_id, created = existing.tier, existing.image_id, _utc(existing.created_at)
    boxes = json.dumps([dict(b) for b in annotation["boxes"]])
    labels = list(annotation["labels"])
    for table in ("annotations_by_tier", "annotations_by_image"):
        session.execute(
            prepare(
                session,
                f"INSERT INTO {{ks}}.{table} (tier, created_at, annotation_id, image_id, "
                "annotator, labels, boxes, uri, model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ),
            (
                tier,
                created,
                annotation["annotation_id"],
                image_id,
                annotation["annotator"],
                labels,
                boxes,
                annotation["uri"],
                annotation["model_version"],
            ),
        )
    return first


def _row_to_annotation(row: Any) -> dict[str, Any]:
    return {
        "annotation_id": row.annotation_id,
        "image_id": row.image_id,
        "tier": row.tier,
        "annotator": row.annotator,
        "labels": list(row.labels or []),
        "boxes": json.loads(row.boxes or "[]"),
        "uri": row.uri,
        "model_version": row.model_version or "",
        "created_at": _utc(row.created_at),
    }


def annotations_by_tier(
    *,
    session: Session,
    tier: str,
    since: datetime | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Return the annotations of ``tier``, oldest first (the retraining feed).

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    tier : str
        Tier name, e.g. ``"quality"``.
    since : datetime or None, default None
        Only annotations created strictly after this time.
    limit : int or None, default None
        Most annotations returned (the oldest ones).

    Returns
    -------
    list of dict
        ``Annotation``-shaped records; ``created_at`` is an aware UTC datetime.
    """
    cql = "SELECT * FROM {ks}.annotations_by_tier WHERE tier = ?"
    params: list[Any] = [tier]
    if since is not None:
        cql += " AND created_at > ?"
        params.append(since)
    rows = session.execute(prepare(session, cql), params)
    found = (_row_to_annotation(r) for r in rows)
    return list(found if limit is None else itertools.islice(found, limit))


def task_studies(
    *, session: Session, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """Return the study of each ``(image_id, tier)`` task, reading the tasks concurrently.

    Returns
    -------
    dict
        ``(image_id, tier) -> study``; a key without a task is absent.
    """
    unique = list(dict.fromkeys(keys))
    statement = prepare(
        session, "SELECT study FROM {ks}.annotation_tasks WHERE image_id = ? AND tier = ?"
    )
    results = execute_concurrent_with_args(
        session, statement, unique, concurrency=32, raise_on_first_error=True
    )
    found: dict[tuple[str, str], str] = {}
    for key, (_, rows) in zip(unique, results, strict=True):
        row = rows.one()
        if row is not None:
            found[key] = row.study or ""
    return found


def _of_studies(
    session: Session, annotations: Iterable[dict[str, Any]], studies: Collection[str]
) -> Iterator[dict[str, Any]]:
    """Yield the annotations whose task is of one of ``studies``, a page of tasks at a time.

    An annotation without a task (imported with a dataset) has no study and is left out.
    """
    remaining = iter(annotations)
    while page := list(itertools.islice(remaining, _STUDY_SCAN_PAGE)):
        study_of = task_studies(session=session, keys=((a["image_id"], a["tier"]) for a in page))
        for annotation in page:
            study = study_of.get((annotation["image_id"], annotation["tier"]))
            if study is not None and study in studies:
                yield annotation


def recent_annotations(
    *,
    session: Session,
    tier: str,
    limit: int = 100,
    studies: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Return the ``limit`` newest annotations of ``tier``, newest first (review).

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    tier : str
        Tier name.
    limit : int, default 100
        Most annotations returned.
    studies : Collection of str or None, default None
        Only annotations whose task is of one of these studies (a user's access); ``None``
        for all, empty for none. An annotation without a task has no study and is left out.
        Only the :data:`STUDY_SCAN_LIMIT` newest annotations of the tier are looked at.
    """
    select = (
        "SELECT * FROM {ks}.annotations_by_tier WHERE tier = ? "
        "ORDER BY created_at DESC, annotation_id DESC LIMIT ?"
    )
    if studies is None:
        rows = session.execute(prepare(session, select), (tier, limit))
        return [_row_to_annotation(r) for r in rows]
    if not studies:
        return []
    bound = prepare(session, select).bind((tier, STUDY_SCAN_LIMIT))
    bound.fetch_size = _STUDY_SCAN_PAGE  # pages are read only as far as they are needed
    newest = (_row_to_annotation(r) for r in session.execute(bound))
    return list(itertools.islice(_of_studies(session, newest, studies), limit))


def annotations_for_image(
    *, session: Session, image_id: str, studies: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """Return every annotation of ``image_id`` (all tiers), by tier then oldest first.

    ``studies`` filters as in :func:`recent_annotations` (``None``: all).
    """
    if studies is not None and not studies:
        return []
    rows = session.execute(
        prepare(session, "SELECT * FROM {ks}.annotations_by_image WHERE image_id = ?"), (image_id,)
    )
    found = [_row_to_annotation(r) for r in rows]
    return found if studies is None else list(_of_studies(session, found, studies))
