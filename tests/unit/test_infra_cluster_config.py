"""A local cluster's per-node configuration (no JVM is started) and its refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from phenocascade.config import CassandraSettings, KafkaSettings, Settings
from phenocascade.errors import ConfigError, InfraError
from phenocascade.infra import local
from phenocascade.infra.nodes import (
    cassandra_token,
    client_env,
    cluster_nodes,
    kafka_properties,
    settle_size,
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:19092"),
        cassandra=CassandraSettings(port=19042),
    )


def _properties(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line and line[0] != "#")
    return {key: value for key, value in pairs}


def _render_kafka(settings: Settings, size: int) -> list[dict[str, str]]:
    rendered = []
    nodes = cluster_nodes(settings, "kafka", size)
    for node in nodes:
        node.home.mkdir(parents=True)
        path = local._render(
            "kafka",
            "server.properties",
            node.home,
            listener="PLAINTEXT",
            **kafka_properties(node, nodes),
        )
        rendered.append(_properties(path.read_text()))
    return rendered


def test_three_kafka_nodes_form_one_quorum_on_their_own_ports(settings: Settings) -> None:
    rendered = _render_kafka(settings, 3)
    voters = "1@127.0.0.1:19093,2@127.0.0.1:19095,3@127.0.0.1:19097"
    for index, (props, port) in enumerate(
        zip(rendered, (19092, 19094, 19096), strict=True), start=1
    ):
        assert props["node.id"] == str(index)
        assert props["controller.quorum.voters"] == voters
        assert props["listeners"] == (
            f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{port + 1}"
        )
        assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{port}"
        assert props["log.dirs"] == str(settings.home.resolve() / f"infra/kafka/node{index}/data")
        for key in (
            "default.replication.factor",
            "offsets.topic.replication.factor",
            "transaction.state.log.replication.factor",
            "share.coordinator.state.topic.replication.factor",
        ):
            assert props[key] == "3", key
        for key in (
            "min.insync.replicas",
            "transaction.state.log.min.isr",
            "share.coordinator.state.topic.min.isr",
        ):
            assert props[key] == "2", key


def test_a_single_kafka_node_keeps_its_layout_and_one_replica(settings: Settings) -> None:
    (props,) = _render_kafka(settings, 1)
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["log.dirs"] == str(settings.home.resolve() / "infra/kafka/data")
    assert props["default.replication.factor"] == props["min.insync.replicas"] == "1"


def test_cassandra_nodes_take_their_own_address_and_an_even_share_of_the_ring(
    settings: Settings,
) -> None:
    nodes = cluster_nodes(settings, "cassandra", 3)
    assert [n.host for n in nodes] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert {n.port for n in nodes} == {19042}
    tokens = [cassandra_token(n) for n in nodes]
    assert tokens == [-(2**63), -(2**63) + 2**64 // 3, -(2**63) + 2 * 2**64 // 3]
    assert all(-(2**63) <= t < 2**63 for t in tokens)
    for node, token in zip(nodes, tokens, strict=True):
        node.home.mkdir(parents=True)
        yaml_text = local._render(
            "cassandra",
            "cassandra.yaml",
            node.home,
            address=node.host,
            initial_token=token,
            native_port=node.port,
            storage_port=17000,
            data_dir=node.home / "data",
            authenticator="AllowAllAuthenticator",
        ).read_text()
        assert f"listen_address: {node.host}\n" in yaml_text
        assert f"rpc_address: {node.host}\n" in yaml_text
        assert f"initial_token: {token}\n" in yaml_text
        assert "num_tokens: 1\n" in yaml_text
        assert "auto_bootstrap: false\n" in yaml_text
        assert "endpoint_snitch: SimpleSnitch\n" in yaml_text
        assert '- seeds: "127.0.0.1:17000"' in yaml_text
        assert f"{node.home}/data/commitlog" in yaml_text


def test_a_single_cassandra_node_keeps_token_0_and_its_folder(settings: Settings) -> None:
    (node,) = cluster_nodes(settings, "cassandra", 1)
    assert cassandra_token(node) == 0
    assert node.home == settings.home.resolve() / "infra/cassandra"
    assert node.name == "cassandra"


def test_clients_are_told_every_node(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    env = client_env(settings, 3)
    assert env["PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS"] == (
        "127.0.0.1:19092,127.0.0.1:19094,127.0.0.1:19096"
    )
    assert json.loads(env["PHENOCASCADE_CASSANDRA__HOSTS"]) == [
        "127.0.0.1",
        "127.0.0.2",
        "127.0.0.3",
    ]
    assert env["PHENOCASCADE_CASSANDRA__REPLICATION_FACTOR"] == "3"
    # Exported, they are read back as the same cluster: node 1 stays node 1.
    for key, value in {**env, "PHENOCASCADE_HOME": str(settings.home)}.items():
        monkeypatch.setenv(key, value)
    exported = Settings()
    assert exported.cassandra.hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert exported.cassandra.replication_factor == 3
    for service in ("kafka", "cassandra"):
        assert cluster_nodes(exported, service, 3) == cluster_nodes(settings, service, 3)


def test_the_size_is_remembered_and_another_size_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "infra"
    assert settle_size(root, 3) == 3
    assert settle_size(root, None) == 3
    with pytest.raises(
        ConfigError, match=r"holds a local infra of 3 node\(s\), not 1; use a fresh"
    ):
        settle_size(root, 1)
    with pytest.raises(ConfigError, match="--nodes must be 1 to 5, not 6"):
        settle_size(tmp_path / "other", 6)


def test_a_home_from_before_clusters_counts_as_one_node(tmp_path: Path) -> None:
    root = tmp_path / "infra"
    (root / "kafka" / "data").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"holds a local infra of 1 node\(s\), not 3"):
        settle_size(root, 3)
    assert settle_size(root, None) == 1


def test_up_refuses_a_secured_cluster_before_starting_anything(settings: Settings) -> None:
    security = local.Security(
        keystore=Path("/missing"),
        keystore_password="x",
        ca_file=Path("/missing"),
        kafka_users={"u": "p"},
    )
    with pytest.raises(ConfigError, match="a secured local cluster is not supported"):
        local.up(settings, security=security, nodes=3)
    assert not (settings.home / "infra").exists()


def test_a_node_outside_the_cluster_is_named(settings: Settings) -> None:
    settle_size(settings.home.resolve() / "infra", 3)
    assert local.node_pid(settings, "kafka", 3) is None
    with pytest.raises(InfraError, match=r"kafka node 4 does not exist: .* has 3 node\(s\)"):
        local.node_pid(settings, "kafka", 4)
    with pytest.raises(InfraError, match="unknown service"):
        local.stop_node(settings, "zookeeper", 1, kill=True)
    with pytest.raises(InfraError, match=r"cassandra-2 has no usable .*command\.json"):
        local.start_node(settings, "cassandra", 2, timeout_s=1)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PHENOCASCADE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "phenocascade", "infra", *args],
        env=env,
        cwd=home.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("up", "--nodes", "3", "--secure"), "--secure starts one node per service"),
        (("up", "--nodes", "1"), r"holds a local infra of 3 node\(s\), not 1; use a fresh"),
    ],
    ids=["secure", "other-size"],
)
def test_the_command_line_refuses_in_one_line(
    tmp_path: Path, args: tuple[str, ...], error: str
) -> None:
    home = tmp_path / "home"
    settle_size(home / "infra", 3)
    done = _cli(home, *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("phenocascade: error: ")
    assert re.search(error, line), line
    assert not (home / "infra" / "secure").exists()
