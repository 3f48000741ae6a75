"""The annotation queue on the real local Kafka and Cassandra: the sink, priorities, claims."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from annotating import AnnotationWorld

from phenocascade.config import Settings
from phenocascade.errors import ConflictError
from phenocascade.store.annotations import (
    add_task,
    claim_task,
    complete_task,
    get_task,
    list_open_tasks,
    supersede_task,
    unanswered_tasks,
)
from phenocascade.streams.scan import scan_topic

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def world(infra: Settings) -> Iterator[AnnotationWorld]:
    w = AnnotationWorld(infra)
    yield w
    w.session.cluster.shutdown()


@pytest.fixture(scope="module")
def image(infra: Settings) -> Path:
    return sorted((infra.datasets / "dsb2018" / "images").glob("*.png"))[0].resolve()


def test_a_repeated_request_makes_one_task_and_never_reopens_it(
    world: AnnotationWorld, image: Path
) -> None:
    request, _ = world.request(
        "dup-1", tier="quality", path=image, scores={"clear": 0.55}, classes=["clear"]
    )
    other_tier, _ = world.request(
        "dup-1", tier="majority", path=image, scores={"dense": 0.5}, classes=["dense", "sparse"]
    )
    dup = request["image_id"]
    world.produce([world.encode(request), world.encode(request), world.encode(other_tier)])
    stats = world.run_sink()
    assert (stats.created, stats.duplicates, stats.dead_letters) == (2, 1, 0)

    queued = [t for t in list_open_tasks(session=world.session, study=world.study)]
    assert sorted((t["image_id"], t["tier"]) for t in queued if t["image_id"] == dup) == [
        (dup, "majority"),
        (dup, "quality"),
    ]
    task = get_task(session=world.session, image_id=dup, tier="quality")
    assert task is not None
    assert task["submitted"] == request["submitted"]
    assert task["classes"] == ["clear"]
    assert task["uri"] == str(image)

    complete_task(
        session=world.session, image_id=dup, tier="quality", user="ann", annotation_id="a-1"
    )
    world.produce([world.encode(request)])
    again = world.run_sink()
    assert (again.created, again.duplicates) == (0, 1)
    done = get_task(session=world.session, image_id=dup, tier="quality")
    assert done is not None and done["status"] == "done" and done["completed_by"] == "ann"
    assert (dup, "quality") not in {
        (t["image_id"], t["tier"])
        for t in list_open_tasks(session=world.session, study=world.study)
    }


def test_queue_serves_most_uncertain_first_then_oldest(world: AnnotationWorld, image: Path) -> None:
    study = f"{world.study}-order"
    base = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [  # (image_id, tier, priority, age order)
        ("p-low", "quality", 0.20, 0),
        ("p-high-new", "quality", 0.90, 5),
        ("p-high-old", "majority", 0.90, 1),
        ("p-mid", "majority", 0.60, 2),
    ]
    for image_id, tier, priority, minutes in rows:
        request, _ = world.request(
            image_id, tier=tier, path=image, scores={"clear": 0.5}, classes=["clear"], study=study
        )
        request["priority"] = priority
        request["created_at"] = base + timedelta(minutes=minutes)
        assert add_task(session=world.session, request=request)

    def ids(**filters: object) -> list[str]:
        found = list_open_tasks(session=world.session, study=study, **filters)  # type: ignore[arg-type]
        return [t["image_id"].removeprefix(world.prefix) for t in found]

    assert ids() == ["p-high-old", "p-high-new", "p-mid", "p-low"]
    assert ids(min_priority=0.5) == ["p-high-old", "p-high-new", "p-mid"]
    assert ids(tier="quality") == ["p-high-new", "p-low"]
    assert ids(limit=2) == ["p-high-old", "p-high-new"]
    assert ids(tier="minority") == []


def test_a_claim_expires_and_only_one_of_two_claimants_wins(
    world: AnnotationWorld, image: Path
) -> None:
    study = f"{world.study}-claims"
    request, _ = world.request(
        "claim-1", tier="quality", path=image, scores={"clear": 0.5}, classes=["clear"], study=study
    )
    add_task(session=world.session, request=request)
    first = request["image_id"]
    t0 = datetime.now(tz=UTC)
    claimed = claim_task(
        session=world.session, image_id=first, tier="quality", user="alice", claim_s=60, now=t0
    )
    assert claimed is not None and claimed["claimed_by"] == "alice"

    def listed_for(user: str, at: datetime) -> bool:
        found = list_open_tasks(session=world.session, study=study, user=user, now=at)
        return first in [t["image_id"] for t in found]

    assert listed_for("alice", t0 + timedelta(seconds=30))
    assert not listed_for("bob", t0 + timedelta(seconds=30))
    with pytest.raises(ConflictError, match="claimed by alice"):
        claim_task(session=world.session, image_id=first, tier="quality", user="bob", now=t0)
    with pytest.raises(ConflictError):
        complete_task(
            session=world.session, image_id=first, tier="quality", user="bob", annotation_id="x"
        )

    expired = t0 + timedelta(seconds=61)
    assert listed_for("bob", expired)
    taken = claim_task(
        session=world.session, image_id=first, tier="quality", user="bob", now=expired
    )
    assert taken is not None and taken["claimed_by"] == "bob"
    assert (
        claim_task(
            session=world.session, image_id=world.prefix + "nope", tier="quality", user="bob"
        )
        is None
    )

    # Two annotators at once on a fresh task: the lightweight transaction lets exactly one win.
    race, _ = world.request(
        "claim-2", tier="quality", path=image, scores={"clear": 0.5}, classes=["clear"], study=study
    )
    add_task(session=world.session, request=race)
    second = race["image_id"]
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def claim_as(user: str) -> None:
        barrier.wait()
        try:
            claim_task(session=world.session, image_id=second, tier="quality", user=user)
            outcomes[user] = "won"
        except ConflictError:
            outcomes[user] = "lost"

    threads = [threading.Thread(target=claim_as, args=(u,)) for u in ("carol", "dave")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["lost", "won"]
    winner = next(u for u, o in outcomes.items() if o == "won")
    stored = get_task(session=world.session, image_id=second, tier="quality")
    assert stored is not None and stored["claimed_by"] == winner


def test_a_superseded_task_leaves_the_queue_and_only_a_newer_request_opens_it(
    world: AnnotationWorld, image: Path
) -> None:
    study = f"{world.study}-supersede"
    request, _ = world.request(
        "sup-1", tier="majority", path=image, scores={"dense": 0.5}, classes=["dense"], study=study
    )
    image_id = request["image_id"]
    assert add_task(session=world.session, request=request)

    def queued() -> list[tuple[str, float]]:
        entries = list_open_tasks(session=world.session, study=study, user="alice")
        return [(t["model_version"], t["priority"]) for t in entries if t["image_id"] == image_id]

    def task() -> dict[str, Any]:
        found = get_task(session=world.session, image_id=image_id, tier="majority")
        assert found is not None
        return found

    # A newer model's request renews the unanswered task (and its queue entry) in place.
    t0 = datetime.now(tz=UTC)
    renewed = {**request, "model_version": "v-2", "priority": 0.9, "created_at": t0}
    assert not add_task(session=world.session, request=renewed)
    assert task()["model_version"] == "v-2" and task()["status"] == "open"
    assert queued() == [("v-2", 0.9)]

    # An expert's live claim keeps the task theirs; once it lapses, the model takes it.
    claim_task(session=world.session, image_id=image_id, tier="majority", user="alice", now=t0)
    assert (
        supersede_task(
            session=world.session, image_id=image_id, tier="majority", model_version="v-3"
        )
        is None
    )
    assert task()["status"] == "claimed"
    lapsed = t0 + timedelta(hours=1)
    superseded = supersede_task(
        session=world.session, image_id=image_id, tier="majority", model_version="v-3", now=lapsed
    )
    assert superseded is not None and task()["status"] == "superseded"
    assert task()["superseded_by"] == "v-3" and queued() == []
    assert image_id not in [
        t["image_id"] for t in unanswered_tasks(session=world.session, tier="majority")
    ]
    with pytest.raises(ConflictError, match="withdrawn: model v-3 now decides"):
        claim_task(session=world.session, image_id=image_id, tier="majority", user="alice")
    assert (
        supersede_task(
            session=world.session, image_id=image_id, tier="majority", model_version="v-3"
        )
        is None
    )

    # A request from before (a redelivery) changes nothing; one made since opens it again.
    assert not add_task(session=world.session, request=renewed)
    assert task()["status"] == "superseded"
    asked_again = {
        **request,
        "model_version": "v-4",
        "priority": 0.7,
        "created_at": datetime.now(tz=UTC) + timedelta(hours=2),
    }
    assert add_task(session=world.session, request=asked_again)
    assert (task()["status"], task()["claimed_by"], task()["superseded_by"]) == ("open", None, None)
    assert queued() == [("v-4", 0.7)]

    # A done task is never renewed.
    complete_task(
        session=world.session, image_id=image_id, tier="majority", user="bob", annotation_id="a-9"
    )
    later = {
        **asked_again,
        "model_version": "v-5",
        "created_at": asked_again["created_at"] + timedelta(hours=1),
    }
    assert not add_task(session=world.session, request=later)
    assert (task()["status"], task()["model_version"]) == ("done", "v-4") and queued() == []


def test_sink_dead_letters_bad_messages_and_goes_on(world: AnnotationWorld, image: Path) -> None:
    unknown_tier, _ = world.request(
        "dl-unknown", tier="no-such-tier", path=image, scores={"x": 0.5}, classes=["x"]
    )
    good, _ = world.request(
        "dl-good", tier="quality", path=image, scores={"clear": 0.5}, classes=["clear"]
    )
    # One key, so one partition: the good request comes after both bad ones.
    world.produce(
        [
            (b"dl", b"this is not avro"),
            (b"dl", world.encode(unknown_tier)[1]),
            (b"dl", world.encode(good)[1]),
        ]
    )
    stats = world.run_sink()
    assert stats.dead_letters == 2
    assert stats.created == 1
    assert get_task(session=world.session, image_id=good["image_id"], tier="quality") is not None

    dead = [
        world.codec.decode(v, expected="DeadLetter")[1]
        for _, v in scan_topic(world.settings.kafka, world.topology.dead_letter_topic)
    ]
    assert sorted(d["error_kind"] for d in dead) == ["bad_input", "schema"]
    assert all(d["origin_topic"] == world.topology.annotate_topic for d in dead)
    assert any("no-such-tier" in d["message"] for d in dead)
    assert any(d["payload"] == b"this is not avro" for d in dead)

    # Offsets were committed after the writes: a restarted sink has nothing left to read.
    assert world.run_sink().messages == 0
