"""Where each node of the local services lives, which addresses it takes, and its settings.

Pure bookkeeping for :mod:`phenocascade.infra.local`: no process is started here.

One node per service (the default) keeps the layout of a single-node home:
``<settings.home>/infra/<service>/``. A cluster of ``n`` nodes (``infra up --nodes n``)
puts node ``i`` (1-based) in ``<settings.home>/infra/<service>/node<i>/``, and remembers
``n`` in ``<settings.home>/infra/cluster.json`` so that ``down``, ``status`` and the
restart of one node need not be told again.

Addresses of node ``i``:

- Kafka: client port ``p + 2 (i - 1)`` and controller port one above it on 127.0.0.1,
  where ``p`` is the port of the first entry of ``settings.kafka.bootstrap_servers``.
- Cassandra: ``127.0.0.<i>`` (Linux routes all of 127/8 to loopback), with the same CQL
  port (``settings.cassandra.port``) and storage port on every node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from phenocascade.config import Settings
from phenocascade.errors import ConfigError, InfraError

__all__ = [
    "MAX_NODES",
    "Node",
    "cassandra_token",
    "client_env",
    "client_port",
    "cluster_nodes",
    "kafka_properties",
    "min_insync_replicas",
    "remembered_size",
    "replication_factor",
    "settle_size",
]

MAX_NODES = 5
"""The largest local cluster: each node is two JVMs' worth of a laptop's memory and cores."""

_KAFKA_PORT_STEP = 2  # each Kafka node takes its client port and the controller port above
_MIN_TOKEN = -(2**63)  # the Murmur3 ring runs from -2**63 to 2**63 - 1
_RING_SIZE = 2**64
_CLUSTER_FILE = "cluster.json"


@dataclass(frozen=True)
class Node:
    """One JVM of a local service.

    Attributes
    ----------
    service : str
        ``"kafka"`` or ``"cassandra"``.
    index : int
        1-based number of the node in its cluster (Kafka's ``node.id``).
    size : int
        How many nodes the cluster has (1: the single-node layout).
    home : pathlib.Path
        The node's folder: rendered configuration, ``data/``, ``logs/``, pid file.
    host : str
        The address the node's client port listens on.
    port : int
        The client port: Kafka's bootstrap port, Cassandra's CQL port.
    """

    service: str
    index: int
    size: int
    home: Path
    host: str
    port: int

    @property
    def name(self) -> str:
        """``"kafka"`` for a single node, ``"kafka-2"`` for node 2 of a cluster."""
        return self.service if self.size == 1 else f"{self.service}-{self.index}"

    @property
    def pid_file(self) -> Path:
        """The file that holds the pid of the JVM phenocascade started for this node."""
        return self.home / f"{self.service}.pid"

    @property
    def controller_port(self) -> int:
        """Kafka's KRaft controller port (on 127.0.0.1), just above the client port."""
        return self.port + 1


def client_port(settings: Settings, service: str) -> int:
    """Return the client port of node 1 of ``service``.

    Raises
    ------
    InfraError
        If Kafka's first bootstrap server is not on 127.0.0.1 (the local Kafka serves
        nothing else).
    """
    if service == "cassandra":
        return settings.cassandra.port
    first = settings.kafka.bootstrap_servers.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    if host not in ("127.0.0.1", "localhost") or not port.isdigit():
        raise InfraError(
            f"the local Kafka serves 127.0.0.1 only, but PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS "
            f"is {settings.kafka.bootstrap_servers!r}; use 127.0.0.1:<port> for local infra"
        )
    return int(port)


def cluster_nodes(settings: Settings, service: str, size: int) -> list[Node]:
    """Return the ``size`` nodes of ``service`` for the home and ports of ``settings``.

    Parameters
    ----------
    settings : Settings
        ``settings.home`` and the client port of node 1 (:func:`client_port`).
    service : str
        ``"kafka"`` or ``"cassandra"``.
    size : int
        Number of nodes, 1 to :data:`MAX_NODES`.

    Returns
    -------
    list of Node
        Node 1 first.
    """
    root = settings.home.resolve() / "infra" / service
    first = client_port(settings, service)
    nodes = []
    for index in range(1, size + 1):
        if service == "kafka":
            host, port = "127.0.0.1", first + _KAFKA_PORT_STEP * (index - 1)
        else:
            host, port = f"127.0.0.{index}", first
        home = root if size == 1 else root / f"node{index}"
        nodes.append(Node(service, index, size, home, host, port))
    return nodes


def replication_factor(size: int) -> int:
    """Replicas of each Kafka partition and Cassandra row: every node, up to 3."""
    return min(size, 3)


def min_insync_replicas(size: int) -> int:
    """Replicas that must hold a write acknowledged to ``acks=all``: all but one (at least 1).

    With 3 replicas a write survives the loss of any one node after it is acknowledged,
    and one node may be down without blocking writes.
    """
    return max(1, replication_factor(size) - 1)


def kafka_properties(node: Node, nodes: list[Node]) -> dict[str, object]:
    """Return the per-node values of Kafka's ``server.properties`` template.

    Every node is broker and controller; the controllers of ``nodes`` form the KRaft
    quorum (``controller.quorum.voters``), which stays available while a majority runs.
    """
    voters = ",".join(f"{n.index}@127.0.0.1:{n.controller_port}" for n in nodes)
    return {
        "node_id": node.index,
        "voters": voters,
        "kafka_port": node.port,
        "controller_port": node.controller_port,
        "data_dir": node.home / "data",
        "replication_factor": replication_factor(node.size),
        "min_isr": min_insync_replicas(node.size),
    }


def cassandra_token(node: Node) -> int:
    """Return the node's one token: evenly spaced on the Murmur3 ring, 0 for a single node.

    A single node keeps token 0, which homes made before clusters existed already hold.
    """
    if node.size == 1:
        return 0
    return _MIN_TOKEN + (node.index - 1) * _RING_SIZE // node.size


def remembered_size(root: Path) -> int | None:
    """Return how many nodes the local infra under ``root`` (``<home>/infra``) was made with.

    ``None`` when nothing was started there yet. A home started before clusters existed
    has no ``cluster.json`` but a service folder: one node.

    Raises
    ------
    ConfigError
        If ``cluster.json`` is unreadable.
    """
    path = root / _CLUSTER_FILE
    if path.is_file():
        try:
            size = json.loads(path.read_text())["nodes"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f'{path} is damaged; write {{"nodes": N}} with the cluster\'s size'
            ) from None
        if not isinstance(size, int) or not 1 <= size <= MAX_NODES:
            raise ConfigError(f"{path}: nodes must be 1 to {MAX_NODES}, not {size!r}")
        return size
    if any((root / service).is_dir() for service in ("kafka", "cassandra")):
        return 1
    return None


def settle_size(root: Path, requested: int | None) -> int:
    """Return the cluster size ``up`` uses, remembering it in ``root/cluster.json``.

    Parameters
    ----------
    root : pathlib.Path
        ``<settings.home>/infra``.
    requested : int or None
        ``--nodes``; ``None``: what the home remembers, else 1.

    Returns
    -------
    int
        The number of nodes per service.

    Raises
    ------
    ConfigError
        If ``requested`` is out of range, or differs from the size the home was made with
        (its data belongs to that cluster).
    """
    remembered = remembered_size(root)
    size = requested if requested is not None else (remembered or 1)
    if not 1 <= size <= MAX_NODES:
        raise ConfigError(f"--nodes must be 1 to {MAX_NODES}, not {size}")
    if remembered is not None and remembered != size:
        raise ConfigError(
            f"{root} holds a local infra of {remembered} node(s), not {size}; use a fresh "
            f"PHENOCASCADE_HOME for {size} node(s)"
        )
    path = root / _CLUSTER_FILE
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"nodes": size}) + "\n")
    return size


def client_env(settings: Settings, size: int) -> dict[str, str]:
    """Return the environment variables a client of a local cluster of ``size`` needs.

    Every Kafka node as a bootstrap server, every Cassandra node as a contact point, and
    the replication factor of the keyspace phenocascade creates.
    """
    kafka = cluster_nodes(settings, "kafka", size)
    cassandra = cluster_nodes(settings, "cassandra", size)
    return {
        "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS": ",".join(f"{n.host}:{n.port}" for n in kafka),
        "PHENOCASCADE_CASSANDRA__HOSTS": json.dumps(
            [n.host for n in cassandra], separators=(",", ":")
        ),
        "PHENOCASCADE_CASSANDRA__PORT": str(settings.cassandra.port),
        "PHENOCASCADE_CASSANDRA__REPLICATION_FACTOR": str(replication_factor(size)),
    }
