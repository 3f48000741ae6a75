"""A replicated local cluster for the chaos drill, started and stopped with the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from phenocascade.config import CassandraSettings, KafkaSettings, Settings
from phenocascade.infra.local import start_node, stop_node
from phenocascade.infra.nodes import client_env

NODES = 3
# Apart from the default single node (9092, 9042, 7000) that the other tests use.
KAFKA_PORT, CASSANDRA_PORT, STORAGE_PORT = 29092, 29042, 27000


class LocalControl:
    """Kills and restarts nodes of the cluster in ``settings.home`` (a drill's ClusterControl)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def kill(self, service: str, node: int) -> None:
        """Kill -9 one node (a crash: no flush, no goodbye)."""
        stop_node(self.settings, service, node, kill=True)

    def start(self, service: str, node: int) -> None:
        """Start that node again on its data and wait until it answers."""
        start_node(self.settings, service, node)


def _cli(env: dict[str, str], *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "phenocascade", "infra", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"infra {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")


@contextmanager
def local_cluster(home: Path) -> Iterator[tuple[Settings, LocalControl]]:
    """Start ``phenocascade infra up --nodes 3`` in ``home``; yield client settings and control.

    The settings name every broker and Cassandra node, with the keyspace at RF 3; the
    datasets and artifacts folders are this process's. The cluster is stopped afterwards.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHENOCASCADE_")}
    env.update(
        {
            "PHENOCASCADE_HOME": str(home),
            "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{KAFKA_PORT}",
            "PHENOCASCADE_CASSANDRA__PORT": str(CASSANDRA_PORT),
        }
    )
    for name in ("PHENOCASCADE_DATASETS", "PHENOCASCADE_INFRA_CACHE"):
        if name in os.environ:
            env[name] = os.environ[name]
    node_1 = Settings().model_copy(
        update={
            "home": home,
            "kafka": KafkaSettings(bootstrap_servers=f"127.0.0.1:{KAFKA_PORT}"),
            "cassandra": CassandraSettings(port=CASSANDRA_PORT),
        }
    )
    client = client_env(node_1, NODES)
    settings = node_1.model_copy(
        update={
            "kafka": KafkaSettings(
                bootstrap_servers=client["PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS"]
            ),
            "cassandra": CassandraSettings(
                hosts=json.loads(client["PHENOCASCADE_CASSANDRA__HOSTS"]),
                port=CASSANDRA_PORT,
                replication_factor=int(client["PHENOCASCADE_CASSANDRA__REPLICATION_FACTOR"]),
            ),
        }
    )
    try:
        _cli(
            env,
            "up",
            "--nodes",
            str(NODES),
            "--cassandra-storage-port",
            str(STORAGE_PORT),
            "--timeout",
            "600",
        )
        yield settings, LocalControl(settings)
    finally:
        _cli(env, "down")
