"""``phenocascade infra up --nodes 3``: a replicated Kafka and Cassandra on loopback that
keep accepting writes while one node of each is killed, take the node back, and stop
entirely with ``infra down``. The cluster runs in a home and on ports of its own, beside
the default single-node infra."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy
from cassandra.query import SimpleStatement
from confluent_kafka import Consumer, KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from harness import until_cassandra_answers
from ports import listen_ports

from phenocascade.config import CassandraSettings, KafkaSettings, Settings
from phenocascade.infra.local import node_pid, start_node, status, stop_node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_CASSANDRA_HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


def _exports(stdout: str) -> dict[str, str]:
    """The ``export K=V`` lines ``infra up --nodes 3`` prints for clients."""
    values = {}
    for line in stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0]
    return values


def _our_jvms(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(home) in arg for arg in cmdline) and "java" in Path(cmdline[0]).name:
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], dict[str, str]]]:
    """The ``phenocascade infra`` command and the environment of the cluster's own home."""
    if subprocess.run(["which", "java"], capture_output=True, check=False).returncode:
        pytest.skip("the local cluster needs java")
    root = tmp_path_factory.mktemp("cluster")
    # Three Kafka nodes take a client and a controller port each.
    kafka_port, cql_port, storage_port = listen_ports([6, 1, 1], hosts=_CASSANDRA_HOSTS)
    env = {
        **os.environ,
        "PHENOCASCADE_HOME": str(root / "home"),
        "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "PHENOCASCADE_CASSANDRA__PORT": str(cql_port),
        "PHENOCASCADE_STORAGE_PORT": str(storage_port),
    }
    command = [sys.executable, "-m", "phenocascade", "infra"]
    try:
        yield command, env
    finally:
        subprocess.run([*command, "down"], env=env, cwd=root, timeout=180, check=False)
        for proc in _our_jvms(root / "home"):  # whatever a failed `down` left
            proc.kill()


@pytest.fixture(scope="module")
def cluster(cli: tuple[list[str], dict[str, str]]) -> Settings:
    """Settings of the running 3-node cluster, from what ``infra up --nodes 3`` printed."""
    command, env = cli
    home = Path(env["PHENOCASCADE_HOME"])
    storage = ["--cassandra-storage-port", env["PHENOCASCADE_STORAGE_PORT"]]
    started = time.monotonic()
    done = subprocess.run(
        [*command, "up", "--nodes", "3", "--timeout", "240", *storage],
        env=env,
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    print(f"infra up --nodes 3: {time.monotonic() - started:.1f} s")
    exported = _exports(done.stdout)
    kafka_port = int(env["PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS"].rpartition(":")[2])
    assert exported["PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS"] == ",".join(
        f"127.0.0.1:{kafka_port + step}" for step in (0, 2, 4)
    )
    assert exported["PHENOCASCADE_CASSANDRA__HOSTS"] == '["127.0.0.1","127.0.0.2","127.0.0.3"]'
    assert exported["PHENOCASCADE_CASSANDRA__REPLICATION_FACTOR"] == "3"
    return Settings(
        home=home,
        kafka=KafkaSettings(bootstrap_servers=exported["PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS"]),
        cassandra=CassandraSettings(
            hosts=list(_CASSANDRA_HOSTS),
            port=int(exported["PHENOCASCADE_CASSANDRA__PORT"]),
            replication_factor=3,
        ),
    )


def test_every_node_runs_answers_and_listens_on_its_own_address(cluster: Settings) -> None:
    statuses = status(cluster)
    names = [f"{service}-{i}" for service in ("kafka", "cassandra") for i in (1, 2, 3)]
    assert sorted(statuses) == sorted(names)
    assert all(s.ready and s.running for s in statuses.values()), statuses
    for index, host in enumerate(_CASSANDRA_HOSTS, start=1):
        node = statuses[f"cassandra-{index}"]
        assert node.host == host
        pid = node_pid(cluster, "cassandra", index)
        assert pid == node.pid
        listening = {
            c.laddr.ip
            for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
        assert {ip.removeprefix("::ffff:") for ip in listening} == {host}, listening


def _isr_sizes(admin: AdminClient, topic: str) -> list[int]:
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    return [len(p.isrs) for p in partitions.values()]


def _wait_isr(admin: AdminClient, topic: str, size: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (sizes := _isr_sizes(admin, topic)) != [size] * len(sizes):
        assert time.monotonic() < deadline, f"ISR sizes {sizes}, expected all {size}"
        time.sleep(0.5)


def _produce(settings: Settings, topic: str, values: list[bytes]) -> None:
    producer = Producer(settings.kafka.config(acks="all", **{"enable.idempotence": True}))
    failed: list[str] = []

    def delivered(error: KafkaError | None, _msg: Message) -> None:
        if error is not None:
            failed.append(error.str())

    for value in values:
        producer.produce(topic, value=value, on_delivery=delivered)
    assert producer.flush(60) == 0, "records still unacknowledged after 60 s"
    assert not failed, failed


def _consume(settings: Settings, topic: str, count: int) -> list[bytes]:
    consumer = Consumer(
        settings.kafka.config(
            **{"group.id": f"g-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"}
        )
    )
    consumer.subscribe([topic])
    seen: list[bytes] = []
    try:
        deadline = time.monotonic() + 60
        while len(seen) < count and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None:
                assert msg.error() is None, msg.error()
                value = msg.value()
                assert value is not None
                seen.append(value)
    finally:
        consumer.close()
    return seen


def test_kafka_keeps_every_acknowledged_record_through_a_killed_broker(cluster: Settings) -> None:
    admin = AdminClient(cluster.kafka.config())
    topic = f"cluster-{uuid.uuid4().hex[:8]}"
    # replication_factor -1: the brokers' default, as the project's create_topics does.
    for future in admin.create_topics([NewTopic(topic, num_partitions=3)]).values():
        future.result(timeout=30)
    _wait_isr(admin, topic, 3, timeout_s=30)
    before = [f"before-{i}".encode() for i in range(10)]
    _produce(cluster, topic, before)

    stop_node(cluster, "kafka", 2, kill=True)
    assert node_pid(cluster, "kafka", 2) is None
    # Two replicas in sync are enough for acks=all (min.insync.replicas=2).
    during = [f"during-{i}".encode() for i in range(10)]
    _produce(cluster, topic, during)
    assert sorted(_consume(cluster, topic, 20)) == sorted(before + during)

    restarted = start_node(cluster, "kafka", 2)
    assert restarted.ready and restarted.pid is not None
    _wait_isr(admin, topic, 3, timeout_s=60)  # it caught up from the others


def test_cassandra_writes_at_quorum_with_a_killed_node(cluster: Settings) -> None:
    cfg = cluster.cassandra
    # SimpleSnitch puts every node in datacenter1.
    policy = TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc="datacenter1"))
    driver = Cluster(
        cfg.hosts,
        port=cfg.port,
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: ExecutionProfile(load_balancing_policy=policy)},
    )
    session = driver.connect()
    keyspace = f"cluster_{uuid.uuid4().hex[:8]}"
    try:
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 3}"
        )
        session.execute(f"CREATE TABLE {keyspace}.kv (k int PRIMARY KEY, v text)")
        insert = session.prepare(f"INSERT INTO {keyspace}.kv (k, v) VALUES (?, ?)")
        insert.consistency_level = ConsistencyLevel.QUORUM

        stop_node(cluster, "cassandra", 3, kill=True)
        assert node_pid(cluster, "cassandra", 3) is None
        for k in range(20):  # every row has a replica on the dead node (RF 3 of 3)
            session.execute(insert, (k, f"v{k}"))
        quorum = SimpleStatement(
            f"SELECT k, v FROM {keyspace}.kv", consistency_level=ConsistencyLevel.QUORUM
        )
        # A range read may still pick node 3 as a replica and time out until the
        # coordinator's failure detector convicts it (some seconds, more under load), as
        # any client sees; after that, two live replicas of three answer every range.
        rows = until_cassandra_answers(
            lambda: session.execute(quorum, timeout=30), "QUORUM read", 90
        )
        assert {(r.k, r.v) for r in rows} == {(k, f"v{k}") for k in range(20)}

        restarted = start_node(cluster, "cassandra", 3)
        assert restarted.ready and restarted.host == "127.0.0.3"
        # ALL needs the restarted node to answer too: it is back in the ring. Unavailable
        # until the coordinator's gossip sees node 3 up again.
        every = SimpleStatement(
            f"SELECT v FROM {keyspace}.kv WHERE k = 7", consistency_level=ConsistencyLevel.ALL
        )
        row = until_cassandra_answers(
            lambda: session.execute(every).one(), "CL=ALL read of node 3", 90
        )
        assert row.v == "v7"
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")
        driver.shutdown()


def test_down_stops_every_node(cluster: Settings, cli: tuple[list[str], dict[str, str]]) -> None:
    command, env = cli
    done = subprocess.run(
        [*command, "down"],
        env=env,
        cwd=cluster.home.parent,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert _our_jvms(cluster.home) == []
    statuses = status(cluster)
    assert len(statuses) == 6
    assert not any(s.running or s.listening for s in statuses.values()), statuses
