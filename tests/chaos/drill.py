"""The chaos drill: a whole cascade on a replicated cluster, under faults, held to exactly once.

Shared by ``tests/chaos`` (which asserts) and ``benchmarks/chaos.py`` (which measures). On
a cluster started by ``phenocascade infra up --nodes 3`` (3 Kafka brokers, topics at
replication factor 3 with ``min.insync.replicas=2``; 3 Cassandra nodes, the keyspace at
RF 3, writes at LOCAL_QUORUM):

1. The cascade's processes (every tier worker, the joiner, the annotation sink and the
   retrainer) run under the real :class:`~phenocascade.cli.supervise.Supervisor` of
   ``phenocascade run``, which restarts whatever dies.
2. 20 images go first; once they have outputs, simulated experts answer about their
   quality, which makes the retrainer train a quality challenger (``quality_loop``: the
   champion is deliberately weak, so the challenger wins and is promoted mid-stream).
3. The remaining images are submitted at once, and while they stream the drill kill -9s
   every cascade process once in a seeded random order, kills one Kafka broker and starts
   it again, and kills one Cassandra node and starts it again 30 s later.
4. When every image has its output, it checks with read_committed scans that must
   finish: one output from the models per image (an image experts answered also gets the
   joiner's second, expert-completed output), nothing lost, Cassandra's rows equal to the
   results topic, the promotion's version on the images after it, and every consumer
   group's lag back to zero (each restart resumed where its group had committed).

Recovery, per fault: seconds from the fault to the first record of what the faulty part
produces (a worker's ``TierResult``, the joiner's ``ImageOutput``; for the sink and the
retrainer, which produce nothing on the image path, until the supervisor restarted them;
for a broker or Cassandra node, until the cascade's next ``ImageOutput``: whether the
stream stalled).
"""

from __future__ import annotations

import functools
import json
import random
import shutil
import signal
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable
from confluent_kafka import KafkaException
from harness import Cascade, settings_env, until_cassandra_answers
from PIL import Image
from quality_loop import (
    BUDGET,
    BUDGET_ARGS,
    degraded_copies,
    quality_annotation,
    weak_champion,
)

from phenocascade.cli.cascade import (
    JOINER_STALL_EXIT_S,
    cascade_commands,
    start_process,
    stop_cascade,
)
from phenocascade.cli.status import take_snapshot, topology_groups
from phenocascade.cli.supervise import Supervisor
from phenocascade.config import Settings, Topology
from phenocascade.errors import InfraError
from phenocascade.learning import RecipeTrainer
from phenocascade.models.base import champion_version
from phenocascade.recipes import ensure_bootstrap
from phenocascade.recipes.bundled_data import split_ids
from phenocascade.store.cassandra import connect, get_outputs, versions_key
from phenocascade.streams.events import to_epoch_ms
from phenocascade.streams.kafka import plain_producer
from phenocascade.streams.lag import LagReader
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec

LABELLED = 20
"""Images experts answer first (12 clear, 8 degraded); the retrainer retrains the gate
every this many answers."""
CASSANDRA_DOWN_S = 30.0
BROKER_DOWN_S = 10.0
HELD = 50
"""The last streamed images, submitted only once the gate's challenger is promoted and the
last fault is injected: every killed part then has images to score after its restart."""

Say = Callable[[str], None]


class ClusterControl(Protocol):
    """Kills and restarts single nodes of the replicated cluster."""

    def kill(self, service: str, node: int) -> None:
        """Kill -9 one node of ``service`` (``"kafka"`` or ``"cassandra"``)."""

    def start(self, service: str, node: int) -> None:
        """Start that node again on its data, and wait until it answers."""


@dataclass
class Fault:
    """One injected fault: what, when it began, and when its part was running again."""

    kind: str
    at: float
    repaired_at: float | None = None


@dataclass
class DrillReport:
    """What a drill did and what it found (``as_dict`` is ``chaos.json``'s core)."""

    processes: list[str]
    images: int
    lost: int
    duplicated: int
    cassandra_matches_topic: bool
    faults: list[Fault]
    recovery_s: dict[str, float | None]
    seconds: float
    restarts: dict[str, int]
    promoted: dict[str, Any] | None
    gate_versions: list[str]
    lag: dict[str, int]
    latency: dict[str, float]
    submitted: dict[str, float]
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def switched_mid_stream(self) -> bool:
        """Whether the gate scored with the promoted model after the old one, never back."""
        if self.promoted is None:
            return False
        new = self.promoted["version"]
        old = self.promoted["parent_version"]
        swaps = [
            v for i, v in enumerate(self.gate_versions) if i == 0 or v != self.gate_versions[i - 1]
        ]
        return swaps == [old, new]

    def mean_latency(self, since: float = 0.0, until: float = float("inf")) -> float | None:
        """Mean seconds from submission to output of the images submitted in a span."""
        values = [s for i, s in self.latency.items() if since <= self.submitted[i] <= until]
        return round(statistics.fmean(values), 2) if values else None

    def as_dict(self) -> dict[str, Any]:
        """Return the JSON-ready figures."""
        return {
            "images": self.images,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "cassandra_matches_topic": self.cassandra_matches_topic,
            "faults": dict(Counter(f.kind for f in self.faults)),
            "recovery_s": self.recovery_s,
            "seconds": round(self.seconds, 1),
            "restarts": self.restarts,
            "promotion": self.promoted,
            "gate_versions": dict(Counter(self.gate_versions)),
            "switched_mid_stream": self.switched_mid_stream,
            "lag_at_end": self.lag,
            "latency_s": _spread(list(self.latency.values())),
            "statuses": self.statuses,
        }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "mean": round(statistics.fmean(values), 2),
        "p50": round(q[49], 2),
        "p95": round(q[94], 2),
        "max": round(max(values), 2),
    }


# -- the cascade under a supervisor ---------------------------------------------------------
class _Supervised:
    """The cascade's processes under the real supervisor, polled from a thread."""

    def __init__(self, cascade: Cascade) -> None:
        commands = cascade_commands(cascade.topology)
        commands["sink"] = ["sink"]
        commands["retrainer"] = [
            "retrainer",
            "--tiers",
            "quality",
            "--every",
            str(LABELLED),
            *BUDGET_ARGS,
        ]
        self.names = list(commands)
        self.supervisor = Supervisor(
            commands,
            lambda name, args: start_process(name, args, cascade.logs, cascade.env),
            min_backoff_s=1.0,
        )
        self.restarted_at: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            for name in self.supervisor.poll(time.monotonic()):
                self.restarted_at.setdefault(name, []).append(time.time())

    @contextmanager
    def running(self) -> Iterator[_Supervised]:
        self.supervisor.start(time.monotonic())
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            stop_cascade(self.supervisor.processes)

    def kill9(self, name: str) -> None:
        proc = self.supervisor.processes.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)


class _Pacer(threading.Thread):
    """Submits images evenly over a time span, five at a time, from a thread.

    The last ``held`` images wait, once their time comes, until ``release()`` is true (the
    retrainer's promotion and, in the drill, the last fault), so that the gate scores images
    with both models and every killed part scores images after its restart, whatever the
    machine's speed; the wait ends in an error after ``hold_s``.
    """

    def __init__(
        self,
        cascade: Cascade,
        paths: Sequence[Path],
        seconds: float,
        *,
        held: int = 0,
        release: Callable[[], bool] = lambda: True,
        hold_s: float = 900.0,
    ) -> None:
        super().__init__(daemon=True)
        self.cascade, self.paths, self.seconds = cascade, paths, seconds
        self.held, self.release, self.hold_s = held, release, hold_s
        self.ids: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        chunks = [self.paths[i : i + 5] for i in range(0, len(self.paths), 5)]
        first_held = len(self.paths) - self.held
        began = time.monotonic()
        try:
            for n, chunk in enumerate(chunks):
                time.sleep(max(0.0, began + n * self.seconds / len(chunks) - time.monotonic()))
                if self.held and n * 5 >= first_held and not self.release():
                    _wait(self.release, self.hold_s, "the promotion the last images wait for")
                self.ids += self.cascade.submit(chunk, prefix="stream-", study="chaos")
        except BaseException as exc:  # handed to the drill, which raises it
            self.error = exc

    def submitted(self) -> list[str]:
        """Wait for the last submission; return every id (raise what submitting raised)."""
        self.join()
        if self.error is not None:
            raise self.error
        return self.ids


# -- reading what happened ------------------------------------------------------------------
def _events(settings: Settings, topic: str, event: str) -> list[dict[str, Any]]:
    """Every committed ``event`` on ``topic``; a scan that stalls raises, never truncates."""
    codec = EventCodec()
    return [
        codec.decode(v, expected=event)[1]
        for _, v in scan_topic(settings.kafka, topic, timeout_s=60.0, must_finish=True)
    ]


def _promoted(cascade: Cascade) -> bool:
    """Whether the retrainer has announced a promoted gate."""
    models = _events(cascade.settings, cascade.topology.models_topic, "ModelPromoted")
    return any(p["tier"] == "quality" for p in models)


def _caught_up(settings: Settings, topology: Topology, lag: dict[str, int]) -> bool:
    """Whether every consumer group has read everything; ``lag`` gets each one's largest."""
    snapshot = take_snapshot(LagReader(settings.kafka), topology_groups(topology))
    lag.update({group: max((p.lag for p in parts), default=0) for group, parts in snapshot.items()})
    return all(p.caught_up for parts in snapshot.values() for p in parts)


def _first_after(times: Sequence[float], at: float) -> float | None:
    later = [t for t in times if t > at]
    return min(later) - at if later else None


def _recovery(
    faults: Sequence[Fault],
    tier_times: dict[str, list[float]],
    output_times: list[float],
    restarted_at: dict[str, list[float]],
) -> dict[str, float | None]:
    """Seconds from each fault to the first record of its part (the worst of a kind)."""
    seen: dict[str, list[float | None]] = {}
    for fault in faults:
        process = fault.kind.removeprefix("kill_")
        if process in tier_times:
            seconds = _first_after(tier_times[process], fault.at)
        elif process in ("sink", "retrainer"):
            seconds = _first_after(restarted_at.get(process, []), fault.at)
        else:  # the joiner, a broker, a Cassandra node: the cascade's next output
            seconds = _first_after(output_times, fault.at)
        seen.setdefault(fault.kind, []).append(seconds)
    return {
        kind: None if None in values else round(max(v for v in values if v is not None), 1)
        for kind, values in seen.items()
    }


# -- the drill ------------------------------------------------------------------------------
def _local_models(base: Settings, workdir: Path) -> tuple[Settings, str]:
    """Copy the branch champions here and train the weak gate; return settings and its version."""
    ensure_bootstrap(base)
    artifacts = workdir / "artifacts"
    for tier in ("majority", "minority"):
        version = champion_version(base.artifacts, tier)
        assert version is not None, f"no bootstrap {tier} champion"
        shutil.copytree(base.artifacts / tier / version, artifacts / tier / version)
        (artifacts / tier / "CHAMPION").write_text(version)
    local = base.model_copy(update={"artifacts": artifacts, "home": workdir / "home"})
    return local, weak_champion(local, RecipeTrainer(local, budget=BUDGET))


def _cascade(local: Settings, workdir: Path) -> Cascade:
    """A namespaced cascade on a fresh keyspace whose gate passes what it does not flag novel.

    The gate's thresholds are overridden to 0 (a topology override), so that every image
    the weak gate does not flag also runs through the branch tiers, whose workers the drill
    kills; at the weak champion's own thresholds nearly every image would be skipped.
    """
    keyspace = f"phenocascade_chaos_{uuid.uuid4().hex[:8]}"
    cascade = Cascade(local, workdir / "cascade", keyspace=keyspace)
    topology = cascade.topology.model_dump()
    topology["tiers"][0]["thresholds"] = {"positive": 0.0, "negative": 0.0}
    cascade.topology = Topology.model_validate(topology)
    assert cascade.settings.topology is not None
    cascade.settings.topology.write_text(yaml.safe_dump(topology))
    cascade.env = settings_env(cascade.settings)
    return cascade


def _smallest(paths: Sequence[Path], n: int) -> list[Path]:
    """The ``n`` fields of fewest pixels, in their given order.

    The branch tiers segment nuclei at native resolution, so the drill's compute grows
    with pixels: leaving out DSB's few 1024 x 1024 and larger fields keeps it bounded on
    two cores, and the stream still holds every other size.
    """
    area: dict[Path, int] = {}
    for path in paths:
        with Image.open(path) as image:
            area[path] = image.width * image.height
    keep = set(sorted(paths, key=lambda p: area[p])[:n])
    return [p for p in paths if p in keep]


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, every_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def _model_outputs(cascade: Cascade, ids: set[str]) -> Counter[str]:
    """Outputs from the models (not expert-completed ones) per image, as now committed."""
    try:
        outputs = cascade.outputs()
    except (KafkaException, InfraError):  # a broker is down mid-poll: ask again later
        return Counter()
    return Counter(o["image_id"] for o in outputs if o["image_id"] in ids and not o["annotators"])


def run_drill(
    base: Settings,
    workdir: Path,
    *,
    control: ClusterControl | None,
    images: int = 500,
    seed: int = 0,
    stream_s: float = 300.0,
    gap_s: float = 15.0,
    timeout_s: float = 1800.0,
    say: Say = print,
) -> DrillReport:
    """Stream ``images`` images through a supervised cascade on ``base``'s cluster.

    Parameters
    ----------
    base : Settings
        Points at the cluster (Kafka brokers, Cassandra hosts, ``replication_factor``); its
        artifacts folder holds (or receives) the bootstrap champions.
    workdir : pathlib.Path
        Artifacts, logs, inputs and the topology of this drill.
    control : ClusterControl or None
        Kills and restarts nodes; ``None`` runs the same stream without any fault (the
        baseline of the slowdown).
    images : int, default 500
        Images streamed in all (at most 532: DSB's train and test images; beyond the 20
        labelled ones, the fields of fewest pixels).
    seed : int, default 0
        Seeds the order of the process kills.
    stream_s : float, default 300.0
        The images after the labelled ones are submitted evenly over this many seconds,
        so that the gate scores images before and after the promotion.
    gap_s : float, default 15.0
        Seconds between faults.
    timeout_s : float, default 1800.0
        Longest wait for every output.
    say : callable, default print
        Called with one line per step.
    """
    local, weak = _local_models(base, workdir)
    cascade = _cascade(local, workdir)
    datasets = local.datasets.resolve()
    folder = datasets / "dsb2018" / "images"
    train_ids = split_ids(local, "dsb2018", "train")
    test_ids = split_ids(local, "dsb2018", "test")
    clear = [folder / f"{i}.png" for i in train_ids[:12]]
    degraded = degraded_copies(cascade.settings, train_ids[12:20], cascade.roots)
    labelled = [*clear, *degraded]
    assert len(labelled) == LABELLED
    truth = [True] * len(clear) + [False] * len(degraded)
    stream = _smallest(
        [folder / f"{i}.png" for i in [*train_ids[20:], *test_ids]], images - LABELLED
    )
    if len(labelled) + len(stream) < images:
        raise ValueError(f"the drill has {len(labelled) + len(stream)} images, not {images}")
    faults: list[Fault] = []
    session = connect(cascade.settings.cassandra)
    supervised = _Supervised(cascade)
    try:
        with supervised.running():
            ids_1 = cascade.submit(labelled, prefix="labelled-", study="chaos")
            _wait(
                lambda: len(_model_outputs(cascade, set(ids_1))) == len(ids_1),
                600,
                "the labelled images' outputs",
            )
            producer = plain_producer(cascade.settings.kafka)
            for image_id, path, is_clear in zip(ids_1, labelled, truth, strict=True):
                record = quality_annotation(image_id, path, is_clear, weak)
                producer.produce(
                    cascade.topology.annotations_topic,
                    key=image_id.encode(),
                    value=cascade.codec.encode("Annotation", record),
                )
            assert producer.flush(30) == 0
            say(f"{len(ids_1)} labelled images done and answered; streaming {len(stream)} more")
            started = time.time()
            injected = threading.Event()
            pacer = _Pacer(
                cascade,
                stream,
                stream_s,
                held=HELD,
                release=lambda: injected.is_set() and _promoted(cascade),
            )
            pacer.start()
            try:
                if control is not None:
                    faults = _inject(supervised, control, seed=seed, gap_s=gap_s, say=say)
            finally:
                injected.set()
            wanted = {*ids_1, *pacer.submitted()}
            assert len(wanted) == images, f"{len(wanted)} distinct ids, not {images}"
            _wait(
                lambda: len(_model_outputs(cascade, wanted)) == len(wanted),
                timeout_s,
                "every image's output",
                every_s=5.0,
            )
            _wait(lambda: _promoted(cascade), 600, "the retrainer's promotion")
            lag: dict[str, int] = {}
            try:
                # A joiner whose partition holds records without a commit is exited by its
                # stall watch (status 75) after JOINER_STALL_EXIT_S and restarted by the
                # supervisor: wait past that recovery, plus a restart.
                _wait(
                    lambda: _caught_up(cascade.settings, cascade.topology, lag),
                    JOINER_STALL_EXIT_S + 180,
                    "every consumer group to catch up",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; largest lag per group: {lag}") from None
            restarts = dict(supervised.supervisor.restarts)
        return _report(
            cascade,
            session,
            wanted,
            started,
            faults,
            supervised.names,
            restarts,
            supervised.restarted_at,
            lag,
        )
    finally:
        keyspace = cascade.settings.cassandra.keyspace
        try:
            session.execute(f"DROP KEYSPACE IF EXISTS {keyspace}", timeout=120)
        except (DriverException, NoHostAvailable) as exc:  # never hide the drill's own error
            say(f"keyspace {keyspace} left in place: {exc}")
        session.cluster.shutdown()


def _inject(
    supervised: _Supervised, control: ClusterControl, *, seed: int, gap_s: float, say: Say
) -> list[Fault]:
    """Kill every process once in a seeded order, with a broker and a Cassandra node between."""
    order = list(supervised.names)
    random.Random(seed).shuffle(order)
    steps: list[str] = [*order[:3], "kafka", *order[3:5], "cassandra", *order[5:]]
    faults = []
    for step in steps:
        time.sleep(gap_s)
        if step == "kafka":
            fault = Fault("kafka_broker_restart", time.time())
            control.kill("kafka", 2)
            time.sleep(BROKER_DOWN_S)
            control.start("kafka", 2)
        elif step == "cassandra":
            fault = Fault("cassandra_node_down", time.time())
            control.kill("cassandra", 3)
            time.sleep(CASSANDRA_DOWN_S)
            control.start("cassandra", 3)
        else:
            fault = Fault(f"kill_{step}", time.time())
            supervised.kill9(step)
        fault.repaired_at = time.time() if step in ("kafka", "cassandra") else None
        say(f"fault: {fault.kind}")
        faults.append(fault)
    return faults


def _report(
    cascade: Cascade,
    session: Any,
    wanted: set[str],
    started: float,
    faults: list[Fault],
    processes: list[str],
    restarts: dict[str, int],
    restarted_at: dict[str, list[float]],
    lag: dict[str, int],
) -> DrillReport:
    settings, topology = cascade.settings, cascade.topology
    outputs = [
        o
        for o in _events(settings, topology.joiner.results_topic, "ImageOutput")
        if o["image_id"] in wanted
    ]
    by_models = Counter(o["image_id"] for o in outputs if not o["annotators"])
    from_topic = {
        (o["image_id"], versions_key(o["model_versions"], o["annotators"]), o["status"])
        for o in outputs
    }
    from_cassandra = {
        (o["image_id"], versions_key(o["model_versions"], o["annotators"]), o["status"])
        for i in wanted
        for o in until_cassandra_answers(
            functools.partial(get_outputs, session=session, image_id=i), f"{i}'s outputs", 120, 2
        )
    }
    output_times = sorted(to_epoch_ms(o["produced_at"]) / 1000 for o in outputs)
    results = {t.name: _events(settings, t.result_topic, "TierResult") for t in topology.tiers}
    tier_times = {
        name: sorted(to_epoch_ms(r["produced_at"]) / 1000 for r in rs)
        for name, rs in results.items()
    }
    # The gate's versions in the order it scored: the weak champion, then the challenger.
    gate = sorted(results[topology.tiers[0].name], key=lambda r: to_epoch_ms(r["produced_at"]))
    gate_versions = [r["model_version"] for r in gate if r["image_id"] in wanted]
    promotions = [
        p
        for p in _events(settings, topology.models_topic, "ModelPromoted")
        if p["tier"] == "quality"
    ]
    promoted = promotions[0] if promotions else None
    latest = {o["image_id"]: o for o in outputs if not o["annotators"]}
    submitted = {
        e["image_id"]: to_epoch_ms(e["submitted_at"]) / 1000
        for e in _events(settings, topology.submitted_topic, "ImageSubmitted")
        if e["image_id"] in wanted
    }
    first_output: dict[str, float] = {}
    for o in outputs:
        if not o["annotators"]:
            at = to_epoch_ms(o["produced_at"]) / 1000
            first_output[o["image_id"]] = min(at, first_output.get(o["image_id"], at))
    return DrillReport(
        processes=processes,
        images=len(wanted),
        lost=len(wanted - set(by_models)),
        duplicated=sum(n - 1 for n in by_models.values()),
        cassandra_matches_topic=from_topic == from_cassandra,
        faults=faults,
        recovery_s=_recovery(faults, tier_times, output_times, restarted_at),
        seconds=(output_times[-1] - started) if output_times else 0.0,
        restarts=restarts,
        promoted=(
            {
                "version": promoted["version"],
                "parent_version": promoted["parent_version"],
                "metrics": promoted["metrics"],
            }
            if promoted
            else None
        ),
        gate_versions=gate_versions,
        lag=lag,
        latency={i: t - submitted[i] for i, t in first_output.items() if i in submitted},
        submitted=submitted,
        statuses=dict(Counter(o["status"] for o in latest.values())),
    )


def write_json(report: DrillReport, path: Path, **extra: Any) -> None:
    """Write the report's figures and ``extra`` keys as JSON."""
    path.write_text(json.dumps({**report.as_dict(), **extra}, indent=2) + "\n")
