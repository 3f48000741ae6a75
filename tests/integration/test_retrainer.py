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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session
from harness import produce_annotations, read_events, retraining_env

from phenocascade.config import Settings, Topology
from phenocascade.consumers.retrainer import Challenger, Retrainer
from phenocascade.domain import Sample
from phenocascade.models.artifact import new_version
from phenocascade.models.base import ArtifactMeta, champion_version, set_champion
from phenocascade.store.annotations import annotations_by_tier, save_annotation
from phenocascade.store.lineage import get_lineage, lineage_by_tier, save_lineage
from phenocascade.streams import events
from phenocascade.streams.kafka import plain_producer
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


class BrokenTrainer(ScriptedTrainer):
    """Fails in ``train`` after saving a partial copy, or in ``evaluate`` after training."""

    def __init__(self, artifacts: Path, fail_in: str):
        super().__init__(artifacts, champion_auroc=0.8, challenger_aurocs=[0.9])
        self.fail_in = fail_in
        self.partial: Path | None = None

    def train(
        self, tier: str, *, extra_samples: Sequence[Sample], parent_version: str
    ) -> Challenger:
        challenger = super().train(tier, extra_samples=extra_samples, parent_version=parent_version)
        if self.fail_in == "train":
            self.partial = self.artifacts / tier / challenger.version
            raise RuntimeError("out of memory")
        return challenger

    def evaluate(self, tier: str, version: str) -> dict[str, float]:
        if self.fail_in == "evaluate":
            raise RuntimeError("holdout unreadable")
        return super().evaluate(tier, version)


@pytest.fixture
def env(infra: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Topology, Session]]:
    with retraining_env(infra, tmp_path, "quality", [tmp_path]) as env:
        yield env


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
    produce_annotations(settings, topology.annotations_topic, [*first, unknown_tier])
    retrainer.run(threading.Event(), until_caught_up=True)
    # equal is not better: rejected, nothing promoted
    assert [o.decision for o in retrainer.stats.outcomes] == ["rejected"]
    assert champion_version(settings.artifacts, "quality") == champion
    assert not (settings.artifacts / "quality" / retrainer.stats.outcomes[0].version).exists()
    assert not list(scan_topic(settings.kafka, topology.models_topic))
    assert retrainer.stats.dead_letters == 1
    assert retrainer.pending("quality") == 0

    # a replay of a stored annotation is not a new label; three new ones are
    second = _annotations(tmp_path, 3)
    produce_annotations(settings, topology.annotations_topic, [first[0], *second])
    retrainer.run(threading.Event(), until_caught_up=True)
    promoted = retrainer.stats.outcomes[-1]
    assert promoted.decision == "promoted" and promoted.parent_version == champion
    assert champion_version(settings.artifacts, "quality") == promoted.version
    # the promoted challenger and the old champion (workers may still serve it) both stay
    assert (settings.artifacts / "quality" / promoted.version / "metadata.json").is_file()
    assert (settings.artifacts / "quality" / champion / "metadata.json").is_file()
    assert trainer.trained_on[-1] == sorted(a["image_id"] for a in [*first, *second])

    models = read_events(settings, topology.models_topic, "ModelPromoted")
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
    produce_annotations(settings, topology.annotations_topic, records)
    assert retrainer.sync() == 2
    outcome = retrainer.retrain("quality")
    assert outcome.decision == "rejected" and outcome.trigger == "manual"
    assert sorted(outcome.annotation_ids) == sorted(a["annotation_id"] for a in records)
    assert get_lineage(session=session, version=outcome.version) is not None


@pytest.mark.parametrize("keep_rejected", [False, True])
def test_a_rejected_challengers_folder_is_deleted_unless_kept(
    env: tuple[Settings, Topology, Session], keep_rejected: bool
) -> None:
    settings, topology, session = env
    champion = champion_version(settings.artifacts, "quality")
    trainer = ScriptedTrainer(settings.artifacts, champion_auroc=0.8, challenger_aurocs=[0.7])
    retrainer = Retrainer(
        settings=settings,
        topology=topology,
        trainer=trainer,
        tiers=["quality"],
        session=session,
        keep_rejected=keep_rejected,
    )
    outcome = retrainer.retrain("quality")
    assert outcome.decision == "rejected"
    assert (settings.artifacts / "quality" / outcome.version).exists() == keep_rejected
    assert champion_version(settings.artifacts, "quality") == champion
    assert (settings.artifacts / "quality" / str(champion) / "metadata.json").is_file()
    # the lineage record keeps what the deleted artifact earned
    record = get_lineage(session=session, version=outcome.version)
    assert record is not None and record["metrics"] == {"auroc": 0.7}


def test_a_failed_attempt_deletes_the_challenger_it_saved_and_nothing_else(
    env: tuple[Settings, Topology, Session],
) -> None:
    settings, topology, session = env
    tier_dir = settings.artifacts / "quality"
    champion = champion_version(settings.artifacts, "quality")

    # trained and saved, then the champion could not be scored: the challenger goes
    late = BrokenTrainer(settings.artifacts, fail_in="evaluate")
    retrainer = Retrainer(
        settings=settings, topology=topology, trainer=late, tiers=["quality"], session=session
    )
    outcome = retrainer.retrain("quality")
    assert outcome.decision == "failed" and "holdout unreadable" in outcome.reason
    assert not (tier_dir / outcome.version).exists()
    assert sorted(p.name for p in tier_dir.iterdir()) == sorted(["CHAMPION", str(champion)])

    # train() raised: the attempt has only a pseudo version, so no folder is known to be
    # its own and none is deleted (not even the partial copy the trainer left)
    early = BrokenTrainer(settings.artifacts, fail_in="train")
    retrainer = Retrainer(
        settings=settings, topology=topology, trainer=early, tiers=["quality"], session=session
    )
    outcome = retrainer.retrain("quality")
    assert outcome.decision == "failed" and outcome.version.startswith("failed-")
    assert early.partial is not None and early.partial.is_dir()
    assert (tier_dir / str(champion) / "metadata.json").is_file()
    assert champion_version(settings.artifacts, "quality") == champion


def _promoted(settings: Settings, topology: Topology) -> list[dict[str, Any]]:
    return read_events(settings, topology.models_topic, "ModelPromoted")


@pytest.mark.parametrize("lineage_saved", [False, True])
def test_run_announces_a_champion_whose_model_promoted_was_lost(
    env: tuple[Settings, Topology, Session], lineage_saved: bool
) -> None:
    settings, topology, session = env
    old = champion_version(settings.artifacts, "quality")
    assert old is not None
    codec = EventCodec()
    if lineage_saved:
        # an earlier promotion was announced; the newest one is not
        producer = plain_producer(settings.kafka)
        earlier = {
            "tier": "quality",
            "version": old,
            "parent_version": "",
            "metrics": {},
            "promoted_at": events.now_ms(),
        }
        producer.produce(
            topology.models_topic,
            key=b"quality",
            value=codec.encode("ModelPromoted", earlier),
        )
        assert producer.flush(30) == 0

    # A retrainer promoted `new` and died before ModelPromoted was acknowledged: CHAMPION
    # is set, nothing is announced, and the lineage record may or may not be written.
    new = new_version()
    folder = settings.artifacts / "quality" / new
    shutil.copytree(settings.artifacts / "quality" / old, folder)
    meta = ArtifactMeta.read(folder)
    nested = {"clear": {"auroc": 0.9}}
    artifact_metrics = {"macro_auroc": 0.93, "n_images": 10, "per_label": nested, "split": "val"}
    replace(meta, version=new, parent_version=old, metrics=artifact_metrics).write(folder)
    set_champion(settings.artifacts, "quality", new)
    if lineage_saved:
        now = datetime.now(tz=UTC)
        save_lineage(
            session=session,
            record={
                "tier": "quality",
                "version": new,
                "parent_version": old,
                "decision": "promoted",
                "reason": "auroc 0.9000 > champion's 0.8000 on the holdout",
                "trigger": "count",
                "metric": "auroc",
                "metrics": {"auroc": 0.9},
                "parent_metrics": {"auroc": 0.8},
                "annotation_ids": ["a1", "a2"],
                "excluded": {},
                "started_at": now,
                "finished_at": now,
            },
        )
    before = len(_promoted(settings, topology))

    trainer = ScriptedTrainer(settings.artifacts, champion_auroc=0.8, challenger_aurocs=[])
    retrainer = Retrainer(
        settings=settings, topology=topology, trainer=trainer, tiers=["quality"], session=session
    )
    retrainer.run(threading.Event(), until_caught_up=True)
    models = _promoted(settings, topology)
    assert len(models) == before + 1
    announced = models[-1]
    assert announced["tier"] == "quality" and announced["version"] == new
    assert announced["parent_version"] == old
    if lineage_saved:
        expected = {"auroc": 0.9, "parent_auroc": 0.8, "annotations": 2.0}
    else:
        expected = {"auroc": 0.93}  # the summary metrics of the metadata
    assert announced["metrics"] == expected

    # announced now: the next start publishes nothing
    retrainer.run(threading.Event(), until_caught_up=True)
    assert len(_promoted(settings, topology)) == before + 1
    assert champion_version(settings.artifacts, "quality") == new
    assert folder.is_dir()
