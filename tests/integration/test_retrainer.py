"""The retraining consumer's bookkeeping on the real local Kafka and Cassandra.

Training itself is replaced by a scripted trainer that saves a real artifact (a copy of
the champion's weights under a new version) and reports metrics chosen by the test, so the
promotion rule, the events and the lineage are checked in seconds. The real training path
runs in ``test_learning_loop.py``.
"""

from __future__ import annotations

import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session

from phenocascade.config import Settings, Topology, load_topology
from phenocascade.consumers.retrainer import Challenger, Retrainer
from phenocascade.domain import Sample
from phenocascade.models.artifact import new_version
from phenocascade.models.base import ArtifactMeta, champion_version
from phenocascade.recipes import ensure_bootstrap
from phenocascade.store.annotations import annotations_by_tier, save_annotation
from phenocascade.store.cassandra import connect
from phenocascade.store.lineage import get_lineage, lineage_by_tier
from phenocascade.streams import events
from phenocascade.streams.kafka import create_topics, plain_producer
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec

pytestmark = [pytest.mark.integration]


class ScriptedTrainer:
    """Saves the champion's weights as a new version and reports the next scripted metric."""

    def __init__(self, artifacts: Path, champion_auroc: float, challenger_aurocs: list[float]):
        self.artifacts = artifacts
        self.champion_auroc = champion_auroc
        self.challenger_aurocs = list(challenger_aurocs)
        self.trained_on: list[list[str]] = []

    def metric(self, tier: str) -> str:
        return "auroc"

    def holdout_keys(self, tier: str) -> frozenset[str]:
        return frozenset()

    def train(
        self, tier: str, *, extra_samples: Sequence[Sample], parent_version: str
    ) -> Challenger:
        self.trained_on.append(sorted(s.image_id for s in extra_samples))
        version = new_version()
        shutil.copytree(self.artifacts / tier / parent_version, self.artifacts / tier / version)
        meta = ArtifactMeta.read(self.artifacts / tier / version)
        replace(meta, version=version, parent_version=parent_version).write(
            self.artifacts / tier / version
        )
        return Challenger(version=version, metrics={"auroc": self.challenger_aurocs.pop(0)})

    def evaluate(self, tier: str, version: str) -> dict[str, float]:
        return {"auroc": self.champion_auroc}


@pytest.fixture
def env(infra: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Topology, Session]]:
    ensure_bootstrap(infra)
    champion = champion_version(infra.artifacts, "quality")
    assert champion is not None
    artifacts = tmp_path / "artifacts"
    shutil.copytree(infra.artifacts / "quality" / champion, artifacts / "quality" / champion)
    (artifacts / "quality" / "CHAMPION").write_text(champion)
    keyspace = f"phenocascade_it_{uuid.uuid4().hex[:8]}"
    settings = infra.model_copy(
        update={
            "artifacts": artifacts,
            "home": tmp_path / "home",
            "allowed_roots": [tmp_path],
            "cassandra": infra.cassandra.model_copy(update={"keyspace": keyspace}),
        }
    )
    topology = load_topology().namespaced(f"rt{uuid.uuid4().hex[:8]}-")
    create_topics(settings.kafka, topology)
    session = connect(settings.cassandra)
    yield settings, topology, session
    session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def _produce(settings: Settings, topic: str, records: list[dict[str, Any]]) -> None:
    codec = EventCodec()
    producer = plain_producer(settings.kafka)
    for r in records:
        producer.produce(topic, key=r["image_id"].encode(), value=codec.encode("Annotation", r))
    assert producer.flush(30) == 0


def _annotations(folder: Path, n: int, tier: str = "quality") -> list[dict[str, Any]]:
    records = []
    for i in range(n):
        path = folder / f"img-{uuid.uuid4().hex[:6]}.png"
        path.write_bytes(path.name.encode())
        records.append(
            {
                "annotation_id": uuid.uuid4().hex,
                "image_id": path.stem,
                "tier": tier,
                "annotator": "test",
                "labels": ["clear"] if i % 2 else [],
                "boxes": [],
                "uri": str(path),
                "model_version": "",
                "created_at": events.now_ms(),
            }
        )
    return records


def test_save_annotation_stores_a_resent_annotation_once(
    env: tuple[Settings, Topology, Session],
) -> None:
    _, _, session = env
    record = {
        "annotation_id": "same-id",
        "image_id": "img-1",
        "tier": "quality",
        "annotator": "a",
        "labels": ["clear"],
        "boxes": [],
        "uri": None,
        "model_version": "",
        "created_at": 1_700_000_000_000,
    }
    assert save_annotation(session=session, annotation=record) is True
    # a producer re-sends it later with its own clock: still one label
    again = {**record, "created_at": 1_700_000_999_000}
    assert save_annotation(session=session, annotation=again) is False
    stored = annotations_by_tier(session=session, tier="quality")
    assert [a["annotation_id"] for a in stored] == ["same-id"]
    assert stored[0]["created_at"].timestamp() == 1_700_000_000


def test_every_n_annotations_retrain_and_only_a_strictly_better_challenger_is_promoted(
    env: tuple[Settings, Topology, Session], tmp_path: Path
) -> None:
    settings, topology, session = env
    champion = champion_version(settings.artifacts, "quality")
    assert champion is not None
    trainer = ScriptedTrainer(settings.artifacts, champion_auroc=0.8, challenger_aurocs=[0.8, 0.9])
    retrainer = Retrainer(
        settings=settings,
        topology=topology,
        trainer=trainer,
        every=3,
        tiers=["quality"],
        session=session,
    )

    first = _annotations(tmp_path, 3)
    unknown_tier = {**_annotations(tmp_path, 1)[0], "tier": "nonsense"}
    _produce(settings, topology.annotations_topic, [*first, unknown_tier])
    retrainer.run(threading.Event(), until_caught_up=True)
    # equal is not better: rejected, nothing promoted
    assert [o.decision for o in retrainer.stats.outcomes] == ["rejected"]
    assert champion_version(settings.artifacts, "quality") == champion
    assert not list(scan_topic(settings.kafka, topology.models_topic))
    assert retrainer.stats.dead_letters == 1
    assert retrainer.pending("quality") == 0

    # a replay of a stored annotation is not a new label; three new ones are
    second = _annotations(tmp_path, 3)
    _produce(settings, topology.annotations_topic, [first[0], *second])
    retrainer.run(threading.Event(), until_caught_up=True)
    promoted = retrainer.stats.outcomes[-1]
    assert promoted.decision == "promoted" and promoted.parent_version == champion
    assert champion_version(settings.artifacts, "quality") == promoted.version
    assert trainer.trained_on[-1] == sorted(a["image_id"] for a in [*first, *second])

    codec = EventCodec()
    models = [
        codec.decode(v, expected="ModelPromoted")[1]
        for _, v in scan_topic(settings.kafka, topology.models_topic)
    ]
    assert len(models) == 1
    assert models[0]["tier"] == "quality" and models[0]["version"] == promoted.version
    assert models[0]["parent_version"] == champion
    assert models[0]["metrics"]["auroc"] == 0.9 and models[0]["metrics"]["parent_auroc"] == 0.8

    history = lineage_by_tier(session=session, tier="quality")
    assert [r["decision"] for r in history] == ["promoted", "rejected"]
    record = get_lineage(session=session, version=promoted.version)
    assert record is not None and record["parent_version"] == champion
    assert sorted(record["annotation_ids"]) == sorted(a["annotation_id"] for a in [*first, *second])
    assert record["metrics"] == {"auroc": 0.9} and record["parent_metrics"] == {"auroc": 0.8}
    assert len(annotations_by_tier(session=session, tier="quality")) == 6


def test_on_demand_retrain_syncs_third_party_annotations_from_the_topic(
    env: tuple[Settings, Topology, Session], tmp_path: Path
) -> None:
    settings, topology, session = env
    trainer = ScriptedTrainer(settings.artifacts, champion_auroc=0.8, challenger_aurocs=[0.7])
    retrainer = Retrainer(
        settings=settings, topology=topology, trainer=trainer, tiers=["quality"], session=session
    )
    records = _annotations(tmp_path, 2)
    _produce(settings, topology.annotations_topic, records)
    assert retrainer.sync() == 2
    outcome = retrainer.retrain("quality")
    assert outcome.decision == "rejected" and outcome.trigger == "manual"
    assert sorted(outcome.annotation_ids) == sorted(a["annotation_id"] for a in records)
    assert get_lineage(session=session, version=outcome.version) is not None
