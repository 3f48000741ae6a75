"""Cassandra repository of the annotation app's recent failed logins (the login throttle's state).

One table, ``login_failures``: one row per login attempt that counts as failed, in one
partition per ``(scope, name)``, where ``scope`` is ``"user"`` (``name``: a user name) or
``"client"`` (``name``: a client address). The clustering key is a ``timeuuid`` holding
when the attempt was made, newest first, so the newest ``n`` failures of a key are one
bounded read of one partition. Every row is written ``USING TTL`` the throttle's window:
Cassandra forgets a failure on its own once it can no longer count, whatever process wrote
it, and no sweep is needed.

Rows are only inserted and deleted, never updated, so writers on several app replicas never
overwrite each other (no read-modify-write, no counter, no lightweight transaction). Every
statement runs at ``LOCAL_QUORUM``, so a read sees every write completed before it, from
any app replica, on any number of Cassandra nodes (the throttle relies on it).

Store functions are keyword-only and take an explicit session. Times are seconds since the
Unix epoch (``time.time()``), as floats.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from cassandra import ConsistencyLevel
from cassandra.cluster import ResultSet, Session
from cassandra.util import unix_time_from_uuid1, uuid_from_time

from phenocascade.store.cql import prepare, qualified

# The rows live minutes; the tombstones of their expiry and of deletes need not be kept the
# default 10 days. 3 h is Cassandra's default hint window, so a replica that was down that
# long still receives the deletes it missed.
_TABLE = """
    CREATE TABLE IF NOT EXISTS {ks}.login_failures (
        scope text,
        name text,
        attempt timeuuid,
        PRIMARY KEY ((scope, name), attempt)
    ) WITH CLUSTERING ORDER BY (attempt DESC) AND gc_grace_seconds = 10800
"""


def create_tables(session: Session) -> None:
    """Create the ``login_failures`` table in the session's keyspace (idempotent)."""
    session.execute(qualified(session, _TABLE))


def _run(session: Session, statement: str, values: Sequence[Any]) -> ResultSet:
    bound = prepare(session, statement).bind(values)
    bound.consistency_level = ConsistencyLevel.LOCAL_QUORUM
    return session.execute(bound)


def add_login_failure(
    *, session: Session, scope: str, name: str, at: float, ttl_s: int
) -> uuid.UUID:
    """Record one failed login of ``(scope, name)``; it expires after ``ttl_s`` seconds.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    scope : str
        ``"user"`` or ``"client"``.
    name : str
        The user name or the client address.
    at : float
        When the attempt was made, in seconds since the Unix epoch.
    ttl_s : int
        Seconds the row lives (at least 1).

    Returns
    -------
    uuid.UUID
        The failure's id (a time-based UUID of ``at`` with random low bits), for
        :func:`delete_login_failure`.
    """
    attempt = uuid_from_time(at)
    _run(
        session,
        "INSERT INTO {ks}.login_failures (scope, name, attempt) VALUES (?, ?, ?) USING TTL ?",
        (scope, name, attempt, ttl_s),
    )
    return attempt


def recent_login_failures(
    *, session: Session, scope: str, name: str, limit: int
) -> list[tuple[uuid.UUID, float]]:
    """Return the ``limit`` newest unexpired failures of ``(scope, name)``, newest first.

    Returns
    -------
    list of (uuid.UUID, float)
        Each failure's id and when it was made (seconds since the Unix epoch).
    """
    rows = _run(
        session,
        "SELECT attempt FROM {ks}.login_failures WHERE scope = ? AND name = ? LIMIT ?",
        (scope, name, limit),
    )
    return [(r.attempt, unix_time_from_uuid1(r.attempt)) for r in rows]


def delete_login_failure(*, session: Session, scope: str, name: str, attempt: uuid.UUID) -> None:
    """Delete one failure of ``(scope, name)`` (nothing happens if it already expired)."""
    _run(
        session,
        "DELETE FROM {ks}.login_failures WHERE scope = ? AND name = ? AND attempt = ?",
        (scope, name, attempt),
    )


def clear_login_failures(*, session: Session, scope: str, name: str) -> None:
    """Delete every failure of ``(scope, name)``."""
    _run(session, "DELETE FROM {ks}.login_failures WHERE scope = ? AND name = ?", (scope, name))
