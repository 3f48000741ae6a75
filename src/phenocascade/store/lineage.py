"""Cassandra repository of model lineage: where each trained version came from.

A record says which champion a challenger challenged, which annotations trained it, how
both scored on the fixed holdout and whether it was promoted.

Tables are designed around the queries they serve:

* ``model_lineage``: one row per trained version, read by version ("where did this model
  come from?");
* ``model_lineage_by_tier``: the same records partitioned by tier, clustered newest first,
  read by tier ("what did retraining do lately?", and the retrainer's "which annotations
  has the last attempt already considered?").

Store functions are keyword-only, take an explicit session and return ``None`` (or an
empty list) when nothing is found. Times are timezone-aware UTC ``datetime`` objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cassandra.cluster import Session

from phenocascade.store.cql import prepare, qualified

PROMOTED = "promoted"
REJECTED = "rejected"
FAILED = "failed"
DECISIONS = (PROMOTED, REJECTED, FAILED)

_COLUMNS = """
        tier text,
        version text,
        parent_version text,
        decision text,
        reason text,
        trigger text,
        metric text,
        metrics map<text, double>,
        parent_metrics map<text, double>,
        annotation_ids list<text>,
        excluded map<text, text>,
        started_at timestamp,
        finished_at timestamp,
"""

_TABLES = (
    f"""
    CREATE TABLE IF NOT EXISTS {{ks}}.model_lineage (
        {_COLUMNS}
        PRIMARY KEY ((version))
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {{ks}}.model_lineage_by_tier (
        {_COLUMNS}
        PRIMARY KEY ((tier), finished_at, version)
    ) WITH CLUSTERING ORDER BY (finished_at DESC, version ASC)
    """,
)

_FIELDS = (
    "tier",
    "version",
    "parent_version",
    "decision",
    "reason",
    "trigger",
    "metric",
    "metrics",
    "parent_metrics",
    "annotation_ids",
    "excluded",
    "started_at",
    "finished_at",
)


def create_tables(session: Session) -> None:
    """Create this module's tables in the session's keyspace (idempotent)."""
    for ddl in _TABLES:
        session.execute(qualified(session, ddl))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def save_lineage(*, session: Session, record: Mapping[str, Any]) -> None:
    """Upsert the lineage record of one trained version in both tables.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    record : Mapping
        ``tier`` (topology tier name), ``version``, ``parent_version`` (the champion it
        challenged, ``""`` if none), ``decision`` (one of :data:`DECISIONS`), ``reason``,
        ``trigger`` (``"count"`` or ``"manual"``), ``metric`` (the deciding metric's
        name), ``metrics`` and ``parent_metrics`` (``{name: value}`` on the fixed
        holdout), ``annotation_ids`` (the annotations it was trained on), ``excluded``
        (``{annotation_id: reason}`` for annotations left out), ``started_at`` and
        ``finished_at`` (aware datetimes).

    Raises
    ------
    ValueError
        If ``decision`` is not one of :data:`DECISIONS`.
    """
    if record["decision"] not in DECISIONS:
        raise ValueError(f"decision must be one of {DECISIONS}, got {record['decision']!r}")
    values = (
        record["tier"],
        record["version"],
        record["parent_version"],
        record["decision"],
        record["reason"],
        record["trigger"],
        record["metric"],
        {k: float(v) for k, v in record["metrics"].items()},
        {k: float(v) for k, v in record["parent_metrics"].items()},
        list(record["annotation_ids"]),
        dict(record["excluded"]),
        record["started_at"],
        record["finished_at"],
    )
    names = ", ".join(_FIELDS)
    marks = ", ".join("?" for _ in _FIELDS)
    for table in ("model_lineage", "model_lineage_by_tier"):
        session.execute(
            prepare(session, f"INSERT INTO {{ks}}.{table} ({names}) VALUES ({marks})"), values
        )


def _row_to_record(row: Any) -> dict[str, Any]:
    return {
        "tier": row.tier,
        "version": row.version,
        "parent_version": row.parent_version or "",
        "decision": row.decision,
        "reason": row.reason or "",
        "trigger": row.trigger or "",
        "metric": row.metric or "",
        "metrics": dict(row.metrics or {}),
        "parent_metrics": dict(row.parent_metrics or {}),
        "annotation_ids": list(row.annotation_ids or []),
        "excluded": dict(row.excluded or {}),
        "started_at": _utc(row.started_at),
        "finished_at": _utc(row.finished_at),
    }


def get_lineage(*, session: Session, version: str) -> dict[str, Any] | None:
    """Return the lineage record of ``version`` (keys as in :func:`save_lineage`), or ``None``."""
    row = session.execute(
        prepare(session, "SELECT * FROM {ks}.model_lineage WHERE version = ?"), (version,)
    ).one()
    return None if row is None else _row_to_record(row)


def lineage_by_tier(
    *, session: Session, tier: str, limit: int | None = None
) -> list[dict[str, Any]]:
    """Return the lineage records of ``tier``, newest (by ``finished_at``) first.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    tier : str
        Topology tier name.
    limit : int or None, default None
        Most records returned.
    """
    cql = "SELECT * FROM {ks}.model_lineage_by_tier WHERE tier = ?"
    params: tuple[Any, ...] = (tier,)
    if limit is not None:
        cql += " LIMIT ?"
        params = (tier, limit)
    return [_row_to_record(r) for r in session.execute(prepare(session, cql), params)]
