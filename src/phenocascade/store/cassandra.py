"""Cassandra repository for image outputs (no torch, no Kafka here).

Tables are designed around the queries they serve:

* ``outputs_by_image``: one row per image and per set of model versions (the joiner's
  upserts are idempotent; a replay with new models adds a row), read by image id;
* ``outputs_by_study``: the same outputs partitioned by study, read by study.

Store functions are keyword-only, take an explicit session and return ``None`` (or an
empty list) when nothing is found.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cassandra import AuthenticationFailed, ConsistencyLevel
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import (
    EXEC_PROFILE_DEFAULT,
    Cluster,
    ExecutionProfile,
    NoHostAvailable,
    Session,
)
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

from phenocascade.config import CassandraSettings
from phenocascade.errors import InfraError
from phenocascade.store import join_state, lineage, logins, users
from phenocascade.store.annotations import create_tables
from phenocascade.store.cql import (
    add_missing_columns,
    bind_keyspace,
    check_keyspace,
    prepare,
    qualified,
)

_TABLES = (
    """
    CREATE TABLE IF NOT EXISTS {ks}.outputs_by_image (
        image_id text,
        versions_key text,
        status text,
        study text,
        uri text,
        labels map<text, double>,
        boxes text,
        routes map<text, text>,
        model_versions map<text, text>,
        produced_at timestamp,
        pending list<text>,
        annotators map<text, text>,
        expert_labels list<text>,
        PRIMARY KEY ((image_id), versions_key)
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS {ks}.outputs_by_study (
        study text,
        image_id text,
        versions_key text,
        status text,
        produced_at timestamp,
        PRIMARY KEY ((study), image_id, versions_key)
    )
    """,
)

# Columns added after a table was first created; `connect` adds them to older tables.
_ADDED_COLUMNS = (
    ("outputs_by_image", "pending", "list<text>"),
    ("outputs_by_image", "annotators", "map<text, text>"),
    ("outputs_by_image", "expert_labels", "list<text>"),
)


def versions_key(
    model_versions: Mapping[str, str], experts: Mapping[str, str] | None = None
) -> str:
    """Return a stable key for a set of tier model versions and expert answers.

    E.g. ``"majority=v2;quality=v1"``, and ``"majority=v2;quality=v1;quality@expert=alice"``
    when an expert (named by ``experts[tier]``) answered what the quality tier left open.
    """
    parts = [f"{tier}={version}" for tier, version in sorted(model_versions.items())]
    parts += [f"{tier}@expert={who}" for tier, who in sorted((experts or {}).items())]
    return ";".join(parts)


def connect(settings: CassandraSettings, *, create_schema: bool = True) -> Session:
    """Connect to Cassandra and (by default) create the keyspace and tables.

    TLS and authentication settings pass through to cassandra-driver. The session has no
    keyspace set (no ``USE``); store statements name ``settings.keyspace`` themselves
    (:mod:`phenocascade.store.cql`).

    Raises
    ------
    InfraError
        If no host answers, or one refuses the credentials or the TLS handshake.
    ConfigError
        If the keyspace is not a plain CQL name, or a TLS file cannot be loaded.
    """
    keyspace = check_keyspace(settings.keyspace)
    auth = (
        PlainTextAuthProvider(settings.username, settings.password)
        if settings.username is not None
        else None
    )
    cluster = Cluster(
        settings.hosts,
        port=settings.port,
        auth_provider=auth,
        ssl_context=settings.ssl_context(),
        protocol_version=5,
        execution_profiles={
            # Quorum reads and writes: with the keyspace at RF 3 a write is acknowledged by
            # two replicas and a read sees it with one node down (at RF 1, one replica).
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=TokenAwarePolicy(
                    DCAwareRoundRobinPolicy(local_dc=settings.local_dc)
                ),
                consistency_level=ConsistencyLevel.LOCAL_QUORUM,
            )
        },
    )
    try:
        session = cluster.connect()
    except NoHostAvailable as exc:
        raise InfraError(_unreachable(settings, exc)) from exc
    if create_schema:
        session.execute(
            f"CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = "
            f"{{'class': 'SimpleStrategy', 'replication_factor': {settings.replication_factor}}}"
        )
    bind_keyspace(session, keyspace)
    if create_schema:
        for ddl in _TABLES:
            session.execute(qualified(session, ddl))
        add_missing_columns(session, _ADDED_COLUMNS)
        create_tables(session)
        users.create_tables(session)
        lineage.create_tables(session)
        logins.create_tables(session)
        join_state.create_tables(session)
    return session


def _unreachable(settings: CassandraSettings, exc: NoHostAvailable) -> str:
    """Say why no host answered: it refused the login, TLS failed, or silence."""
    where = f"Cassandra at {settings.hosts}:{settings.port}"
    errors = list(exc.errors.values())
    refused = [e for e in errors if isinstance(e, AuthenticationFailed)]
    if refused and settings.username is None:
        return (
            f"{where} requires a password ({refused[0]}); set PHENOCASCADE_CASSANDRA__USERNAME "
            "and PHENOCASCADE_CASSANDRA__PASSWORD"
        )
    if refused:
        return (
            f"{where} refused the login of {settings.username!r} ({refused[0]}); check "
            "PHENOCASCADE_CASSANDRA__USERNAME and PHENOCASCADE_CASSANDRA__PASSWORD"
        )
    handshakes = [e for e in errors if isinstance(e, ssl.SSLError)]
    if handshakes:
        return (
            f"{where}: the TLS handshake failed ({handshakes[0]}); check "
            "PHENOCASCADE_CASSANDRA__SSL_CA_FILE"
        )
    hint = "run `phenocascade infra up`"
    if settings.ssl_ca_file is None:
        hint += ", or, if it requires TLS, set PHENOCASCADE_CASSANDRA__SSL_CA_FILE"
    return f"{where} does not answer ({exc}); {hint}"


def _timestamp(value: datetime | int) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromtimestamp(value / 1000, tz=UTC)


def save_output(*, session: Session, output: Mapping[str, Any]) -> None:
    """Upsert one ``ImageOutput`` record (idempotent per image and model versions)."""
    key = versions_key(output["model_versions"], output.get("annotators"))
    produced = _timestamp(output["produced_at"])
    session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.outputs_by_image (image_id, versions_key, status, study, uri, "
            "labels, boxes, routes, model_versions, produced_at, pending, annotators, "
            "expert_labels) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        ),
        (
            output["image_id"],
            key,
            output["status"],
            output["study"],
            output["uri"],
            dict(output["labels"]),
            json.dumps(list(output["boxes"])),
            dict(output["routes"]),
            dict(output["model_versions"]),
            produced,
            list(output.get("pending") or []),
            dict(output.get("annotators") or {}),
            list(output.get("expert_labels") or []),
        ),
    )
    session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.outputs_by_study (study, image_id, versions_key, status, "
            "produced_at) VALUES (?, ?, ?, ?, ?)",
        ),
        (output["study"], output["image_id"], key, output["status"], produced),
    )


def _row_to_output(row: Any) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "status": row.status,
        "study": row.study,
        "uri": row.uri,
        "labels": dict(row.labels or {}),
        "boxes": json.loads(row.boxes or "[]"),
        "routes": dict(row.routes or {}),
        "model_versions": dict(row.model_versions or {}),
        "produced_at": row.produced_at,
        "pending": list(row.pending or []),
        "annotators": dict(row.annotators or {}),
        "expert_labels": list(row.expert_labels or []),
    }


def get_outputs(*, session: Session, image_id: str) -> list[dict[str, Any]]:
    """Return every output of ``image_id`` (one per set of model versions), oldest first."""
    rows = session.execute(
        prepare(session, "SELECT * FROM {ks}.outputs_by_image WHERE image_id = ?"), (image_id,)
    )
    return sorted((_row_to_output(r) for r in rows), key=lambda o: o["produced_at"])


def get_latest_output(*, session: Session, image_id: str) -> dict[str, Any] | None:
    """Return the newest output of ``image_id``, or ``None`` if it has none."""
    outputs = get_outputs(session=session, image_id=image_id)
    return outputs[-1] if outputs else None


def latest_outputs_of_study(*, session: Session, study: str) -> list[dict[str, Any]]:
    """Return the newest output of every image of ``study``, in image id order."""
    ids = sorted({row["image_id"] for row in outputs_by_study(session=session, study=study)})
    return [o for i in ids if (o := get_latest_output(session=session, image_id=i)) is not None]


def outputs_by_study(*, session: Session, study: str) -> list[dict[str, Any]]:
    """Return ``{image_id, versions_key, status, produced_at}`` for every output of ``study``."""
    rows = session.execute(
        prepare(session, "SELECT * FROM {ks}.outputs_by_study WHERE study = ?"), (study,)
    )
    return [
        {
            "image_id": r.image_id,
            "versions_key": r.versions_key,
            "status": r.status,
            "produced_at": r.produced_at,
        }
        for r in rows
    ]


def latest_status_by_image(*, session: Session) -> dict[str, tuple[str, bool]]:
    """Return each image's newest output: its status, and whether an expert decided any of it.

    A full scan: for reports.
    """
    latest: dict[str, tuple[datetime, str, bool]] = {}
    scan = qualified(
        session, "SELECT image_id, status, produced_at, annotators FROM {ks}.outputs_by_image"
    )
    for r in session.execute(scan):
        seen = latest.get(r.image_id)
        if seen is None or r.produced_at > seen[0]:
            latest[r.image_id] = (r.produced_at, r.status, bool(r.annotators))
    return {image_id: (status, expert) for image_id, (_, status, expert) in latest.items()}


def all_outputs(*, session: Session, study: str | None = None) -> list[dict[str, Any]]:
    """Return every output (each set of versions and experts) of ``study``, or of all studies.

    Without ``study``, a full scan: for reports and ``diff``.
    """
    if study is not None:
        ids = sorted({row["image_id"] for row in outputs_by_study(session=session, study=study)})
        return [o for i in ids for o in get_outputs(session=session, image_id=i)]
    scan = qualified(session, "SELECT * FROM {ks}.outputs_by_image")
    return [_row_to_output(r) for r in session.execute(scan)]
