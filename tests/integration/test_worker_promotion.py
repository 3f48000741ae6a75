"""A worker misses no promotion announced while it starts, on the real Kafka.

Loading a champion takes up to a minute on a loaded machine. A promotion announced in that
minute (found by the chaos drill: a gate restarted just before its challenger's promotion
served the old model for the rest of the stream) must reach the worker once it serves.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, cast

import pytest

from phenocascade.config import Settings, load_topology
from phenocascade.consumers.worker import TierWorker
from phenocascade.models.base import Stage
from phenocascade.streams.kafka import create_topics, plain_producer
from phenocascade.streams.serde import EventCodec

pytestmark = [pytest.mark.integration]


class _Model:
    """As much of a stage as a worker needs to name what it serves."""

    model_name = "stub"

    def __init__(self, version: str) -> None:
        self.version = version


def test_a_promotion_announced_while_the_champion_loads_is_applied(infra: Settings) -> None:
    topology = load_topology().namespaced(f"wp{uuid.uuid4().hex[:8]}-")
    create_topics(infra.kafka, topology)
    tier = topology.tiers[0]
    stop = threading.Event()
    loaded: list[str | None] = []

    def load(version: str | None) -> Stage:
        loaded.append(version)
        if version is None:  # the champion, while which the retrainer promotes v2
            producer = plain_producer(infra.kafka)
            record: dict[str, Any] = {
                "tier": tier.artifact,
                "version": "v2",
                "parent_version": "v1",
                "metrics": {},
                "promoted_at": 0,
            }
            producer.produce(
                topology.models_topic,
                key=tier.artifact.encode(),
                value=EventCodec().encode("ModelPromoted", record),
            )
            assert producer.flush(30) == 0
            return cast(Stage, _Model("v1"))
        stop.set()  # the swap: enough
        return cast(Stage, _Model(version))

    worker = TierWorker(
        settings=infra, topology=topology, tier=tier, instance="0", stage_loader=load
    )
    timer = threading.Timer(60, stop.set)  # a safety net: the swap sets it at once
    timer.start()
    try:
        stats = worker.run(stop)
    finally:
        timer.cancel()
    assert loaded == [None, "v2"]
    assert stats.swaps == ["v2"]
    assert worker.stage is not None and worker.stage.version == "v2"
