"""The chaos suite: the cascade on a replicated cluster holds exactly once through faults.

``phenocascade infra up --nodes 3`` (3 Kafka brokers, topics at RF 3 with
``min.insync.replicas=2``; 3 Cassandra nodes, the keyspace at RF 3, quorum writes), then
the drill of :mod:`drill`: 500 images streamed over 200 s through a cascade run by
``phenocascade run``'s supervisor, while every one of its processes is killed -9 once, a
Kafka broker is killed and restarted, a Cassandra node is down for 30 s, and the
retrainer promotes a quality challenger (the last 50 images wait for it). Bounded: about
10 minutes on two cores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import LocalControl, local_cluster
from drill import run_drill

from phenocascade.config import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.chaos]

IMAGES = 500


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, LocalControl]]:
    with local_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


def test_every_image_gets_exactly_one_output_through_kills_and_node_outages(
    cluster: tuple[Settings, LocalControl], tmp_path: Path
) -> None:
    settings, control = cluster
    report = run_drill(settings, tmp_path, control=control, images=IMAGES, stream_s=200.0)
    figures = report.as_dict()
    print(figures)

    # The faults the suite promises were injected.
    kinds = Counter(f.kind for f in report.faults)
    kills = {k.removeprefix("kill_") for k in kinds if k.startswith("kill_")}
    assert kills == set(report.processes), kinds
    assert {"quality", "majority", "minority", "joiner", "sink", "retrainer"} <= kills
    assert kinds["kafka_broker_restart"] == 1 and kinds["cassandra_node_down"] == 1
    # The supervisor restarted each killed process (a process that exits on its own when
    # a node goes is restarted too, and counted).
    assert all(report.restarts.get(k, 0) >= 1 for k in kills), report.restarts

    # Exactly once: every image has one output from the models, none twice, and the
    # store holds what the results topic holds.
    assert report.images == IMAGES
    assert report.lost == 0 and report.duplicated == 0, figures
    assert report.cassandra_matches_topic, figures
    assert sum(report.statuses.values()) == IMAGES
    # Each restarted consumer resumed from its group's commits: no group is behind.
    assert all(lag <= 1 for lag in report.lag.values()), report.lag  # 1: a marker

    # The retrainer promoted its challenger mid-stream, and the gate moved to it for good.
    assert report.promoted is not None
    assert report.switched_mid_stream, figures["gate_versions"]
    # Every fault was recovered from: each killed part produced again.
    assert all(v is not None for v in report.recovery_s.values()), report.recovery_s
