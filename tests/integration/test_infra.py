"""The local JVM services, and real round trips through whatever the fixtures provide."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import WhiteListRoundRobinPolicy
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from phenocascade.config import KafkaSettings, Settings
from phenocascade.errors import InfraError
from phenocascade.infra.local import SERVICES, status, up

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_settings() -> Settings:
    if shutil.which("java") is None:
        pytest.skip("the local services need java (and mvn on the first start)")
    return Settings()


def test_up_twice_keeps_the_same_processes(local_settings: Settings) -> None:
    first = up(local_settings)
    second = up(local_settings)
    for name in SERVICES:
        assert first[name].pid is not None, f"{name} is not served by phenocascade's own JVM"
        assert second[name].pid == first[name].pid
        assert second[name].ready


def test_status_says_ready_and_services_listen_on_loopback_only(local_settings: Settings) -> None:
    up(local_settings)
    statuses = status(local_settings)
    for name in SERVICES:
        s = statuses[name]
        assert s.running and s.listening and s.ready, s
        assert s.log.is_file()
        assert s.pid is not None
        listening = [
            c.laddr.ip
            for c in psutil.Process(s.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening, f"{name} listens on no port"
        assert all(_is_loopback(ip) for ip in listening), f"{name} listens on {listening}"


def _free_port_below_a_taken_one() -> tuple[int, socket.socket]:
    """Return a free port p and a listening socket that holds p + 1."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        holder = socket.socket()
        try:
            holder.bind(("127.0.0.1", port + 1))
        except OSError:
            holder.close()
            continue
        holder.listen()
        return port, holder
    raise RuntimeError("no pair of adjacent free ports found")


def test_a_service_that_dies_while_starting_is_reported_with_its_log(
    local_settings: Settings, tmp_path: Path
) -> None:
    # Kafka's controller listens on the client port + 1; holding that port makes it exit.
    port, holder = _free_port_below_a_taken_one()
    settings = Settings(home=tmp_path, kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"))
    with holder, pytest.raises(InfraError, match="exited while starting") as excinfo:
        up(settings, services=("kafka",), timeout_s=120)
    assert f"127.0.0.1:{port + 1}: Address already in use" in str(excinfo.value)
    assert status(settings)["kafka"].pid is None


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    # A JVM bound to 127.0.0.1 on a dual-stack socket reports ::ffff:127.0.0.1.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


@pytest.fixture
def topic(kafka_settings: Settings) -> Iterator[str]:
    admin = AdminClient(kafka_settings.kafka.config())
    name = f"test-infra-{uuid.uuid4().hex[:8]}"
    for future in admin.create_topics([NewTopic(name, num_partitions=1)]).values():
        future.result(timeout=30)
    yield name
    for future in admin.delete_topics([name]).values():
        future.result(timeout=30)


def test_kafka_transaction_commits_and_aborted_records_stay_invisible(
    kafka_settings: Settings, topic: str
) -> None:
    producer = Producer(kafka_settings.kafka.config(**{"transactional.id": f"tx-{topic}"}))
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, key=b"k", value=f"committed-{i}".encode())
    producer.commit_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"aborted")
    producer.flush(30)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"committed-3")
    producer.commit_transaction(30)

    consumer = Consumer(
        kafka_settings.kafka.config(
            **{
                "group.id": f"g-{topic}",
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
            }
        )
    )
    consumer.subscribe([topic])
    seen: list[bytes] = []
    try:
        for _ in range(60):
            msg = consumer.poll(1.0)
            if msg is None:
                if len(seen) >= 4:
                    break
                continue
            assert msg.error() is None, msg.error()
            value = msg.value()
            assert value is not None
            seen.append(value)
    finally:
        consumer.close()
    assert seen == [b"committed-0", b"committed-1", b"committed-2", b"committed-3"]


def test_cql_round_trip(infra: Settings) -> None:
    cfg = infra.cassandra
    cluster = Cluster(
        cfg.hosts,
        port=cfg.port,
        protocol_version=5,
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=WhiteListRoundRobinPolicy(cfg.hosts)
            )
        },
    )
    keyspace = f"test_infra_{uuid.uuid4().hex[:8]}"
    session = cluster.connect()
    try:
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 1}"
        )
        session.execute(
            f"CREATE TABLE {keyspace}.images (id uuid PRIMARY KEY, labels list<text>, score float)"
        )
        image_id = uuid.uuid4()
        insert = session.prepare(
            f"INSERT INTO {keyspace}.images (id, labels, score) VALUES (?, ?, ?)"
        )
        session.execute(insert, (image_id, ["nucleus", "mitosis"], 0.75))
        row = session.execute(
            f"SELECT labels, score FROM {keyspace}.images WHERE id = %s", (image_id,)
        ).one()
        assert row is not None
        assert row.labels == ["nucleus", "mitosis"]
        assert row.score == pytest.approx(0.75)
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        cluster.shutdown()
