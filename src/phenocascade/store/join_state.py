"""Cassandra repository of the joiner's state: each image's tier results, answers, emissions.

The joiner writes a result's part here, at the session's quorum, before its consumer may
commit the result's offset; so the state a restarted joiner reads is never behind the
offsets its predecessor committed. (A faust table, changelogged in Kafka, was: its
changelog sends were buffered, and under a broker outage some were dropped while the
offsets that depended on them were committed, leaving images waiting for good.)

One table, ``join_state``, partitioned by joiner app and image, with one row per part:

* ``("tier", name)``: the compact result of tier ``name``;
* ``("expert", name)``: the newest expert answer to tier ``name``'s question;
* ``("tile", tile id)``: the compact output of one tile, in its slide's state
  (:mod:`phenocascade.consumers.tiles`);
* ``("sending", key)``: the time (epoch ms) the joiner began to publish the output of
  emission key ``key``; a successor that finds it without the emission looks on the
  results topic from that time on before it publishes the output again;
* ``("emitted", key)``: an output emitted for the versions key ``key``.

Each part is written whole and on its own, so a re-delivered result rewrites the same row.

Store functions are keyword-only and take an explicit session.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cassandra.cluster import Session

from phenocascade.store.cql import prepare, qualified

TIER = "tier"
EXPERT = "expert"
TILE = "tile"
EMITTED = "emitted"
SENDING = "sending"
_STATE_KEYS = {TIER: "tiers", EXPERT: "experts", TILE: "tile_outputs"}

_TABLE = """
    CREATE TABLE IF NOT EXISTS {ks}.join_state (
        app_id text,
        image_id text,
        part text,
        name text,
        value text,
        PRIMARY KEY ((app_id, image_id), part, name)
    )
"""


def create_tables(session: Session) -> None:
    """Create the join state table if it does not exist."""
    session.execute(qualified(session, _TABLE))


def empty_state() -> dict[str, Any]:
    """Return the join state of an image nothing is known about."""
    return {"tiers": {}, "experts": {}, "tile_outputs": {}, "emitted": [], "sending": {}}


def load_state(*, session: Session, app_id: str, image_id: str) -> dict[str, Any]:
    """Return the join state of ``image_id`` (empty parts when nothing is stored).

    Returns
    -------
    dict
        ``{"tiers": {tier: compact result}, "experts": {tier: compact answer},
        "tile_outputs": {tile id: compact output}, "emitted": [emission keys],
        "sending": {emission key: epoch ms}}``, as :mod:`phenocascade.consumers.joining`,
        :mod:`phenocascade.consumers.tiles` and the joiner read it.
    """
    state = empty_state()
    rows = session.execute(
        prepare(
            session,
            "SELECT part, name, value FROM {ks}.join_state WHERE app_id = ? AND image_id = ?",
        ),
        (app_id, image_id),
    )
    for row in rows:
        if row.part == EMITTED:
            state["emitted"].append(row.name)
        elif row.part == SENDING:
            state["sending"][row.name] = json.loads(row.value)
        elif row.part in _STATE_KEYS:
            state[_STATE_KEYS[row.part]][row.name] = json.loads(row.value)
    return state


def save_part(
    *, session: Session, app_id: str, image_id: str, part: str, name: str, value: Any = None
) -> None:
    """Upsert one part of an image's join state (``value`` as JSON; none for an emission)."""
    session.execute(
        prepare(
            session,
            "INSERT INTO {ks}.join_state (app_id, image_id, part, name, value) "
            "VALUES (?, ?, ?, ?, ?)",
        ),
        (app_id, image_id, part, name, None if value is None else json.dumps(value)),
    )


def count_parts(*, session: Session, app_id: str, image_id: str, part: str) -> int:
    """Return how many parts of kind ``part`` an image's join state holds (values unread)."""
    row = session.execute(
        prepare(
            session,
            "SELECT COUNT(*) FROM {ks}.join_state WHERE app_id = ? AND image_id = ? AND part = ?",
        ),
        (app_id, image_id, part),
    ).one()
    return int(row[0]) if row is not None else 0


def changed_parts(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, Any]]:
    """Return the ``(part, name, value)`` of the results, answers and tiles ``new`` changed.

    Emissions are left out: the joiner records one's start before it publishes the output,
    and the emission only once the output's transaction committed.
    """
    return [
        (part, name, value)
        for part, key in _STATE_KEYS.items()
        for name, value in new.get(key, {}).items()
        if old.get(key, {}).get(name) != value
    ]
