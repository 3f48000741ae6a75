"""Tier 3 learns from expert boxes, on the real local Kafka and Cassandra.

Simulated experts annotate DSB 2018 training images with their ground-truth large-nucleus
boxes (what the browser's tier-3 form sends), and ``Annotation`` events carry them to the
retraining consumer. The minority champion is the nucleus composite, which learns from every
nucleus: the retrainer completes each annotation with the champion's own confident nucleus
detections, trains a challenger of the same backend, scores both on the fixed holdout by
AP50, and promotes only a better one. The training budget is tiny (one epoch on eight base
images plus the annotations), so the test checks the loop, not the challenger's quality.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cassandra.cluster import Session
from harness import produce_annotations, read_events, retraining_env

from phenocascade.config import Settings, Topology
from phenocascade.consumers.retrainer import HOLDOUT_REASON, PROMOTED, REJECTED, Retrainer
from phenocascade.domain import Sample
from phenocascade.learning import Budget, RecipeTrainer
from phenocascade.models.base import ArtifactMeta, champion_version
from phenocascade.recipes import tier_data
from phenocascade.store.lineage import get_lineage
from phenocascade.streams import events

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUDGET = Budget(max_train=8, max_epochs=1, max_val_fit=4, max_holdout=10)


@pytest.fixture
def env(infra: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Topology, Session]]:
    with retraining_env(infra, tmp_path, "minority", [infra.datasets.resolve()]) as env:
        yield env


def _annotation(sample: Sample) -> dict[str, Any]:
    assert sample.path is not None
    return {
        "annotation_id": uuid.uuid4().hex,
        "image_id": f"{sample.image_id}-{uuid.uuid4().hex[:6]}",
        "tier": "minority",
        "annotator": "simulated-expert",
        "labels": sorted({b.label for b in sample.boxes}),
        "boxes": [
            {
                "x_min": b.x_min,
                "y_min": b.y_min,
                "x_max": b.x_max,
                "y_max": b.y_max,
                "label": b.label,
                "score": 1.0,
            }
            for b in sample.boxes
        ],
        "uri": str(sample.path.resolve()),
        "model_version": "",
        "created_at": events.now_ms(),
    }


def test_rare_box_annotations_retrain_the_nucleus_composite(
    env: tuple[Settings, Topology, Session],
) -> None:
    settings, topology, session = env
    champion = champion_version(settings.artifacts, "minority")
    assert champion is not None
    trainer = RecipeTrainer(settings, budget=BUDGET)
    train = tier_data("minority", settings, "train").samples
    rare = [s for s in train if s.boxes][:4]
    plain = [s for s in train if not s.boxes][:1]
    held_out = trainer.holdout("minority")[0]
    used = [_annotation(s) for s in [*rare, *plain]]
    records = [*used, _annotation(held_out)]
    produce_annotations(settings, topology.annotations_topic, records)

    retrainer = Retrainer(
        settings=settings,
        topology=topology,
        trainer=trainer,
        every=len(records),
        tiers=["minority"],
        session=session,
        keep_rejected=True,  # to read the challenger's metadata below
    )
    retrainer.run(threading.Event(), until_caught_up=True)

    [outcome] = retrainer.stats.outcomes
    assert outcome.decision in (PROMOTED, REJECTED), outcome.reason
    assert outcome.trigger == "count" and outcome.parent_version == champion
    assert sorted(outcome.annotation_ids) == sorted(a["annotation_id"] for a in used)
    assert outcome.excluded == {records[-1]["annotation_id"]: HOLDOUT_REASON}
    assert outcome.metric == "ap50"
    new, old = outcome.metrics["ap50"], outcome.parent_metrics["ap50"]
    assert math.isfinite(new) and math.isfinite(old)
    assert (outcome.decision == PROMOTED) == (new > old)

    # The challenger is a nucleus composite trained on the base images plus the annotated
    # ones, each holding the expert's boxes and the champion's other confident nuclei.
    meta = ArtifactMeta.read(settings.artifacts / "minority" / outcome.version)
    parent = ArtifactMeta.read(settings.artifacts / "minority" / champion)
    assert meta.backend == parent.backend
    assert meta.backend in ("nucleus_mask_outlier_detector", "nucleus_outlier_detector")
    assert meta.parent_version == champion
    assert meta.metrics["train_samples"] == BUDGET.max_train + len(used)
    boxes = meta.metrics["annotation_boxes"]
    assert boxes["expert"] == sum(len(s.boxes) for s in rare) > 0
    assert boxes["pseudo"] > 10 * len(used)  # DSB images hold about 40 nuclei each

    record = get_lineage(session=session, version=outcome.version)
    assert record is not None and record["decision"] == outcome.decision
    assert sorted(record["annotation_ids"]) == sorted(outcome.annotation_ids)
    published = [
        r["version"] for r in read_events(settings, topology.models_topic, "ModelPromoted")
    ]
    expected = [outcome.version] if outcome.decision == PROMOTED else []
    assert published == expected
    assert champion_version(settings.artifacts, "minority") == (expected or [champion])[0]
