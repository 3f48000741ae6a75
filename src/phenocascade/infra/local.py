"""Real Kafka (KRaft) and Cassandra as local JVM processes, for development and tests.

``up`` resolves each service's jars with Maven once into a cache folder, writes its
configuration from the packaged templates (``phenocascade/infra/templates/<service>/``) into
``<settings.home>/infra/<service>/``, starts the JVMs detached from the caller and waits until
each answers a real client request. ``down`` stops them and ``status`` reports on them.

Layout of ``<settings.home>/infra/<service>/``: the rendered configuration files, ``data/``,
``logs/`` (the service's own log plus ``stdout.log``), ``<service>.pid`` and
``command.json`` (the JVM's command, for :func:`start_node`).

Everything listens on loopback only. Kafka's client port is the port of
``settings.kafka.bootstrap_servers`` (default 9092) and its controller listens on the next
port; Cassandra's CQL port is ``settings.cassandra.port`` (default 9042) and its storage
port is ``up``'s ``cassandra_storage_port`` (default 7000).

``up(..., nodes=3)`` starts a replicated cluster instead: three Kafka nodes (each broker
and controller) and three Cassandra nodes, each in ``<service>/node<i>/``, with the
addresses of :mod:`phenocascade.infra.nodes`. :func:`stop_node` and :func:`start_node`
kill and restart one of them, for failure tests.

With ``up(..., security=Security(...))`` the services refuse anyone without credentials:
Kafka's client listener is SASL_SSL (SCRAM-SHA-512 users made when its storage is
formatted) and Cassandra asks for a password (PasswordAuthenticator, superuser
``cassandra``/``cassandra``) over TLS. ``up`` and ``status`` then check readiness with the
client settings of ``settings`` (``kafka.client``, ``cassandra.username``...), as any
client would.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import string
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import psutil
from cassandra import AuthenticationFailed, DriverException, RequestExecutionException
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable
from cassandra.policies import WhiteListRoundRobinPolicy
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from phenocascade.config import CassandraSettings, Settings
from phenocascade.errors import ConfigError, InfraError
from phenocascade.infra.nodes import (
    Node,
    cassandra_token,
    cluster_nodes,
    kafka_properties,
    remembered_size,
    settle_size,
)

__all__ = [
    "SERVICES",
    "Security",
    "ServiceStatus",
    "cache_dir",
    "cluster_size",
    "down",
    "local_cassandra",
    "node_pid",
    "start_node",
    "status",
    "stop_node",
    "up",
    "write_private",
]

log = logging.getLogger(__name__)

SERVICES: tuple[str, ...] = ("kafka", "cassandra")
"""Every service ``up`` can start, in the order they are started (slowest first is better,
so ``up`` starts Cassandra before Kafka whatever order it is given)."""

_START_ORDER = ("cassandra", "kafka")
_CASSANDRA_STORAGE_PORT = 7000
# Written into .properties, YAML and Kafka's `--add-scram` syntax unquoted or in double
# quotes, so these characters are the ones safe in all three.
_SAFE_SECRET = re.compile(r"[A-Za-z0-9._~+/@%^*!?#-]{1,128}")
_SAFE_USER = re.compile(r"[A-Za-z0-9._-]{1,64}")
_BROKER_USER = "phenocascade-broker"
# Cassandra opens its CQL port about a second before it has made its default superuser, so
# a refused login is believed only when it lasts this long.
_REFUSAL_GRACE_S = 10.0
_STOP_TIMEOUT_S = 60.0
_POLL_S = 0.5
_LOG_TAIL_LINES = 15
_ERROR_LINE = re.compile(r"\b(ERROR|FATAL)\b|Exception:|Error:")
_MIN_JAVA = 17
_MAIN_CLASS = {"kafka": "kafka.Kafka", "cassandra": "org.apache.cassandra.service.CassandraDaemon"}
# The artifact whose version names the cache folder, e.g. kafka-4.1.1.
_MAIN_ARTIFACT = {"kafka": "kafka_2.13", "cassandra": "cassandra-all"}
_SERVICE_LOG = {"kafka": "server.log", "cassandra": "system.log"}
_CONFIG_FILE = {"kafka": "server.properties", "cassandra": "cassandra.yaml"}
_COMMAND_FILE = "command.json"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Security:
    """TLS and authentication for the local services: ``up(settings, security=...)``.

    Kafka's client listener becomes SASL_SSL: SCRAM-SHA-512 over TLS, with the users in
    ``kafka_users`` (created when Kafka's storage is first formatted, so only in a fresh
    ``settings.home``). Cassandra requires TLS from every client and a password
    (PasswordAuthenticator; its superuser is ``cassandra``/``cassandra`` until changed with
    ``ALTER ROLE``). Neither asks clients for a certificate, and neither restricts what an
    authenticated user may do (no authorizer).

    Attributes
    ----------
    keystore : pathlib.Path
        PKCS12 file with the servers' private key and certificate chain. The certificate
        must name ``127.0.0.1`` (subjectAltName ``IP:127.0.0.1``), which clients check.
    keystore_password : str
        Password of ``keystore`` (and of the key in it).
    ca_file : pathlib.Path
        PEM certificate of the CA that signed the keystore's certificate. Kafka trusts it
        when it connects to itself; clients are given the same file
        (``ssl.ca.location``, ``PHENOCASCADE_CASSANDRA__SSL_CA_FILE``).
    kafka_users : mapping of str to str
        SCRAM-SHA-512 user names and their passwords.
    """

    keystore: Path
    keystore_password: str
    ca_file: Path
    kafka_users: Mapping[str, str]

    def check(self) -> None:
        """Refuse what the services could not read, before anything starts.

        Raises
        ------
        ConfigError
            If a file is missing, no Kafka user is given, or a name or password has a
            character the configuration files cannot hold.
        """
        for what, path in (("keystore", self.keystore), ("ca_file", self.ca_file)):
            if not path.is_file():
                raise ConfigError(f"Security.{what}: {path} is not a file")
        if not self.kafka_users:
            raise ConfigError("Security.kafka_users is empty: Kafka would refuse every client")
        for user, password in self.kafka_users.items():
            if not _SAFE_USER.fullmatch(user):
                raise ConfigError(
                    f"Security.kafka_users: user name {user!r} must be 1-64 of A-Z a-z 0-9 . _ -"
                )
            _check_secret(f"the password of Kafka user {user!r}", password)
        _check_secret("Security.keystore_password", self.keystore_password)


def _check_secret(what: str, value: str) -> None:
    if not _SAFE_SECRET.fullmatch(value):
        raise ConfigError(
            f"{what} must be 1-128 characters of A-Z a-z 0-9 and . _ ~ + / @ % ^ * ! ? # - "
            "(the value is not shown)"
        )


class _RefusedError(InfraError):
    """A service answered but refused the client settings (credentials, TLS)."""


@dataclass(frozen=True)
class ServiceStatus:
    """What ``status`` knows about one local service, or one node of a local cluster.

    Attributes
    ----------
    name : str
        ``"kafka"`` or ``"cassandra"``; in a cluster, the node's name (``"kafka-2"``).
    pid : int or None
        The process phenocascade started, if it is alive; ``None`` when no such process
        runs (the port may still be served by a process started some other way).
    port : int
        The client port on ``host`` (Kafka's bootstrap port, Cassandra's CQL port).
    listening : bool
        Whether a TCP connection to the port succeeds.
    ready : bool
        Whether a real client request succeeded: Kafka's AdminClient listed the topics,
        or Cassandra answered ``SELECT release_version FROM system.local``.
    version : str or None
        The release Cassandra reported; for Kafka, the release of the cached jars (the
        Kafka protocol does not report it). ``None`` when not ready and not cached.
    log : pathlib.Path
        The service's main log file.
    host : str, default "127.0.0.1"
        The address the client port listens on (``127.0.0.<i>`` for Cassandra node i).
    """

    name: str
    pid: int | None
    port: int
    listening: bool
    ready: bool
    version: str | None
    log: Path
    host: str = "127.0.0.1"

    @property
    def running(self) -> bool:
        """Whether the process phenocascade started is alive."""
        return self.pid is not None

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (the log path as a string, ``running`` included)."""
        return {**asdict(self), "log": str(self.log), "running": self.running}


def cache_dir() -> Path:
    """Return the folder that holds the resolved jars of each service.

    ``$PHENOCASCADE_INFRA_CACHE`` if set, else ``~/.cache/phenocascade/infra``. Each service
    gets ``<name>-<version>-<pom hash>/lib`` below it, filled once by Maven; editing a
    packaged pom.xml therefore resolves afresh instead of reusing stale jars.
    """
    env = os.environ.get("PHENOCASCADE_INFRA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "phenocascade" / "infra"


def up(
    settings: Settings,
    *,
    services: Sequence[str] = SERVICES,
    timeout_s: float = 180.0,
    progress: Progress | None = None,
    security: Security | None = None,
    cassandra_storage_port: int = _CASSANDRA_STORAGE_PORT,
    nodes: int | None = None,
) -> dict[str, ServiceStatus]:
    """Start the local services that are not already running, and wait until they are ready.

    Idempotent: a service (or node) whose port already answers a real client request is
    left alone, whoever started it. The first call resolves the jars with Maven (network
    needed once); later calls reuse the cached jars and need neither network nor Maven.

    Parameters
    ----------
    settings : Settings
        ``settings.home`` holds configuration, data, logs and pid files; the client ports
        come from ``settings.kafka.bootstrap_servers`` and ``settings.cassandra.port``.
        Readiness is checked with its client settings, credentials included.
    services : sequence of str, default SERVICES
        Any of ``"kafka"`` and ``"cassandra"``.
    timeout_s : float, default 180.0
        Seconds to wait, after the JVMs were launched, until every service is ready. Maven
        resolution is not counted.
    progress : callable or None, default None
        Called with one human-readable line per step (resolving, starting, ready).
    security : Security or None, default None
        Start the services with TLS and authentication; ``None``: plaintext, no
        authentication. Applies to services this call starts, not to running ones.
    cassandra_storage_port : int, default 7000
        Cassandra's internode port (on each node's address); a second local Cassandra on
        the same addresses needs its own.
    nodes : int or None, default None
        Nodes per service (1 to :data:`~phenocascade.infra.nodes.MAX_NODES`): with 3, a
        replicated cluster (:mod:`phenocascade.infra.nodes`). ``None``: as many as the home
        was made with, 1 in a fresh home. The size is remembered in the home.

    Returns
    -------
    dict of str to ServiceStatus
        The status of each requested service (of each node, by node name), all ready.

    Raises
    ------
    ConfigError
        If ``security`` is invalid (:meth:`Security.check`), or the client settings of
        ``settings`` are (a missing CA file...); if ``nodes`` is out of range, differs from
        the size the home was made with, or is more than 1 with ``security``.
    InfraError
        If ``java`` (17 or newer) or, on the first start, ``mvn`` is missing; if Maven cannot
        resolve the jars; if a port is taken by something that is not a ready service; if a
        service dies while starting (the message quotes its last log lines); if it refuses
        the credentials of ``settings``; or if it is not ready within ``timeout_s``.
    """
    wanted = _check_services(services)
    if security is not None:
        if nodes is not None and nodes > 1:
            raise ConfigError("a secured local cluster is not supported; use nodes=1")
        security.check()
    say = progress or (lambda message: log.info("%s", message))
    root = _infra_root(settings)
    with _locked(root):
        size = settle_size(root, nodes)
        if size > 1:
            _warn_of_source_ports(settings, size, cassandra_storage_port, say)
        launch = functools.partial(
            _start_if_needed,
            settings,
            say=say,
            security=security,
            storage_port=cassandra_storage_port,
        )
        started = time.monotonic()
        deadline = started + timeout_s
        pending: dict[Node, int] = {}
        joiners: list[Node] = []
        for name in _START_ORDER:
            if name not in wanted:
                continue
            for node in cluster_nodes(settings, name, size):
                # The other Cassandra nodes gossip with node 1 (the seed) to join the ring,
                # so they start once it answers.
                if name == "cassandra" and node.index > 1:
                    joiners.append(node)
                else:
                    launch(node, pending)
        seeds = [node for node in pending if node.service == "cassandra"]
        wait = functools.partial(
            _wait_ready, settings, pending, started=started, deadline=deadline, say=say
        )
        wait(until=seeds)
        for node in joiners:
            launch(node, pending)
        wait(until=list(pending))
    return _statuses(settings, wanted, size)


def source_port_range() -> tuple[int, int]:
    """Return the kernel's range of source ports for outgoing connections.

    Linux's default when the kernel does not say.
    """
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not path.exists():
        return 32768, 60999
    low, high = (int(v) for v in path.read_text().split()[:2])
    return low, high


def _warn_of_source_ports(
    settings: Settings, size: int, storage_port: int, say: Callable[[str], None]
) -> None:
    """Say so when a cluster's ports lie in the kernel's range for source ports.

    A node connecting to a peer that does not listen yet can be given the peer's port as
    its own source port and then talks to itself: a Kafka node reads its own request as
    the answer and exits (``CorrelationIdMismatchException``).
    """
    low, high = source_port_range()
    kafka = [p for n in cluster_nodes(settings, "kafka", size) for p in (n.port, n.controller_port)]
    inside = sorted(p for p in {*kafka, storage_port} if low <= p <= high)
    if inside:
        say(
            f"warning: ports {', '.join(map(str, inside))} lie in the kernel's source-port "
            f"range {low}-{high}; a starting node may connect to itself and exit. Choose "
            f"ports below {low}"
        )


def cluster_size(settings: Settings) -> int:
    """Return how many nodes per service the local infra of ``settings.home`` has (1 if none).

    Raises
    ------
    ConfigError
        If the home's ``infra/cluster.json`` is damaged.
    """
    return remembered_size(_infra_root(settings)) or 1


def down(
    settings: Settings,
    *,
    services: Sequence[str] = SERVICES,
    timeout_s: float = _STOP_TIMEOUT_S,
    progress: Progress | None = None,
) -> dict[str, ServiceStatus]:
    """Stop the services phenocascade started, every node of them: SIGTERM, wait, then SIGKILL.

    A service served by a process phenocascade did not start (no pid file of ours) is left
    alone. Pid files are removed.

    Parameters
    ----------
    settings : Settings
        Where the pid files live (``settings.home``).
    services : sequence of str, default SERVICES
        Any of ``"kafka"`` and ``"cassandra"``.
    timeout_s : float, default 60.0
        Seconds to wait after SIGTERM (Cassandra flushes its memtables) before SIGKILL.
    progress : callable or None, default None
        Called with one human-readable line per step.

    Returns
    -------
    dict of str to ServiceStatus
        The status of each requested service (each node) after stopping.
    """
    wanted = _check_services(services)
    say = progress or (lambda message: log.info("%s", message))
    root = _infra_root(settings)
    with _locked(root):
        size = cluster_size(settings)
        targets = [node for name in wanted for node in cluster_nodes(settings, name, size)]
        _stop(targets, kill=False, timeout_s=timeout_s, say=say)
    return _statuses(settings, wanted, size)


def status(settings: Settings) -> dict[str, ServiceStatus]:
    """Report on every local service (every node of a cluster) without changing anything.

    Parameters
    ----------
    settings : Settings
        Where the pid files live, the client ports and the client settings (credentials).

    Returns
    -------
    dict of str to ServiceStatus
        One entry per name in :data:`SERVICES`; in a cluster, one per node, by node name
        (``"kafka-1"``...).

    Raises
    ------
    InfraError
        If a service answers but refuses the client settings (credentials, TLS).
    ConfigError
        If the client settings are unusable (a missing CA file...).
    """
    return _statuses(settings, SERVICES, cluster_size(settings))


def node_pid(settings: Settings, service: str, node: int) -> int | None:
    """Return the pid of the JVM phenocascade started for one node, if it is alive.

    Parameters
    ----------
    settings : Settings
        The home of the local infra and its ports.
    service : str
        ``"kafka"`` or ``"cassandra"``.
    node : int
        1-based node number (1 for a single-node home).

    Returns
    -------
    int or None
        ``None`` when no process of ours runs for that node.

    Raises
    ------
    InfraError
        If ``service`` is unknown or the home has no such node.
    """
    return _live_pid(_node(settings, service, node))


def stop_node(
    settings: Settings,
    service: str,
    node: int,
    *,
    kill: bool,
    timeout_s: float = _STOP_TIMEOUT_S,
) -> None:
    """Stop one node of the local infra and wait until its process is gone.

    For failure tests: ``kill=True`` is a crash (SIGKILL, no flush, no goodbye to the
    other nodes); ``kill=False`` a clean stop (SIGTERM, then SIGKILL after ``timeout_s``).
    Its data, configuration and ``command.json`` stay for :func:`start_node`. Nothing
    happens if the node does not run.

    Parameters
    ----------
    settings : Settings
        The home of the local infra and its ports.
    service : str
        ``"kafka"`` or ``"cassandra"``.
    node : int
        1-based node number (1 for a single-node home).
    kill : bool
        SIGKILL at once instead of SIGTERM first.
    timeout_s : float, default 60.0
        Seconds to wait after SIGTERM before SIGKILL.

    Raises
    ------
    InfraError
        If ``service`` is unknown or the home has no such node.
    """
    target = _node(settings, service, node)
    with _locked(_infra_root(settings)):
        _stop([target], kill=kill, timeout_s=timeout_s, say=log.info)


def start_node(
    settings: Settings,
    service: str,
    node: int,
    *,
    timeout_s: float = 180.0,
) -> ServiceStatus:
    """Start one node again with the command, configuration and data ``up`` gave it.

    Nothing is rendered or formatted again: the JVM is launched with the command ``up``
    recorded in the node's ``command.json``, on the data the node left. Returns when the
    node answers a client request (for Kafka: when it is back in the cluster's metadata,
    i.e. registered and unfenced). A node that already runs is only waited for.

    Parameters
    ----------
    settings : Settings
        The home of the local infra, its ports and the client settings for readiness.
    service : str
        ``"kafka"`` or ``"cassandra"``.
    node : int
        1-based node number (1 for a single-node home).
    timeout_s : float, default 180.0
        Seconds to wait until the node is ready.

    Returns
    -------
    ServiceStatus
        The node's status, ready.

    Raises
    ------
    InfraError
        If ``service`` is unknown, the home has no such node, ``up`` never started it, it
        dies while starting or is not ready within ``timeout_s``.
    """
    target = _node(settings, service, node)
    with _locked(_infra_root(settings)):
        pid = _live_pid(target)
        if pid is None:
            with contextlib.suppress(_RefusedError):
                if _ready(target, settings) is not None:
                    return _status_of(settings, target)
            pid = _relaunch(target)
            log.info("%s restarting (pid %d)", target.name, pid)
        started = time.monotonic()
        _wait_ready(
            settings,
            {target: pid},
            until=[target],
            started=started,
            deadline=started + timeout_s,
            say=log.info,
        )
    return _status_of(settings, target)


def _node(settings: Settings, service: str, index: int) -> Node:
    """Return node ``index`` of ``service`` in the home's cluster, or say which exist."""
    _check_services([service])
    size = cluster_size(settings)
    if not 1 <= index <= size:
        raise InfraError(
            f"{service} node {index} does not exist: the local infra in {settings.home} has "
            f"{size} node(s) per service (1 to {size})"
        )
    return cluster_nodes(settings, service, size)[index - 1]


def _statuses(settings: Settings, services: Sequence[str], size: int) -> dict[str, ServiceStatus]:
    return {
        node.name: _status_of(settings, node)
        for name in SERVICES
        if name in services
        for node in cluster_nodes(settings, name, size)
    }


def _status_of(settings: Settings, node: Node) -> ServiceStatus:
    listening = _listening(node.host, node.port)
    version = _ready(node, settings) if listening else None
    return ServiceStatus(
        name=node.name,
        pid=_live_pid(node),
        port=node.port,
        listening=listening,
        ready=version is not None,
        version=version or _cached_version(node.service),
        log=node.home / "logs" / _SERVICE_LOG[node.service],
        host=node.host,
    )


def _stop(targets: Sequence[Node], *, kill: bool, timeout_s: float, say: Progress) -> None:
    """Signal the live JVMs of ``targets``, wait until they are gone, remove their pid files."""
    procs: list[psutil.Process] = []
    stopped: list[str] = []
    for node in targets:
        pid = _live_pid(node)
        if pid is None:
            say(f"{node.name} is not running (nothing phenocascade started)")
            continue
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        say(f"{node.name} (pid {pid}) {'killed' if kill else 'asked to stop'}")
        procs.append(proc)
        stopped.append(node.name)
    _gone, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        say(f"pid {proc.pid} still alive after {timeout_s:.0f} s; killing it")
        proc.kill()
    psutil.wait_procs(alive, timeout=10)
    for node in targets:
        node.pid_file.unlink(missing_ok=True)
    if stopped:
        say(", ".join(stopped) + " stopped")


# --- starting -----------------------------------------------------------------------------


def _start_if_needed(
    settings: Settings,
    node: Node,
    pending: dict[Node, int],
    *,
    say: Progress,
    security: Security | None,
    storage_port: int,
) -> None:
    """Launch ``node`` unless it answers already; add a JVM still starting to ``pending``."""
    with contextlib.suppress(_RefusedError):  # still starting? _wait_ready tells
        if _ready(node, settings) is not None:
            say(f"{node.name} is already running on {node.host}:{node.port}")
            return
    pid = _live_pid(node)
    if pid is None:
        pid = _launch(settings, node, say, security=security, storage_port=storage_port)
    else:
        say(f"{node.name} (pid {pid}) is still starting")
    pending[node] = pid


def _launch(
    settings: Settings, node: Node, say: Progress, *, security: Security | None, storage_port: int
) -> int:
    """Resolve, configure and start one node; return its pid (not yet ready)."""
    java = _java()
    lib = _resolve_jars(node.service, say)
    if _listening(node.host, node.port):
        raise InfraError(
            f"{node.host}:{node.port} is taken by a process that is not a ready {node.name}; "
            f"stop it, or point phenocascade at another port ({_port_setting(node.service)})"
        )
    for sub in ("data", "logs"):
        (node.home / sub).mkdir(parents=True, exist_ok=True)
    if node.service == "kafka":
        cmd = _kafka_command(settings, java, lib, node, security)
    else:
        cmd = _cassandra_command(java, lib, node, storage_port, security)
    write_private(node.home / _COMMAND_FILE, json.dumps(cmd, indent=1) + "\n")
    pid = _spawn_detached(cmd, cwd=node.home, out=node.home / "logs" / "stdout.log")
    node.pid_file.write_text(f"{pid}\n")
    say(f"{node.name} starting (pid {pid}), logs in {node.home / 'logs'}")
    return pid


def _relaunch(node: Node) -> int:
    """Start ``node`` again with the command ``up`` recorded; return its pid."""
    path = node.home / _COMMAND_FILE
    try:
        cmd = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        raise InfraError(
            f"{node.name} has no usable {path}: start it once with `phenocascade infra up`"
        ) from None
    pid = _spawn_detached(cmd, cwd=node.home, out=node.home / "logs" / "stdout.log")
    node.pid_file.write_text(f"{pid}\n")
    return pid


def _kafka_command(
    settings: Settings, java: str, lib: Path, node: Node, security: Security | None
) -> list[str]:
    """Write one Kafka node's configuration, format its storage once, return its command."""
    home = node.home
    properties = _render(
        "kafka",
        "server.properties",
        home,
        listener="PLAINTEXT" if security is None else "SASL_SSL",
        **kafka_properties(node, cluster_nodes(settings, "kafka", node.size)),
    )
    scram: list[str] = []
    hidden: list[str] = []
    if security is not None:
        broker_password = _broker_password(home)
        _append(
            properties,
            "kafka",
            "sasl_ssl.properties",
            broker_user=_BROKER_USER,
            broker_password=broker_password,
            keystore=security.keystore.resolve(),
            keystore_password=security.keystore_password,
            ca_file=security.ca_file.resolve(),
        )
        users = {**security.kafka_users, _BROKER_USER: broker_password}
        for user, password in users.items():
            scram += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
        hidden = list(users.values())
    log4j = _render("kafka", "log4j2.properties", home)
    # One id for the whole cluster: every node's storage is formatted with it.
    cluster_id_file = _infra_root(settings) / "kafka" / "cluster.id"
    if not cluster_id_file.is_file():
        cluster_id_file.write_text(_kafka_cluster_id() + "\n")
    classpath = str(lib / "*")
    fmt = subprocess.run(
        [
            java,
            "-Xmx256m",
            f"-Dlog4j2.configurationFile={log4j}",
            f"-Dkafka.logs.dir={home / 'logs'}",
            "-cp",
            classpath,
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            cluster_id_file.read_text().strip(),
            "-c",
            str(properties),
            *scram,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if fmt.returncode != 0:
        # The passwords are on its command line; should the tool echo one, hide it.
        output = fmt.stdout + fmt.stderr
        for secret in hidden:
            output = output.replace(secret, "***")
        raise InfraError(
            f"formatting Kafka's storage in {home / 'data'} failed "
            f"(exit {fmt.returncode}):\n{_tail(output)}"
        )
    return [
        java,
        *_jvm_options("kafka"),
        f"-Dkafka.logs.dir={home / 'logs'}",
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        classpath,
        _MAIN_CLASS["kafka"],
        str(properties),
    ]


def _cassandra_command(
    java: str, lib: Path, node: Node, storage_port: int, security: Security | None
) -> list[str]:
    """Write one Cassandra node's configuration and return its command."""
    home = node.home
    if _listening(node.host, storage_port):
        raise InfraError(
            f"Cassandra's storage port {node.host}:{storage_port} is taken (another "
            "Cassandra?); start this one with another cassandra_storage_port"
        )
    token = cassandra_token(node)
    yaml_file = _render(
        "cassandra",
        "cassandra.yaml",
        home,
        address=node.host,
        initial_token=token,
        native_port=node.port,
        storage_port=storage_port,
        data_dir=home / "data",
        authenticator="AllowAllAuthenticator" if security is None else "PasswordAuthenticator",
    )
    secured: list[str] = []
    if security is not None:
        _append(
            yaml_file,
            "cassandra",
            "client_encryption.yaml",
            keystore=security.keystore.resolve(),
            keystore_password=security.keystore_password,
        )
        # The superuser is otherwise created 10 s after start: readiness would wait for it.
        secured.append("-Dcassandra.superuser_setup_delay_ms=0")
    logback = _render("cassandra", "logback.xml", home)
    jamm = sorted(lib.glob("jamm-*.jar"))
    if not jamm:
        raise InfraError(f"no jamm jar in {lib}; delete that folder so that Maven fills it again")
    return [
        java,
        *_jvm_options("cassandra"),
        # Cassandra measures object sizes with jamm, which must be loaded as an agent.
        f"-javaagent:{jamm[0]}",
        "-Dcassandra-foreground=yes",
        f"-Dcassandra.config={yaml_file.as_uri()}",
        f"-Dcassandra.storagedir={home / 'data'}",
        f"-Dcassandra.logdir={home / 'logs'}",
        f"-Dlogback.configurationFile={logback}",
        # Waiting for gossip to settle polls until the view of the ring stops changing
        # (8 s at least). One node has nobody to gossip with; on loopback a cluster's
        # gossip is exchanged within a second, and a node counts as ready only once its
        # own CQL port answers, after it joined the ring.
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        f"-Dcassandra.initial_token={token}",
        *secured,
        "-cp",
        str(lib / "*"),
        _MAIN_CLASS["cassandra"],
    ]


def _broker_password(home: Path) -> str:
    """Return the password of Kafka's own SCRAM user, made once per storage.

    SCRAM users exist only if they were added when the storage was formatted, so a storage
    formatted without security has no broker user and cannot be secured later.

    Raises
    ------
    InfraError
        If the storage in ``home/data`` was formatted without security.
    """
    secret_file = home / "broker.secret"
    if secret_file.is_file():
        return secret_file.read_text().strip()
    if (home / "data" / "meta.properties").is_file():
        raise InfraError(
            f"Kafka's storage in {home / 'data'} was formatted without security, and SCRAM "
            "users are made only when it is formatted; start the secured Kafka in a fresh "
            "PHENOCASCADE_HOME"
        )
    password = secrets.token_urlsafe(24)
    write_private(secret_file, password + "\n")
    return password


def _spawn_detached(cmd: list[str], *, cwd: Path, out: Path) -> int:
    """Start ``cmd`` in the background, not as our child, and return its pid.

    The JVMs must outlive the command that started them, ignore the terminal's Ctrl-C and
    never become zombies of a long-lived caller (a test session): a shell starts them in
    the background of a new session and exits at once, so init adopts them.
    """
    env = {**os.environ, "PHENOCASCADE_LAUNCH_OUT": str(out)}
    launcher = subprocess.run(
        ["sh", "-c", '"$@" </dev/null >>"$PHENOCASCADE_LAUNCH_OUT" 2>&1 & echo $!', "sh", *cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        start_new_session=True,
        check=False,
        timeout=30,
    )
    if launcher.returncode != 0 or not launcher.stdout.strip().isdigit():
        raise InfraError(f"could not launch {cmd[0]}: {launcher.stderr.strip()}")
    return int(launcher.stdout)


def _wait_ready(
    settings: Settings,
    pending: dict[Node, int],
    *,
    until: Sequence[Node],
    started: float,
    deadline: float,
    say: Progress,
) -> None:
    """Poll the pending nodes until those in ``until`` answer a client request.

    Nodes that become ready meanwhile are reported (with the seconds since ``started``)
    and leave ``pending``; one that dies fails the call with its log; past ``deadline``
    the call fails with the logs of the nodes still awaited.
    """
    refused_since: dict[Node, float] = {}
    while any(node in pending for node in until):
        for node, pid in list(pending.items()):
            try:
                version = _ready(node, settings)
            except _RefusedError:
                first = refused_since.setdefault(node, time.monotonic())
                if time.monotonic() - first > _REFUSAL_GRACE_S:
                    raise
                version = None
            if version is not None:
                say(f"{node.name} {version} ready after {time.monotonic() - started:.1f} s")
                del pending[node]
            elif not _alive(pid, node):
                node.pid_file.unlink(missing_ok=True)
                raise InfraError(
                    f"{node.name} (pid {pid}) exited while starting; last lines of its logs:\n"
                    f"{_log_tail(node)}"
                )
        waiting = [node for node in until if node in pending]
        if waiting and time.monotonic() > deadline:
            names = ", ".join(node.name for node in waiting)
            raise InfraError(
                f"{names} not ready after {time.monotonic() - started:.0f} s (still running; "
                f"`phenocascade infra down` stops it). Last lines of its logs:\n"
                + "\n".join(_log_tail(node) for node in waiting)
            )
        if waiting:
            time.sleep(_POLL_S)


# --- readiness ----------------------------------------------------------------------------


def _ready(node: Node, settings: Settings) -> str | None:
    """Return the node's version if it answers a real client request, else ``None``.

    The request goes to the node's own address only, with the client settings of
    ``settings``, credentials included.

    Raises
    ------
    InfraError
        If the node answers but refuses those credentials.
    ConfigError
        If the client settings are unusable (a missing CA file...).
    """
    if not _listening(node.host, node.port):
        return None
    if node.service == "kafka":
        return _kafka_ready(settings, node)
    return _cassandra_ready(settings, node)


def _kafka_ready(settings: Settings, node: Node) -> str | None:
    errors: list[KafkaError] = []
    try:
        admin = AdminClient(
            settings.kafka.config(
                **{
                    "bootstrap.servers": f"{node.host}:{node.port}",
                    # A broker that is still starting refuses connections; that is expected.
                    "log_level": 0,
                    "error_cb": errors.append,
                }
            )
        )
    except KafkaException as exc:
        raise ConfigError(
            f"PHENOCASCADE_KAFKA__CLIENT: the Kafka client refused its settings: "
            f"{exc.args[0].str()}"
        ) from exc
    try:
        metadata = admin.list_topics(timeout=3)
    except KafkaException:
        admin.poll(0)  # serves the error callbacks still queued
        for error in errors:
            if error.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL):
                raise _RefusedError(
                    f"{node.name} on {node.host}:{node.port} refused the client settings "
                    f"(PHENOCASCADE_KAFKA__CLIENT): {error.str()}"
                ) from None
        return None
    # A cluster's broker answers before the controllers have unfenced it; until then it
    # leads no partition and is missing from the brokers the metadata lists.
    if node.size > 1 and node.index not in metadata.brokers:
        return None
    # The Kafka protocol does not report the broker's release; the cached jars know it.
    return _cached_version("kafka") or "(version unknown)"


def local_cassandra(cfg: CassandraSettings, port: int, host: str = "127.0.0.1") -> Cluster:
    """Return a driver ``Cluster`` for the local Cassandra node on ``host:port``.

    It logs in and speaks TLS as ``cfg`` says, and sends every request to that node only
    (a readiness check must ask the node itself, not a peer). Short timeouts: the node is
    local, and a readiness poll must not hang. The caller shuts it down.
    """
    return Cluster(
        [host],
        port=port,
        auth_provider=(
            PlainTextAuthProvider(cfg.username, cfg.password) if cfg.username is not None else None
        ),
        ssl_context=cfg.ssl_context(),
        protocol_version=5,
        connect_timeout=3,
        control_connection_timeout=3,
        execution_profiles={
            EXEC_PROFILE_DEFAULT: ExecutionProfile(
                load_balancing_policy=WhiteListRoundRobinPolicy([host]),
                request_timeout=5,
            )
        },
    )


def _cassandra_ready(settings: Settings, node: Node) -> str | None:
    cluster = local_cassandra(settings.cassandra, node.port, node.host)
    try:
        session = cluster.connect()
        row = session.execute("SELECT release_version FROM system.local").one()
    except NoHostAvailable as exc:
        for error in exc.errors.values():
            if isinstance(error, AuthenticationFailed | ssl.SSLError):
                raise _RefusedError(
                    f"{node.name} on {node.host}:{node.port} refused the client settings "
                    f"(PHENOCASCADE_CASSANDRA__USERNAME, __PASSWORD, __SSL_CA_FILE): {error}"
                ) from None
        return None
    except (DriverException, RequestExecutionException, OSError):
        return None
    finally:
        cluster.shutdown()
    return str(row.release_version) if row is not None else None


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


# --- processes and pid files --------------------------------------------------------------


def _infra_root(settings: Settings) -> Path:
    return settings.home.resolve() / "infra"


def _live_pid(node: Node) -> int | None:
    """Return the pid in the node's pid file if that process is alive and is the node."""
    try:
        pid = int(node.pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _alive(pid, node) else None


def _alive(pid: int, node: Node) -> bool:
    """Whether ``pid`` runs the node's JVM (a recycled pid, or another node's, does not count)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    # Each node's command names its own configuration file (in its own folder).
    config = node.home / _CONFIG_FILE[node.service]
    return _MAIN_CLASS[node.service] in cmdline and any(str(config) in arg for arg in cmdline)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise ``up`` and ``down`` across processes (two test sessions, CLI and tests)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _log_tail(node: Node) -> str:
    """Return the error lines and the last lines of the node's log and stdout/stderr.

    The error lines come first because a JVM that fails to start often logs its cause
    (``BindException: Address already in use``) long before its last words.
    """
    parts = []
    logs = node.home / "logs"
    for path in (logs / _SERVICE_LOG[node.service], logs / "stdout.log"):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        errors = [line for line in text.splitlines() if _ERROR_LINE.search(line)]
        if errors:
            parts.append(f"--- errors in {path}\n" + "\n".join(errors[-_LOG_TAIL_LINES:]))
        if text.strip():
            parts.append(f"--- end of {path}\n{_tail(text)}")
    return "\n".join(parts) or f"(no log output in {logs})"


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# --- tools, jars and templates ------------------------------------------------------------


def _java() -> str:
    """Return the ``java`` executable, checking that it is Java 17 or newer."""
    java = shutil.which("java")
    if java is None:
        raise InfraError(
            "java not found on PATH; Kafka 4 and Cassandra 5 need a Java 17+ runtime "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):  # "1.8.0_402" style
        major = int(match.group(2))
    if major < _MIN_JAVA:
        raise InfraError(
            f"{java} is Java {major or '?'}; Kafka 4 and Cassandra 5 need Java {_MIN_JAVA}+ "
            "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
        )
    return java


def _template(name: str, filename: str) -> str:
    return (
        resources.files("phenocascade.infra")
        .joinpath("templates", name, filename)
        .read_text(encoding="utf-8")
    )


def _render(name: str, filename: str, home: Path, **values: object) -> Path:
    """Write ``templates/<name>/<filename>`` into ``home``, filling ``${key}`` from values.

    Files rendered without values are copied verbatim, so that their own ``${...}``
    (Log4j, Logback) survive. Every file is readable by its owner only: a secured service's
    configuration holds the keystore password, which the JVM must read in plain text.
    """
    text = _template(name, filename)
    if values:
        text = string.Template(text).substitute({k: str(v) for k, v in values.items()})
    target = home / filename
    write_private(target, text)
    return target


def write_private(target: Path, text: str) -> None:
    """Write ``text`` to ``target``, readable by its owner only from the first byte."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    target.chmod(0o600)  # a file that existed before keeps its mode through os.open


def _append(target: Path, name: str, filename: str, **values: object) -> None:
    """Append ``templates/<name>/<filename>``, its ``${key}`` filled from values, to target."""
    text = string.Template(_template(name, filename)).substitute(
        {k: str(v) for k, v in values.items()}
    )
    with target.open("a", encoding="utf-8") as handle:
        handle.write(text)


def _jvm_options(name: str) -> list[str]:
    """Return the flags of ``templates/<name>/jvm.options`` (lines starting with ``-``)."""
    lines = (line.strip() for line in _template(name, "jvm.options").splitlines())
    return [line for line in lines if line.startswith("-")]


def _pom_version(name: str) -> str:
    """Return the version of the service's main artifact, read from its packaged pom.xml."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    pom = ET.fromstring(_template(name, "pom.xml"))
    for dep in pom.iterfind("m:dependencies/m:dependency", ns):
        if dep.findtext("m:artifactId", namespaces=ns) == _MAIN_ARTIFACT[name]:
            version = dep.findtext("m:version", namespaces=ns)
            if version:
                return version
    raise InfraError(f"packaged pom.xml of {name} names no {_MAIN_ARTIFACT[name]} version")


def _lib_dir(name: str) -> Path:
    """Return where the service's jars are cached (the folder may not exist yet)."""
    digest = hashlib.sha256(_template(name, "pom.xml").encode()).hexdigest()[:8]
    return cache_dir() / f"{name}-{_pom_version(name)}-{digest}" / "lib"


def _cached_version(name: str) -> str | None:
    return _pom_version(name) if _lib_dir(name).is_dir() else None


def _resolve_jars(name: str, say: Progress) -> Path:
    """Return the folder of the service's jars, copying them with Maven on first use.

    Maven runs offline first (its local repository may hold everything already) and online
    only if that fails. The jars land in a temporary folder that is renamed into place, so
    an interrupted copy is never mistaken for a complete one.
    """
    version = _pom_version(name)
    target = _lib_dir(name)
    if target.is_dir():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise InfraError(
            f"mvn (Apache Maven) not found on PATH; it fetches the {name} {version} jars once "
            f"into {target.parent} (Debian/Ubuntu: apt-get install maven)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    say(f"resolving {name} {version} with Maven into {target}")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_template(name, "pom.xml"), encoding="utf-8")
        staging = Path(tmp) / "lib"
        base = [
            mvn,
            "-B",
            "-q",
            "-Dstyle.color=never",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={staging}",
            "-DincludeScope=runtime",
        ]
        result = subprocess.run([*base, "-o"], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            say(f"{name} {version} is not in Maven's local repository; downloading")
            result = subprocess.run(base, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not any(staging.glob("*.jar")):
            raise InfraError(
                f"Maven could not resolve {name} {version} (is Maven Central reachable?):\n"
                f"{_tail(result.stdout + result.stderr)}"
            )
        staging.rename(target)
    return target


# --- settings -----------------------------------------------------------------------------


def _check_services(services: Sequence[str]) -> list[str]:
    unknown = sorted(set(services) - set(SERVICES))
    if unknown:
        raise InfraError(f"unknown service(s) {unknown}; choose from {list(SERVICES)}")
    return [name for name in SERVICES if name in services]


def _port_setting(name: str) -> str:
    if name == "kafka":
        return "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:<port>"
    return "PHENOCASCADE_CASSANDRA__PORT=<port>"


def _kafka_cluster_id() -> str:
    """Return a random KRaft cluster id: a UUID in URL-safe base64 without padding.

    Kafka's own ``Uuid.randomUuid`` redraws ids that start with ``-`` (they read as a
    command-line flag); so does this.
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text
