"""A whole cascade (three tier workers + joiner as real processes) on an isolated namespace
of topics, for integration tests against the real local Kafka and Cassandra."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable, Session

from phenocascade.cli.cascade import (
    cascade_commands,
    start_cascade,
    start_process,
    stop_cascade,
    submit_paths,
)
from phenocascade.cli.metrics import child_metrics_ports, with_metrics_ports
from phenocascade.config import Settings, Topology, load_topology
from phenocascade.domain import ImageMeta
from phenocascade.models.base import champion_version
from phenocascade.recipes import ensure_bootstrap
from phenocascade.store.cassandra import connect
from phenocascade.streams.kafka import create_topics, plain_producer
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import Tiling

TEST_KEYSPACE = "phenocascade_test"


_T = TypeVar("_T")


def until_cassandra_answers(
    read: Callable[[], _T], what: str, timeout_s: float, every_s: float = 1.0
) -> _T:
    """Return ``read()``, tried again while the ring fails it, as a client would.

    Until a coordinator's failure detector convicts a killed node it may still pick that
    node as a replica, and a loaded ring times out: both are a ``DriverException``
    (``Unavailable``, ``ReadTimeout``, ``OperationTimedOut``) or ``NoHostAvailable``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return read()
        except (DriverException, NoHostAvailable) as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what} still failing after {timeout_s:.0f} s") from exc
            time.sleep(every_s)


@contextmanager
def retraining_env(
    infra: Settings, workdir: Path, tier: str, allowed_roots: Sequence[Path]
) -> Iterator[tuple[Settings, Topology, Session]]:
    """Settings, namespaced topics and a fresh keyspace for retraining ``tier`` in a test.

    The tier's champion is copied into ``workdir/artifacts``, so promotions never touch the
    shared artifacts folder; the keyspace is dropped afterwards.
    """
    ensure_bootstrap(infra)
    champion = champion_version(infra.artifacts, tier)
    assert champion is not None
    artifacts = workdir / "artifacts"
    shutil.copytree(infra.artifacts / tier / champion, artifacts / tier / champion)
    (artifacts / tier / "CHAMPION").write_text(champion)
    keyspace = f"phenocascade_it_{uuid.uuid4().hex[:8]}"
    settings = infra.model_copy(
        update={
            "artifacts": artifacts,
            "home": workdir / "home",
            "allowed_roots": list(allowed_roots),
            "cassandra": infra.cassandra.model_copy(update={"keyspace": keyspace}),
        }
    )
    topology = load_topology().namespaced(f"rt{uuid.uuid4().hex[:8]}-")
    create_topics(settings.kafka, topology)
    session = connect(settings.cassandra)
    try:
        yield settings, topology, session
    finally:
        session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}")


def read_events(settings: Settings, topic: str, event: str) -> list[dict[str, Any]]:
    """Decode every ``event`` record on ``topic`` (committed ones), in partition order."""
    codec = EventCodec()
    return [codec.decode(v, expected=event)[1] for _, v in scan_topic(settings.kafka, topic)]


def produce_annotations(settings: Settings, topic: str, records: Sequence[dict[str, Any]]) -> None:
    """Produce ``Annotation`` events keyed by image id, as any labelling tool may."""
    codec = EventCodec()
    producer = plain_producer(settings.kafka)
    for r in records:
        producer.produce(topic, key=r["image_id"].encode(), value=codec.encode("Annotation", r))
    assert producer.flush(30) == 0


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment variables that reproduce ``settings`` in a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHENOCASCADE_")}
    env.update(
        {
            "PHENOCASCADE_HOME": str(settings.home.resolve()),
            "PHENOCASCADE_DATASETS": str(settings.datasets.resolve()),
            "PHENOCASCADE_ARTIFACTS": str(settings.artifacts.resolve()),
            "PHENOCASCADE_ALLOWED_ROOTS": json.dumps([str(p) for p in settings.allowed_roots]),
            "PHENOCASCADE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "PHENOCASCADE_CASSANDRA__HOSTS": json.dumps(settings.cassandra.hosts),
            "PHENOCASCADE_CASSANDRA__PORT": str(settings.cassandra.port),
            "PHENOCASCADE_CASSANDRA__KEYSPACE": settings.cassandra.keyspace,
            "PHENOCASCADE_CASSANDRA__REPLICATION_FACTOR": str(
                settings.cassandra.replication_factor
            ),
        }
    )
    if settings.topology is not None:
        env["PHENOCASCADE_TOPOLOGY"] = str(settings.topology)
    if settings.kafka.client:
        env["PHENOCASCADE_KAFKA__CLIENT"] = json.dumps(settings.kafka.client)
    cassandra = settings.cassandra
    for name, value in (
        ("USERNAME", cassandra.username),
        ("PASSWORD", cassandra.password),
        ("SSL_CA_FILE", cassandra.ssl_ca_file),
        ("SSL_CERT_FILE", cassandra.ssl_cert_file),
        ("SSL_KEY_FILE", cassandra.ssl_key_file),
    ):
        if value is not None:
            env[f"PHENOCASCADE_CASSANDRA__{name}"] = str(value)
    return env


class Cascade:
    """Start, kill, restart and observe a namespaced cascade.

    With ``metrics_port``, its processes serve their metrics on the ports above it, as
    ``phenocascade run``'s do (:attr:`metrics_ports`); 0: none. ``keyspace`` is the shared
    test keyspace unless a test needs one of its own (and drops it).
    """

    def __init__(
        self,
        base: Settings,
        workdir: Path,
        topology: Topology | None = None,
        *,
        metrics_port: int = 0,
        keyspace: str = TEST_KEYSPACE,
    ) -> None:
        self.metrics_port = metrics_port
        prefix = f"it{uuid.uuid4().hex[:8]}-"
        self.prefix = prefix
        self.topology = (topology or load_topology()).namespaced(prefix)
        workdir.mkdir(parents=True, exist_ok=True)
        topo_file = workdir / "topology.yaml"
        topo_file.write_text(yaml.safe_dump(self.topology.model_dump()))
        self.roots = workdir / "inputs"
        self.roots.mkdir(exist_ok=True)
        self.settings = base.model_copy(
            update={
                "topology": topo_file,
                "allowed_roots": [self.roots],
                "cassandra": base.cassandra.model_copy(update={"keyspace": keyspace}),
            }
        )
        self.env = settings_env(self.settings)
        self.logs = workdir / "logs"
        self.codec = EventCodec()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        create_topics(self.settings.kafka, self.topology)

    def start(self) -> None:
        self.procs = start_cascade(
            self.topology, self.logs, env=self.env, metrics_port=self.metrics_port
        )

    @property
    def metrics_ports(self) -> dict[str, int]:
        """The metrics port of each process (0: it serves none)."""
        return child_metrics_ports(list(cascade_commands(self.topology)), self.metrics_port)

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def restart(self, name: str) -> None:
        args = with_metrics_ports(cascade_commands(self.topology), self.metrics_port)[name]
        self.procs[name] = start_process(name, args, self.logs, self.env)

    def stop(self) -> None:
        stop_cascade(self.procs)

    def alive(self) -> dict[str, bool]:
        return {n: p.poll() is None for n, p in self.procs.items()}

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for f in sorted(self.logs.glob("*.log")):
            parts.append(
                f"== {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
            )
        return "\n".join(parts)

    def submit(
        self, paths: Sequence[Path], prefix: str, study: str = "it", tiling: Tiling | None = None
    ) -> list[str]:
        """Submit files; ids start with this cascade's namespace, so reruns never collide.

        Slides are tiled as ``tiling`` says (default: ``submit``'s).
        """
        return submit_paths(
            self.settings,
            self.topology,
            paths,
            meta=ImageMeta(study=self.prefix + study),
            prefix=self.prefix + prefix,
            progress=False,
            tiling=tiling,
        )

    def produce_raw(self, key: str, value: bytes) -> None:
        producer = plain_producer(self.settings.kafka)
        producer.produce(self.topology.submitted_topic, key=key.encode(), value=value)
        producer.flush(30)

    def read(self, topic: str, event: str) -> list[dict[str, Any]]:
        return read_events(self.settings, topic, event)

    def outputs(self) -> list[dict[str, Any]]:
        return self.read(self.topology.joiner.results_topic, "ImageOutput")

    def dead_letters(self) -> list[dict[str, Any]]:
        return self.read(self.topology.dead_letter_topic, "DeadLetter")

    def wait_for_dead_letters(self, ids: Sequence[str], timeout_s: float) -> list[dict[str, Any]]:
        """Wait until every id has a dead letter (partitions are processed in no fixed order)."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.dead_letters()
            if set(ids) <= {d["image_id"] for d in dead} or time.monotonic() > deadline:
                return dead
            time.sleep(2.0)

    def wait_until_done(
        self, ids: Sequence[str], timeout_s: float, dead_ok: Sequence[str] = ()
    ) -> Counter[str]:
        """Wait until every id has an output or (if in ``dead_ok``) a dead letter."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout_s
        while True:
            counts = Counter(o["image_id"] for o in self.outputs() if o["image_id"] in wanted)
            dead = {d["image_id"] for d in self.dead_letters()} & set(dead_ok)
            if wanted <= set(counts) | dead or time.monotonic() > deadline:
                return counts
            if not all(self.alive().values()):
                raise AssertionError(f"a cascade process died: {self.alive()}\n{self.log_tail()}")
            time.sleep(2.0)
