"""Fully qualified CQL: every statement names its keyspace, and no session runs ``USE``.

Cassandra warns at each prepare on a session that has a keyspace set (``USE <keyspace>``
with prepared statements is an anti-pattern: an unqualified table name is ambiguous).
Sessions from :func:`~phenocascade.store.cassandra.connect` therefore have none; store
statements write ``{ks}.<table>``, and :func:`qualified` fills in the keyspace the session was
connected for (:func:`bind_keyspace`).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence

from cassandra.cluster import Session
from cassandra.query import PreparedStatement

from phenocascade.errors import ConfigError

KEYSPACE = "{ks}"
# Unquoted CQL identifiers: letters, digits and underscores, at most 48 characters.
_KEYSPACE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")

_keyspaces: weakref.WeakKeyDictionary[Session, str] = weakref.WeakKeyDictionary()
_prepared: weakref.WeakKeyDictionary[Session, dict[str, PreparedStatement]] = (
    weakref.WeakKeyDictionary()
)


def check_keyspace(keyspace: str) -> str:
    """Return ``keyspace`` if it is a plain CQL identifier.

    Raises
    ------
    ConfigError
        If it is not (it is written into statements, never passed as a value).
    """
    if not _KEYSPACE_NAME.fullmatch(keyspace):
        raise ConfigError(
            f"Cassandra keyspace {keyspace!r} is not a plain name (a letter, then at most 47 "
            "letters, digits or underscores); fix PHENOCASCADE_CASSANDRA__KEYSPACE"
        )
    return keyspace


def bind_keyspace(session: Session, keyspace: str) -> None:
    """Make ``keyspace`` the one :func:`qualified` writes into ``session``'s statements."""
    _keyspaces[session] = check_keyspace(keyspace)
    _prepared.pop(session, None)


def qualified(session: Session, statement: str) -> str:
    """Return ``statement`` with ``{ks}`` replaced by ``session``'s keyspace.

    Raises
    ------
    ConfigError
        If ``session`` was not made by :func:`~phenocascade.store.cassandra.connect`.
    """
    keyspace = _keyspaces.get(session)
    if keyspace is None:
        raise ConfigError(
            "this Cassandra session has no phenocascade keyspace; "
            "make it with phenocascade.store.cassandra.connect"
        )
    return statement.replace(KEYSPACE, keyspace)


def prepare(session: Session, statement: str) -> PreparedStatement:
    """Return ``statement`` (with ``{ks}``) prepared on ``session``, once per session."""
    cache = _prepared.setdefault(session, {})
    if statement not in cache:
        cache[statement] = session.prepare(qualified(session, statement))
    return cache[statement]


def add_missing_columns(session: Session, columns: Sequence[tuple[str, str, str]]) -> None:
    """Add each ``(table, column, CQL type)`` that its table in the keyspace lacks.

    A table made by an older release gains the columns added since (``CREATE TABLE IF NOT
    EXISTS`` leaves an existing table as it is).
    """
    # Unquoted names are stored in lower case.
    keyspace = qualified(session, KEYSPACE).lower()
    for table, column, cql_type in columns:
        rows = session.execute(
            "SELECT column_name FROM system_schema.columns "
            "WHERE keyspace_name = %s AND table_name = %s",
            (keyspace, table),
        )
        if column not in {r.column_name for r in rows}:
            ddl = f"ALTER TABLE {KEYSPACE}.{table} ADD {column} {cql_type}"
            session.execute(qualified(session, ddl))
