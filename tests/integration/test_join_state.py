"""The joiner's state in the real Cassandra: what one joiner recorded, a successor reads whole.

The joiner folds each result into the image's state and records the parts it changed
before it takes the next message; an emission is recorded once the output was
acknowledged. These tests fold results as the joiner does, with each step's state read
back from Cassandra through a second session, as a restarted joiner reads it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from cassandra.cluster import Session

from phenocascade.config import Settings, load_topology
from phenocascade.consumers.joining import merge, merge_annotation
from phenocascade.store.cassandra import connect
from phenocascade.store.join_state import (
    EMITTED,
    SENDING,
    TILE,
    changed_parts,
    count_parts,
    empty_state,
    load_state,
    save_part,
)

pytestmark = [pytest.mark.integration]

TOPOLOGY = load_topology()
KINDS = {"quality": "gate", "majority": "classifier", "minority": "detector"}
BOX = {"x_min": 1.0, "y_min": 2.0, "x_max": 5.0, "y_max": 6.0, "label": "large_nucleus"}


@pytest.fixture
def sessions(infra: Settings) -> Iterator[tuple[Session, Session]]:
    """Two sessions, as two joiner processes one after the other would have."""
    pair = (connect(infra.cassandra), connect(infra.cassandra))
    yield pair
    for session in pair:
        session.cluster.shutdown()


def _result(image_id: str, tier: str, route: str, **kw: Any) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "tier": tier,
        "kind": KINDS[tier],
        "route": route,
        "scores": kw.get("scores", {}),
        "boxes": kw.get("boxes", []),
        "model_version": "v1",
        "study": "s1",
        "uri": f"/images/{image_id}.png",
        "pending": kw.get("pending", []),
    }


def _fold(session: Session, app_id: str, event: dict[str, Any]) -> dict[str, Any] | None:
    """Do what the joiner does with one message, up to the output it emits."""
    where = {"session": session, "app_id": app_id, "image_id": event["image_id"]}
    state = load_state(**where)
    fold = merge_annotation if "annotation_id" in event else merge
    new_state, output = fold(TOPOLOGY, state, event)
    for part, name, value in changed_parts(state, new_state):
        save_part(**where, part=part, name=name, value=value)
    if output is not None:
        save_part(**where, part=EMITTED, name=new_state["emitted"][-1])
    return output


def test_a_successor_finishes_an_image_its_predecessor_began(
    sessions: tuple[Session, Session],
) -> None:
    first, second = sessions
    app_id, image_id = f"joiner-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    gate = _result(image_id, "quality", "PASS", scores={"clear": 0.99})
    majority = _result(
        image_id, "majority", "ANNOTATE", scores={"density:dense": 0.5}, pending=["density:dense"]
    )
    minority = _result(
        image_id, "minority", "PASS", boxes=[{**BOX, "score": 0.97}], scores={"large_nucleus": 1}
    )
    assert _fold(first, app_id, gate) is None
    assert _fold(first, app_id, majority) is None
    # The first joiner dies here; the second reads both results back and completes the image.
    state = load_state(session=second, app_id=app_id, image_id=image_id)
    assert set(state["tiers"]) == {"quality", "majority"}
    assert state["tiers"]["majority"]["pending"] == ["density:dense"]
    output = _fold(second, app_id, minority)
    assert output is not None
    assert output["status"] == "awaiting_annotation"
    assert output["pending"] == ["density:dense"]
    assert output["boxes"] == [{**BOX, "score": 0.97}]
    # Re-delivered after the emission (a crash before the offsets were committed): no output.
    for event in (gate, majority, minority):
        assert _fold(first, app_id, event) is None
    # The expert's answer decides the open label: one more output, and only one.
    answer = {
        "annotation_id": "a1",
        "image_id": image_id,
        "tier": "majority",
        "annotator": "alice",
        "labels": ["density:dense"],
        "boxes": [],
        "uri": gate["uri"],
        "model_version": "v1",
        "created_at": 1_000,
    }
    answered = _fold(second, app_id, answer)
    assert answered is not None
    assert answered["status"] == "analyzed"
    assert answered["labels"]["density:dense"] == 1.0
    assert _fold(first, app_id, answer) is None
    assert len(load_state(session=first, app_id=app_id, image_id=image_id)["emitted"]) == 2


def test_state_is_kept_per_joiner_app(sessions: tuple[Session, Session]) -> None:
    session, _ = sessions
    image_id = uuid.uuid4().hex
    gate = _result(image_id, "quality", "SKIP")
    apps = [f"joiner-{uuid.uuid4().hex[:8]}" for _ in range(2)]
    # Two topologies on one keyspace each emit their own output for the same image.
    assert [_fold(session, app, gate) is not None for app in apps] == [True, True]
    assert load_state(session=session, app_id="joiner-other", image_id=image_id) == empty_state()


def test_a_send_begun_is_read_back_with_its_time(sessions: tuple[Session, Session]) -> None:
    first, second = sessions
    where = {"app_id": f"joiner-{uuid.uuid4().hex[:8]}", "image_id": uuid.uuid4().hex}
    output = _fold(first, where["app_id"], _result(where["image_id"], "quality", "SKIP"))
    assert output is not None
    save_part(session=first, **where, part=SENDING, name="quality=v2", value=1796164346358)
    state = load_state(session=second, **where)
    assert state["sending"] == {"quality=v2": 1796164346358}
    assert state["emitted"] == ["quality=v1"]


def test_a_slides_tiles_are_counted_without_reading_them(sessions: tuple[Session, Session]) -> None:
    first, second = sessions
    where = {"app_id": f"joiner-{uuid.uuid4().hex[:8]}", "image_id": uuid.uuid4().hex}
    for name in ("s#tile-0", "s#tile-1", "s#tile-1"):  # the second is written again
        save_part(session=first, **where, part=TILE, name=name, value={"key": name})
    save_part(session=first, **where, part=EMITTED, name="tiles:abc")
    assert count_parts(session=second, **where, part=TILE) == 2
    state = load_state(session=second, **where)
    assert state["tile_outputs"] == {
        "s#tile-0": {"key": "s#tile-0"},
        "s#tile-1": {"key": "s#tile-1"},
    }
    assert state["emitted"] == ["tiles:abc"]
