"""Session fixtures that give integration tests a real Kafka and a real Cassandra.

Where a Docker engine answers (``docker info`` succeeds), throw-away containers are started
with testcontainers. Otherwise the local JVM services are started with
:func:`phenocascade.infra.local.up`, which is idempotent: it reuses what ``phenocascade infra
up`` (or CI) already started, and leaves them running after the session.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest

from phenocascade.config import CassandraSettings, KafkaSettings, Settings
from phenocascade.infra.local import up

# Kafka 4.1 (Confluent Platform 8.1): testcontainers' KafkaContainer drives the Confluent
# image's start scripts, not apache/kafka's.
KAFKA_IMAGE = "confluentinc/cp-kafka:8.1.0"
CASSANDRA_IMAGE = "cassandra:5.0"


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        probe = subprocess.run(["docker", "info"], capture_output=True, timeout=20, check=False)
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0


@pytest.fixture(scope="session")
def use_docker() -> bool:
    """Whether the session runs its services in Docker (else as local JVMs)."""
    return _docker_answers()


@pytest.fixture(scope="session")
def kafka_settings(use_docker: bool) -> Iterator[Settings]:
    """Settings whose ``kafka`` points at a running broker with working transactions."""
    if not use_docker:
        settings = Settings()
        up(settings, services=("kafka",))
        yield settings
        return
    from testcontainers.community.kafka import KafkaContainer

    container = (
        KafkaContainer(KAFKA_IMAGE)
        .with_kraft()
        # One broker: the transaction log must live with one replica, or transactions hang.
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
    )
    with container:
        kafka = KafkaSettings(bootstrap_servers=container.get_bootstrap_server())
        yield Settings(kafka=kafka)


@pytest.fixture(scope="session")
def infra(kafka_settings: Settings, use_docker: bool) -> Iterator[Settings]:
    """Settings whose ``kafka`` and ``cassandra`` both point at running services."""
    if not use_docker:
        up(kafka_settings, services=("cassandra",))
        yield kafka_settings
        return
    from testcontainers.community.cassandra import CassandraContainer

    with CassandraContainer(CASSANDRA_IMAGE) as container:
        host, port = container.get_contact_points()[0]
        cassandra = CassandraSettings(hosts=[host], port=port)
        yield kafka_settings.model_copy(update={"cassandra": cassandra})
