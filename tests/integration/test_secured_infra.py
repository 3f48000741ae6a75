"""Kafka with SASL/SCRAM over TLS and Cassandra with passwords and TLS, started by
``phenocascade infra up --secure`` beside the default infra, with the CA and credentials it
makes: the project's clients and the cascade work through them, and a client without the
right credentials is refused clearly."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Cascade, settings_env
from ports import listen_ports

from phenocascade.cli.demo import sample_images
from phenocascade.config import CassandraSettings, KafkaSettings, Settings, load_topology
from phenocascade.errors import InfraError
from phenocascade.infra.local import status
from phenocascade.recipes import ensure_bootstrap
from phenocascade.store.cassandra import connect, get_outputs
from phenocascade.streams.kafka import create_topics, group_consumer, transactional_producer

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _client_env(path: Path) -> dict[str, str]:
    """The settings ``infra up --secure`` wrote for clients (``export K='v'`` lines)."""
    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a running secured Kafka and Cassandra, with the right credentials.

    Both run in a home of their own, stopped at the end of the module; the default local
    infra is not touched.
    """
    for tool in ("java", "openssl"):
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode:
            pytest.skip(f"the secured infra needs {tool}")
    root = tmp_path_factory.mktemp("secured")
    # Kafka's controller takes the port above its client port.
    kafka_port, cql_port, storage_port = listen_ports([2, 1, 1])
    env = {
        **os.environ,
        "PHENOCASCADE_HOME": str(root / "home"),
        "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "PHENOCASCADE_CASSANDRA__PORT": str(cql_port),
    }
    command = [sys.executable, "-m", "phenocascade", "infra"]
    ports = ["--cassandra-storage-port", str(storage_port)]
    try:
        started = subprocess.run(
            [*command, "up", "--secure", "--timeout", "150", *ports],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=400,
            check=False,
        )
        assert started.returncode == 0, started.stderr
        assert "source " in started.stderr, started.stderr
        client = _client_env(root / "home/infra/secure/client.env")
        yield Settings(
            home=root / "home",
            kafka=KafkaSettings(
                bootstrap_servers=client["PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS"],
                client=json.loads(client["PHENOCASCADE_KAFKA__CLIENT"]),
            ),
            cassandra=CassandraSettings(
                port=int(client["PHENOCASCADE_CASSANDRA__PORT"]),
                username=client["PHENOCASCADE_CASSANDRA__USERNAME"],
                password=client["PHENOCASCADE_CASSANDRA__PASSWORD"],
                ssl_ca_file=Path(client["PHENOCASCADE_CASSANDRA__SSL_CA_FILE"]),
            ),
        )
    finally:
        subprocess.run([*command, "down"], env=env, cwd=root, timeout=120, check=False)


def test_secrets_are_random_and_readable_by_their_owner_only(secured: Settings) -> None:
    secure = secured.home / "infra/secure"
    assert stat.S_IMODE(secure.stat().st_mode) == 0o700
    for private in ("client.env", "secrets.json", "server.p12", "ca.key", "server.key"):
        assert stat.S_IMODE((secure / private).stat().st_mode) == 0o600, private
    # The services' configuration holds the keystore password: owner only, too.
    for config in ("kafka/server.properties", "cassandra/cassandra.yaml"):
        path = secured.home / "infra" / config
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, config
    keystore_password = json.loads((secure / "secrets.json").read_text())["keystore_password"]
    assert len(keystore_password) >= 24 and keystore_password in path.read_text()
    assert secured.kafka.client["sasl.username"] == "phenocascade"
    assert secured.cassandra.username == "phenocascade"


def test_both_services_answer_the_client_with_credentials(secured: Settings) -> None:
    statuses = status(secured)  # a real request each, over TLS, authenticated
    assert all(s.ready and s.running for s in statuses.values()), statuses
    assert "SASL_SSL://127.0.0.1" in (secured.home / "infra/kafka/server.properties").read_text()
    yaml_text = (secured.home / "infra/cassandra/cassandra.yaml").read_text()
    assert "authenticator: PasswordAuthenticator" in yaml_text
    assert "optional: false" in yaml_text


def test_topics_and_a_transaction_round_trip_with_credentials(secured: Settings) -> None:
    topology = load_topology().namespaced(f"sec{uuid.uuid4().hex[:8]}-")
    created = create_topics(secured.kafka, topology)
    assert topology.submitted_topic in created
    # A transaction's commit markers go broker to broker: the broker authenticates to itself.
    producer = transactional_producer(secured.kafka, f"tx-{topology.submitted_topic}")
    producer.begin_transaction()
    producer.produce(topology.submitted_topic, key=b"k", value=b"through SASL_SSL")
    producer.commit_transaction(30)
    consumer = group_consumer(secured.kafka, f"g-{topology.submitted_topic}")
    consumer.subscribe([topology.submitted_topic])
    seen: list[bytes | None] = []
    try:
        for _ in range(60):
            msg = consumer.poll(1.0)
            if msg is not None:
                assert msg.error() is None, msg.error()
                seen.append(msg.value())
                break
    finally:
        consumer.close()
    assert seen == [b"through SASL_SSL"]


def test_the_cascade_runs_through_the_secured_services(secured: Settings, tmp_path: Path) -> None:
    base = Settings()
    settings = secured.model_copy(update={"artifacts": base.artifacts, "datasets": base.datasets})
    ensure_bootstrap(settings)  # copies nothing when the models exist, as they should here
    # One worker per tier (the packaged topology runs two detectors): on two cores beside
    # four JVMs, every process that loads torch costs many seconds of start.
    topology = load_topology()
    topology = topology.model_copy(
        update={"tiers": [t.model_copy(update={"replicas": 1}) for t in topology.tiers]}
    )
    cascade = Cascade(settings, tmp_path / "cascade", topology)
    assert cascade.env["PHENOCASCADE_KAFKA__CLIENT"]  # the children get the credentials
    images = sample_images(settings, dsb=2, bccd=0, bbbc006_unclear=1, bbbc006_clear=0)
    cascade.start()
    try:
        ids = cascade.submit(images, prefix="sec-")
        counts = cascade.wait_until_done(ids, timeout_s=240)
    finally:
        cascade.stop()
    assert sorted(counts) == sorted(ids), cascade.log_tail()
    outputs = {o["image_id"]: o for o in cascade.outputs() if o["image_id"] in set(ids)}
    # Nuclei in focus pass the gate and reach both branches; the joiner merges all three.
    passed = [o for o in outputs.values() if o["routes"].get("quality") == "PASS"]
    assert passed, outputs
    for output in passed:
        assert {"quality", "majority", "minority"} <= set(output["model_versions"]), output
    session = connect(cascade.settings.cassandra, create_schema=False)
    try:
        for image_id in ids:
            rows = get_outputs(session=session, image_id=image_id)
            assert [r["status"] for r in rows] == [outputs[image_id]["status"]]
    finally:
        session.cluster.shutdown()


@pytest.mark.parametrize(
    ("client", "refusal"),
    [
        ({}, r"does not answer .*set security\.protocol and the credentials"),
        (
            {"sasl.password": "wrong"},
            r"refused the client's credentials \(.*SASL authentication error.*\); check sasl",
        ),
        ({"sasl.username": "nobody"}, r"refused the client's credentials"),
    ],
    ids=["no-credentials", "wrong-password", "unknown-user"],
)
def test_kafka_refuses_a_client_without_the_right_credentials(
    secured: Settings, client: dict[str, str], refusal: str
) -> None:
    conf = {**secured.kafka.client, **client} if client else {}
    kafka = secured.kafka.model_copy(update={"client": conf})
    topology = load_topology().namespaced(f"denied{uuid.uuid4().hex[:8]}-")
    with pytest.raises(InfraError, match=refusal) as refused:
        create_topics(kafka, topology, timeout_s=3)
    assert "\n" not in str(refused.value)
    assert "wrong" not in str(refused.value)  # the password is not echoed


def test_status_names_refused_credentials(secured: Settings) -> None:
    wrong = {**secured.kafka.client, "sasl.password": "wrong"}
    kafka = secured.kafka.model_copy(update={"client": wrong})
    with pytest.raises(InfraError, match=r"^kafka on 127\.0\.0\.1:\d+ refused the client"):
        status(secured.model_copy(update={"kafka": kafka}))
    plaintext = secured.kafka.model_copy(update={"client": {}})
    statuses = status(secured.model_copy(update={"kafka": plaintext}))
    assert statuses["kafka"].listening and not statuses["kafka"].ready


@pytest.mark.parametrize(
    ("changes", "refusal"),
    [
        (
            {"username": None, "password": None},
            r"requires a password .*; set PHENOCASCADE_CASSANDRA__USERNAME",
        ),
        ({"password": "wrong"}, r"refused the login of 'phenocascade' \(.*Bad credentials"),
        # The well-known default superuser was retired when the services were set up.
        (
            {"username": "cassandra", "password": "cassandra"},
            r"refused the login of 'cassandra' \(",
        ),
        (
            {"username": None, "password": None, "ssl_ca_file": None},
            r"does not answer .*if it requires TLS, set PHENOCASCADE_CASSANDRA__SSL_CA_FILE",
        ),
    ],
    ids=["no-credentials", "wrong-password", "default-superuser", "no-tls"],
)
def test_cassandra_refuses_a_client_without_the_right_credentials(
    secured: Settings, changes: dict[str, object], refusal: str
) -> None:
    cassandra = secured.cassandra.model_copy(update=changes)
    with pytest.raises(InfraError, match=refusal) as refused:
        connect(cassandra)
    assert "\n" not in str(refused.value)


def test_the_command_line_says_a_refusal_in_one_line(secured: Settings, tmp_path: Path) -> None:
    env = settings_env(secured)
    env["PHENOCASCADE_KAFKA__CLIENT"] = env["PHENOCASCADE_KAFKA__CLIENT"].replace(
        secured.kafka.client["sasl.password"], "not-the-password"
    )
    done = subprocess.run(
        [sys.executable, "-m", "phenocascade", "topics", "create"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    # Before it, librdkafka's own log line of the failed authentication (at ERROR).
    last = done.stderr.splitlines()[-1]
    assert last.startswith("phenocascade: error: Kafka at 127.0.0.1:"), done.stderr
    assert "refused the client's credentials" in last
    assert "not-the-password" not in done.stderr
