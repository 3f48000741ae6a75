"""The active-learning loop end to end on the real local Kafka and Cassandra.

A namespaced cascade (three tier workers + joiner as processes) and the retraining consumer
(``phenocascade retrainer``, a process too) run on a copied artifacts folder and a fresh
keyspace. Simulated experts label the first images with the datasets' ground truth; the
retrainer trains a quality challenger on them, promotes it, and the quality worker switches
to it between batches while images keep streaming.

It starts from a deliberately weak quality champion (``quality_loop``), which the
challenger must beat on the same fixed holdout. The gate routes at a fixed 0.5 (a
topology threshold override) so that images also run through the branch tiers: a weak
model's certified thresholds would send nearly every image to annotation.

Streams: a warm-up; an idle burst; the images the experts label; a burst when the
retrainer starts training, then one image every two seconds until the worker has
switched; a last burst after the switch.

Set ``PHENOCASCADE_RESULTS_DIR`` to also write ``retraining_latency.json`` there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Cascade, settings_env
from quality_loop import (
    BUDGET,
    BUDGET_ARGS,
    HOLDOUT,
    degraded_copies,
    quality_annotation,
    weak_champion,
)

from phenocascade.config import Settings, Topology
from phenocascade.consumers.retrainer import HOLDOUT_REASON
from phenocascade.learning import RecipeTrainer
from phenocascade.models.base import ArtifactMeta, champion_version
from phenocascade.recipes import ensure_bootstrap
from phenocascade.recipes.bundled_data import split_ids
from phenocascade.store.annotations import annotations_by_tier
from phenocascade.store.cassandra import connect
from phenocascade.store.lineage import get_lineage, lineage_by_tier
from phenocascade.streams.events import to_epoch_ms
from phenocascade.streams.kafka import plain_producer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_for(predicate: Any, timeout_s: float, what: str, cascade: Cascade) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        if not all(cascade.alive().values()):
            raise AssertionError(f"a process died: {cascade.alive()}\n{cascade.log_tail()}")
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}\n{cascade.log_tail()}")


@pytest.fixture
def loop(infra: Settings, tmp_path: Path) -> Iterator[tuple[Cascade, RecipeTrainer, str]]:
    ensure_bootstrap(infra)
    artifacts = tmp_path / "artifacts"
    for tier in ("majority", "minority"):
        version = champion_version(infra.artifacts, tier)
        assert version is not None
        shutil.copytree(infra.artifacts / tier / version, artifacts / tier / version)
        (artifacts / tier / "CHAMPION").write_text(version)
    local = infra.model_copy(update={"artifacts": artifacts, "home": tmp_path / "home"})
    trainer = RecipeTrainer(local, budget=BUDGET)
    weak = weak_champion(local, trainer)
    assert champion_version(artifacts, "quality") == weak

    cascade = Cascade(local, tmp_path / "loop")
    topology = cascade.topology.model_dump()
    topology["tiers"][0]["thresholds"] = {"positive": 0.5, "negative": 0.5}
    cascade.topology = Topology.model_validate(topology)
    assert cascade.settings.topology is not None
    cascade.settings.topology.write_text(yaml.safe_dump(topology))
    # A fresh keyspace: the retrainer trains on every stored annotation of the tier.
    keyspace = f"phenocascade_it_{uuid.uuid4().hex[:8]}"
    cascade.settings = cascade.settings.model_copy(
        update={
            "cassandra": cascade.settings.cassandra.model_copy(update={"keyspace": keyspace}),
            "home": tmp_path / "home",
        }
    )
    cascade.env = settings_env(cascade.settings)
    session = connect(cascade.settings.cassandra)
    cascade.start()
    with (cascade.logs / "retrainer.log").open("ab") as out:
        cascade.procs["retrainer"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "phenocascade",
                "retrainer",
                "--tiers",
                "quality",
                "--every",
                "22",
                *BUDGET_ARGS,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cascade.env,
        )
    try:
        yield cascade, trainer, weak
    finally:
        cascade.stop()
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def _burst_rate(cascade: Cascade, ids: list[str], submitted: float) -> float:
    """Images per second from submitting a burst to its last output."""
    outputs = {o["image_id"]: o for o in cascade.outputs()}
    last = max(to_epoch_ms(outputs[i]["produced_at"]) for i in ids) / 1000
    return len(ids) / (last - submitted)


def test_annotations_train_a_challenger_that_workers_switch_to_mid_stream(
    loop: tuple[Cascade, RecipeTrainer, str],
) -> None:
    cascade, trainer, weak = loop
    datasets = cascade.settings.datasets.resolve()
    images = datasets / "dsb2018" / "images"
    train_ids = split_ids(cascade.settings, "dsb2018", "train")
    test_ids = split_ids(cascade.settings, "dsb2018", "test")
    # Images nobody labels; val images (the holdout) are kept out of the stream.
    stream = iter(images / f"{i}.png" for i in [*train_ids[20:], *test_ids])
    clear_1 = [images / f"{i}.png" for i in train_ids[:12]]
    degraded = degraded_copies(cascade.settings, train_ids[12:20], cascade.roots)
    assert len(degraded) == 8
    holdout_sources = sorted({s.path for s in trainer.holdout("quality") if s.path})[:2]

    warm = cascade.submit([next(stream) for _ in range(2)], prefix="warm-")
    assert len(cascade.wait_until_done(warm, timeout_s=600)) == 2, cascade.log_tail()
    idle_submitted = time.time()
    idle_ids = cascade.submit([next(stream) for _ in range(12)], prefix="idle-")
    cascade.wait_until_done(idle_ids, timeout_s=600)
    idle_rate = _burst_rate(cascade, idle_ids, idle_submitted)

    # Experts label a first stream: clear originals, degraded copies, and two holdout
    # images that must never be trained on.
    labelled = [*clear_1, *degraded, *holdout_sources]
    truth = [True] * len(clear_1) + [False] * len(degraded) + [True] * len(holdout_sources)
    ids_1 = cascade.submit(labelled, prefix="al1-")
    counts = cascade.wait_until_done(ids_1, timeout_s=600)
    assert sorted(counts) == sorted(ids_1), cascade.log_tail()
    outputs = {o["image_id"]: o for o in cascade.outputs()}
    before = [*warm, *idle_ids, *ids_1]
    assert {outputs[i]["model_versions"]["quality"] for i in before} == {weak}

    producer = plain_producer(cascade.settings.kafka)
    sent = []
    for image_id, path, clear in zip(ids_1, labelled, truth, strict=True):
        record = quality_annotation(image_id, path, clear, weak)
        sent.append(record)
        producer.produce(
            cascade.topology.annotations_topic,
            key=image_id.encode(),
            value=cascade.codec.encode("Annotation", record),
        )
    assert producer.flush(30) == 0
    annotated_at = time.time()
    holdout_ids = {a["annotation_id"] for a in sent[-len(holdout_sources) :]}

    # While the challenger trains: a burst, then a trickle until the promotion.
    retrainer_log = cascade.logs / "retrainer.log"
    _wait_for(
        lambda: "training a challenger" in retrainer_log.read_text(errors="replace"),
        300,
        "the retrainer to start training",
        cascade,
    )
    burst_submitted = time.time()
    burst = cascade.submit([next(stream) for _ in range(12)], prefix="al2-")

    def promoted() -> dict[str, Any] | None:
        found = cascade.read(cascade.topology.models_topic, "ModelPromoted")
        return next((p for p in found if p["tier"] == "quality"), None)

    worker_log = cascade.logs / "quality.log"
    trickle: list[str] = []
    event: dict[str, Any] | None = None
    switched = False
    deadline = time.monotonic() + 1200
    # Keep streaming until the worker has switched, so the switch happens mid-stream.
    while not switched:
        assert time.monotonic() < deadline, cascade.log_tail()
        assert all(cascade.alive().values()), cascade.log_tail()
        path = next(stream, None)
        if path is not None:
            trickle += cascade.submit([path], prefix="al2t-")
        time.sleep(2.0)
        event = event or promoted()
        switched = event is not None and bool(
            re.search(rf"now serves model {re.escape(event['version'])}", worker_log.read_text())
        )
    assert event is not None
    new = event["version"]
    promoted_at = to_epoch_ms(event["promoted_at"]) / 1000

    # After the switch.
    ids_3 = cascade.submit([next(stream) for _ in range(8)], prefix="al3-")
    ids_2 = [*burst, *trickle]
    all_ids = [*before, *ids_2, *ids_3]
    counts = cascade.wait_until_done(all_ids, timeout_s=900)
    assert sorted(counts) == sorted(all_ids), cascade.log_tail()
    # One output per image from the models; an image whose gate asked gets a second one
    # once the joiner folds the expert's answer in, and that one names the expert.
    by_models = Counter(
        o["image_id"] for o in cascade.outputs() if o["image_id"] in counts and not o["annotators"]
    )
    assert set(by_models.values()) == {1}, {k: v for k, v in by_models.items() if v != 1}
    assert sorted(by_models) == sorted(all_ids)

    # The promotion: challenger of the weak champion, better on the holdout, now champion.
    assert event["parent_version"] == weak and new != weak
    assert champion_version(cascade.settings.artifacts, "quality") == new
    assert ArtifactMeta.read(cascade.settings.artifacts / "quality" / new).parent_version == weak
    assert event["metrics"]["auroc"] > event["metrics"]["parent_auroc"]

    # Versions: old before, new after, and one switch in between while images streamed
    # (images still queued at the switch are scored by the new model).
    outputs = {o["image_id"]: o for o in cascade.outputs()}
    assert {outputs[i]["model_versions"]["quality"] for i in ids_3} == {new}
    quality_results = sorted(
        (
            r
            for r in cascade.read(cascade.topology.tier("quality").result_topic, "TierResult")
            if r["image_id"] in set(ids_2) | set(ids_3)
        ),
        key=lambda r: to_epoch_ms(r["produced_at"]),
    )
    versions = [r["model_version"] for r in quality_results]
    assert set(versions) <= {weak, new}
    assert versions == sorted(versions, key=lambda v: v == new), versions
    assert versions[0] == weak and versions[-1] == new, versions
    for image_id in all_ids:
        assert outputs[image_id]["model_versions"]["quality"] in {weak, new}

    # Lineage and the store: all annotations kept, holdout images never trained on.
    session = connect(cascade.settings.cassandra)
    stored = annotations_by_tier(session=session, tier="quality")
    assert {a["annotation_id"] for a in stored} == {a["annotation_id"] for a in sent}
    lineage = get_lineage(session=session, version=new)
    assert lineage is not None
    assert lineage["decision"] == "promoted" and lineage["parent_version"] == weak
    assert lineage["trigger"] == "count"
    assert set(lineage["annotation_ids"]) == {a["annotation_id"] for a in sent} - holdout_ids
    assert lineage["excluded"] == dict.fromkeys(holdout_ids, HOLDOUT_REASON)
    assert lineage["metrics"]["auroc"] > lineage["parent_metrics"]["auroc"]
    assert lineage_by_tier(session=session, tier="quality", limit=1)[0]["version"] == new

    # Figures (printed, and written when PHENOCASCADE_RESULTS_DIR is set; never asserted).
    started = lineage["started_at"].timestamp()
    during = [
        i for i in ids_2 if started <= to_epoch_ms(outputs[i]["produced_at"]) / 1000 <= promoted_at
    ]
    burst_done = max(to_epoch_ms(outputs[i]["produced_at"]) for i in burst) / 1000
    figures = {
        "annotation_to_promoted_s": round(promoted_at - annotated_at, 1),
        "retraining_s": round(promoted_at - started, 1),
        "idle_images_per_s": round(idle_rate, 3),
        "retraining_images_per_s": round(len(burst) / (burst_done - burst_submitted), 3),
        "burst_images": len(burst),
        "retraining_burst_finished_before_promotion": burst_done <= promoted_at,
        "outputs_during_retraining": len(during),
        "trickle_images": len(trickle),
        "statuses": dict(Counter(o["status"] for i, o in outputs.items() if i in set(all_ids))),
        "challenger_auroc": round(event["metrics"]["auroc"], 4),
        "champion_auroc": round(event["metrics"]["parent_auroc"], 4),
        "annotations": len(sent),
        "holdout_images": HOLDOUT,
        "budget": {"max_train": 24, "max_epochs": 2, **BUDGET.config},
        "quality_versions_while_streaming": {v: versions.count(v) for v in (weak, new)},
        "command": "PHENOCASCADE_RESULTS_DIR=benchmarks/results .venv/bin/pytest "
        "tests/integration/test_learning_loop.py -s",
    }
    print(json.dumps(figures, indent=2))
    results_dir = os.environ.get("PHENOCASCADE_RESULTS_DIR")
    if results_dir:
        Path(results_dir).mkdir(parents=True, exist_ok=True)
        (Path(results_dir) / "retraining_latency.json").write_text(
            json.dumps(figures, indent=2) + "\n"
        )
