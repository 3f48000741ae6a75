"""Cassandra repository of the annotation app's users and the studies each may access.

One table, ``users``: username -> bcrypt hash, role, session epoch, the set of studies
granted (``studies``) and whether every study is (``all_studies``). Access lives in the
user's row, so the read that authenticates a request also authorises it, and a deleted
user's grants go with the row (a new user of the same name inherits nothing).

Store functions are keyword-only, take an explicit session and return ``None`` (or an empty
list) when nothing is found. Times are timezone-aware UTC ``datetime`` objects.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from cassandra.cluster import Session

from phenocascade.errors import ValidationError
from phenocascade.store.cql import add_missing_columns, prepare, qualified

ROLES = ("annotator", "reviewer", "admin")

# Columns added after the table was first made (see add_missing_columns).
_ADDED_COLUMNS = (
    ("users", "session_epoch", "text"),
    ("users", "studies", "set<text>"),
    ("users", "all_studies", "boolean"),
)

_TABLE = """
    CREATE TABLE IF NOT EXISTS {ks}.users (
        username text PRIMARY KEY,
        password_hash text,
        role text,
        created_at timestamp,
        session_epoch text,
        studies set<text>,
        all_studies boolean
    )
"""


def create_tables(session: Session) -> None:
    """Create the ``users`` table in the session's keyspace (idempotent)."""
    session.execute(qualified(session, _TABLE))
    add_missing_columns(session, _ADDED_COLUMNS)


def _utc(value: datetime | None) -> datetime | None:
    """Return an aware UTC datetime from a driver value (naive UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def add_user(
    *,
    session: Session,
    username: str,
    password_hash: str,
    role: str,
    studies: Collection[str] = (),
    all_studies: bool = False,
) -> bool:
    """Create a user unless the name is taken.

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    username : str
        Login name.
    password_hash : str
        A bcrypt hash (never the password itself).
    role : str
        One of :data:`ROLES`.
    studies : Collection of str, default ()
        Studies the user may access (an admin may access every study whatever this holds).
    all_studies : bool, default False
        Whether the user may access every study, present and future.

    Returns
    -------
    bool
        ``True`` if the user was created, ``False`` if the name already existed.
    """
    result = session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.users (username, password_hash, role, created_at, session_epoch, "
            "studies, all_studies) VALUES (?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
        ),
        (
            username,
            password_hash,
            role,
            datetime.now(tz=UTC),
            _new_epoch(),
            set(studies),
            all_studies,
        ),
    )
    return bool(result.was_applied)


def _new_epoch() -> str:
    return secrets.token_urlsafe(16)


def update_user(
    *,
    session: Session,
    username: str,
    password_hash: str | None = None,
    role: str | None = None,
) -> str | None:
    """Change a user's password and/or role, and end every session of theirs.

    Every call draws a new session epoch (a random token a session cookie must carry to be
    accepted), so the sessions started before it are refused from then on; with neither a
    password nor a role it only does that (logout).

    Returns
    -------
    str or None
        The new epoch, or ``None`` if there is no such user.
    """
    epoch = _new_epoch()
    sets = ["session_epoch = ?"]
    values: list[Any] = [epoch]
    if password_hash is not None:
        sets.append("password_hash = ?")
        values.append(password_hash)
    if role is not None:
        sets.append("role = ?")
        values.append(role)
    statement = f"UPDATE {{ks}}.users SET {', '.join(sets)} WHERE username = ? IF EXISTS"
    result = session.execute(prepare(session, statement), (*values, username))
    return epoch if result.was_applied else None


def change_user_studies(
    *,
    session: Session,
    username: str,
    grant: Collection[str] = (),
    revoke: Collection[str] = (),
    all_studies: bool | None = None,
) -> bool:
    """Grant and revoke studies of a user in one write; their sessions go on.

    Access is read from the user's row at every request, so a change applies to the next
    request of every session without ending any. Granting adds to the studies held and
    revoking removes from them (set operations, so two admins changing different studies
    at once both win).

    Parameters
    ----------
    session : cassandra.cluster.Session
        Session bound to the phenocascade keyspace.
    username : str
        The user.
    grant, revoke : Collection of str, default ()
        Studies to add and to remove; they must not share a study.
    all_studies : bool or None, default None
        ``True``: every study, present and future; ``False``: only the studies held;
        ``None``: unchanged. The studies held are kept either way.

    Returns
    -------
    bool
        ``False`` if there is no such user (nothing written).

    Raises
    ------
    ValidationError
        If ``grant`` and ``revoke`` share a study (nothing written).
    """
    both = set(grant) & set(revoke)
    if both:
        raise ValidationError(
            f"studies {sorted(both)} are both granted and revoked; name each in one list only"
        )
    sets = ["studies = studies + ?", "studies = studies - ?"]
    values: list[Any] = [set(grant), set(revoke)]
    if all_studies is not None:
        sets.append("all_studies = ?")
        values.append(all_studies)
    statement = f"UPDATE {{ks}}.users SET {', '.join(sets)} WHERE username = ? IF EXISTS"
    result = session.execute(prepare(session, statement), (*values, username))
    return bool(result.was_applied)


def get_user(*, session: Session, username: str) -> dict[str, Any] | None:
    """Return a user, or ``None`` if the user is unknown.

    Returns
    -------
    dict or None
        ``{username, password_hash, role, created_at, session_epoch, studies,
        all_studies}``. ``session_epoch`` is ``None`` for a user made before session epochs
        (the next login draws one); ``studies`` is a sorted list (empty for a user made
        before per-study access: no grant).
    """
    row = session.execute(
        prepare(session, "SELECT * FROM {ks}.users WHERE username = ?"), (username,)
    ).one()
    if row is None:
        return None
    return {
        "username": row.username,
        "password_hash": row.password_hash,
        "role": row.role,
        "created_at": _utc(row.created_at),
        "session_epoch": row.session_epoch,
        "studies": sorted(row.studies or ()),
        "all_studies": bool(row.all_studies),
    }


def list_users(*, session: Session) -> list[dict[str, Any]]:
    """Return ``{username, role, created_at, studies, all_studies}`` of every user, by name."""
    rows = session.execute(
        qualified(
            session, "SELECT username, role, created_at, studies, all_studies FROM {ks}.users"
        )
    )
    return sorted(
        (
            {
                "username": r.username,
                "role": r.role,
                "created_at": _utc(r.created_at),
                "studies": sorted(r.studies or ()),
                "all_studies": bool(r.all_studies),
            }
            for r in rows
        ),
        key=lambda u: u["username"],
    )


def delete_user(*, session: Session, username: str) -> bool:
    """Delete a user; return ``False`` if there was none."""
    result = session.execute(
        prepare(session, "DELETE FROM {ks}.users WHERE username = ? IF EXISTS"), (username,)
    )
    return bool(result.was_applied)
