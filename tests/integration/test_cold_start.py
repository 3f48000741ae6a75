"""Cold start on the real Kafka and Cassandra: a lab with images and no model at all.

A topology whose tiers have no champion runs as real processes: every image goes to
annotation with the tier's own class list. Experts answer through the annotation app's
HTTP API; the retraining consumer trains the gate's first model from those answers alone,
certifies and promotes it, and the running gate worker moves from "no model" to it
without a restart: the next images are scored by it.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from annotating import ExpertClient, serve
from harness import Cascade
from PIL import Image

from phenocascade.config import Settings, Topology, load_topology
from phenocascade.consumers.annotation_sink import AnnotationSink
from phenocascade.consumers.retrainer import Retrainer
from phenocascade.data import degrade
from phenocascade.data.labelled import load_pixels
from phenocascade.domain import NO_MODEL_VERSION, Sample
from phenocascade.learning import Budget, RecipeTrainer
from phenocascade.models.base import champion_version
from phenocascade.recipes.bundled_data import DSB_MAJORITY_CLASSES, split_ids
from phenocascade.store.cassandra import connect
from phenocascade.store.users import add_user
from phenocascade.ui.app import create_app
from phenocascade.ui.security import hash_password

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLEAR, UNCLEAR = 12, 8
PASSWORD = "cold-start-password"


def _cold_topology(tag: str) -> Topology:
    """The packaged gate and majority tiers, on artifacts nobody has trained yet."""
    data = load_topology().model_dump()
    gate, majority = data["tiers"][0], data["tiers"][1]
    gate["artifact"] = f"cold-{tag}-quality"
    majority["artifact"] = f"cold-{tag}-majority"
    majority["labels"] = list(DSB_MAJORITY_CLASSES)
    data["tiers"] = [gate, majority]
    return Topology.model_validate(data)


def _images(settings: Settings, folder: Path, start: int) -> tuple[list[Path], set[str]]:
    """Write DSB training images, clear and severely degraded, as PNG files.

    Returns the files and the names of the unclear ones.
    """
    ids = split_ids(settings, "dsb2018", "train")[start : start + CLEAR + UNCLEAR]
    paths, unclear = [], set()
    for k, image_id in enumerate(ids):
        sample = Sample(image_id, settings.datasets / "dsb2018" / "images" / f"{image_id}.png")
        pixels = load_pixels(sample)
        name = f"img{start + k:03d}.png"
        if k >= CLEAR:
            pixels = degrade.apply(pixels, degrade.SEVERE[k % len(degrade.SEVERE)], k)
            unclear.add(name)
        grey = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
        Image.fromarray(np.ascontiguousarray(grey)).save(folder / name)
        paths.append(folder / name)
    return paths, unclear


def _wait(predicate, timeout_s: float, what: str, cascade: Cascade):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        assert all(cascade.alive().values()), f"a process died\n{cascade.log_tail()}"
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}\n{cascade.log_tail()}")


def test_a_cascade_without_models_asks_experts_then_learns_its_first_model(
    infra: Settings, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:6]
    settings = infra.model_copy(
        update={"artifacts": tmp_path / "artifacts", "home": tmp_path / "home"}
    )
    # A keyspace of its own: the retrainer reads every annotation of its tier, and a
    # keyspace kept from earlier runs holds theirs too.
    keyspace = f"phenocascade_cold_{tag}"
    cascade = Cascade(
        settings, tmp_path / "cascade", topology=_cold_topology(tag), keyspace=keyspace
    )
    topology = cascade.topology
    gate = topology.tiers[0]
    first, unclear = _images(settings, cascade.roots, 0)
    cascade.start()
    try:
        ids = cascade.submit(first, prefix="a-")
        names = {i: p.name for i, p in zip(ids, first, strict=True)}
        counts = cascade.wait_until_done(ids, timeout_s=300)
        assert counts == Counter({i: 1 for i in ids}), cascade.log_tail()
        outputs = [o for o in cascade.outputs() if o["image_id"] in set(ids)]
        assert {o["status"] for o in outputs} == {"awaiting_annotation"}
        assert {o["model_versions"][gate.name] for o in outputs} == {NO_MODEL_VERSION}
        requests = cascade.read(topology.annotate_topic, "AnnotationRequest")
        assert {r["image_id"] for r in requests} == set(ids)
        assert {tuple(r["classes"]) for r in requests} == {("clear",)}

        # The experts: tasks through the sink, answers through the app's API.
        session = connect(cascade.settings.cassandra)
        sink = AnnotationSink(
            settings=cascade.settings,
            topology=topology,
            session=session,
        )
        assert sink.run(threading.Event(), until_caught_up=True).created == len(ids)
        username = f"expert-{tag}"
        add_user(
            session=session,
            username=username,
            password_hash=hash_password(PASSWORD),
            role="annotator",
            studies=[f"{cascade.prefix}it"],
        )
        app = create_app(cascade.settings, topology, session=session)
        with serve(app) as base_url, httpx.Client(base_url=base_url, timeout=60) as client:
            expert = ExpertClient(client, username, PASSWORD)
            tasks = expert.tasks(gate.name, f"{cascade.prefix}it")
            assert {t["image_id"] for t in tasks} == set(ids)
            for task in tasks:
                clear = names[task["image_id"]] not in unclear
                expert.annotate(gate.name, task["image_id"], ["clear"] if clear else [])

        # The answers complete the outputs, each naming its expert: the unclear images are
        # unusable; the clear ones re-entered and now wait for the majority tier (no model).
        def answered() -> dict[str, dict[str, Any]]:
            latest = {o["image_id"]: o for o in cascade.outputs() if o["image_id"] in names}
            done = {i: o for i, o in latest.items() if o["annotators"]}
            return done if len(done) == len(ids) else {}

        final = _wait(answered, 180, "the outputs the experts completed", cascade)
        for image_id, output in final.items():
            assert output["annotators"] == {gate.name: username}
            assert output["expert_labels"] == ["clear"]
            if names[image_id] in unclear:
                assert output["status"] == "unusable" and output["pending"] == []
            else:
                assert output["status"] == "awaiting_annotation"
                assert sorted(output["pending"]) == sorted(DSB_MAJORITY_CLASSES)

        # The retrainer trains, certifies and promotes the gate's first model.
        trainer = RecipeTrainer(
            cascade.settings,
            budget=Budget(max_epochs=3, config={"input_size": 96, "batch_size": 8}),
            topology=topology,
        )
        retrainer = Retrainer(
            settings=cascade.settings,
            topology=topology,
            trainer=trainer,
            every=len(ids),
            tiers=[gate.name],
            session=session,
        )
        stats = retrainer.run(threading.Event(), until_caught_up=True)
        assert [o.decision for o in stats.outcomes] == ["promoted"], stats
        outcome = stats.outcomes[0]
        assert outcome.parent_version == ""
        assert champion_version(settings.artifacts, gate.artifact) == outcome.version
        assert len(outcome.annotation_ids) == len(ids)
        # Without a dataset, one in four annotated images is the holdout it is certified on.
        assert 0 < len(trainer.holdout(gate.artifact)) < len(ids)

        # The running gate worker serves it now: the next images are scored by it.
        second, _ = _images(settings, cascade.roots, CLEAR + UNCLEAR)
        later = cascade.submit(second[:6], prefix="b-")
        cascade.wait_until_done(later, timeout_s=300)
        scored = _wait(
            lambda: [
                r
                for r in cascade.read(gate.result_topic, "TierResult")
                if r["image_id"] in set(later)
            ],
            120,
            "the later images' gate results",
            cascade,
        )
        assert {r["model_version"] for r in scored} == {outcome.version}
        assert all("clear" in r["scores"] for r in scored)
    finally:
        cascade.stop()
        connect(cascade.settings.cassandra).execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
