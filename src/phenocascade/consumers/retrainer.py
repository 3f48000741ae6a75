"""The retraining consumer: expert annotations in, challengers trained, better models promoted.

One consumer group (the topology's ``retrainer_group``) reads ``Annotation`` events from the
``annotations`` topic and stores each in Cassandra
(:func:`~phenocascade.store.annotations.save_annotation`, idempotent per annotation id), so
the store holds every annotation, those of the browser app and those of third-party
producers alike. Offsets are committed after the writes (a replay changes nothing).

Per tier it counts the annotations that no retraining has considered yet. When a tier has
``every`` of them (or on demand, :meth:`Retrainer.retrain`), a challenger is trained in a
background thread, so annotations keep being stored meanwhile:

1. every annotation of the tier so far becomes a training :class:`~phenocascade.domain.Sample`
   (the newest per image wins; pixels from the URI under the allowed roots, or the inline
   bytes kept in the task row); annotations of images that are in the tier's fixed
   holdout, or that cannot be used, are left out and logged with their reason;
2. a :class:`ChallengerTrainer` trains the challenger on the tier's base training data
   plus those samples, re-fitting its calibration and thresholds, and scores it on the
   holdout; the champion is scored on the same holdout;
3. the challenger is promoted only if its deciding metric is strictly better: it becomes
   ``CHAMPION``, and a ``ModelPromoted`` event (keyed by tier) goes to the compacted
   ``models`` topic, which tier workers read between batches;
4. every attempt (promoted, rejected or failed) is recorded in the lineage tables
   (:mod:`phenocascade.store.lineage`), and the artifact folder of a challenger that was
   not promoted is deleted (unless ``keep_rejected``): its lineage record keeps its metrics.

A promotion writes ``CHAMPION`` before its event is acknowledged, so a retrainer that dies
in between leaves running workers on the old model. Each :meth:`Retrainer.run` therefore
starts by :meth:`~Retrainer.reconcile`-ing: a champion the ``models`` topic does not
announce is announced again.

The promotion rule (:func:`decide`) and what a decision does (:func:`apply_decision`:
``CHAMPION``, lineage, ``ModelPromoted``) are public, so that ``phenocascade sweep`` puts
its best trial through the same champion/challenger promotion.

The loop knows nothing about models beyond the :class:`ChallengerTrainer` protocol; the
command line wires in :class:`phenocascade.learning.RecipeTrainer`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import tifffile
from cassandra.cluster import Session
from confluent_kafka import Consumer, Message, Producer
from prometheus_client import Counter

from phenocascade.config import Settings, TierSpec, Topology
from phenocascade.consumers.annotation_sink import AnnotationSink
from phenocascade.domain import Box, Sample
from phenocascade.errors import (
    BadInputError,
    ConfigError,
    InfraError,
    PhenocascadeError,
)
from phenocascade.imaging import resolve_under_roots
from phenocascade.models.base import ArtifactMeta, champion_version, set_champion, tier_classes
from phenocascade.models.evaluate import summary_metrics
from phenocascade.observability import DEAD_LETTERS
from phenocascade.store.annotations import annotations_by_tier, get_task, save_annotation
from phenocascade.store.cassandra import connect
from phenocascade.store.lineage import (
    FAILED,
    PROMOTED,
    REJECTED,
    get_lineage,
    lineage_by_tier,
    save_lineage,
)
from phenocascade.store.slides import read_tile
from phenocascade.streams import events
from phenocascade.streams.kafka import (
    consumer_error,
    group_consumer,
    plain_producer,
    produce_dead_letter,
)
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import submission_tile

log = logging.getLogger(__name__)

RETRAINER_NAME = "retrainer"
HOLDOUT_REASON = "image is in the tier's fixed holdout"

ANNOTATIONS = Counter("phenocascade_retrainer_annotations_total", "Annotations stored", ["tier"])
ATTEMPTS = Counter("phenocascade_retrainer_attempts_total", "Retrainings", ["tier", "decision"])


@dataclass(frozen=True)
class Challenger:
    """A trained, calibrated, saved (not promoted) model and its holdout metrics.

    Attributes
    ----------
    version : str
        Artifact version under ``<artifacts>/<tier>/``.
    metrics : dict of str to float
        Metrics on the tier's fixed holdout.
    """

    version: str
    metrics: dict[str, float]


class ChallengerTrainer(Protocol):
    """What the retrainer needs from a training recipe.

    ``tier`` is an artifact name (``TierSpec.artifact``); versions live under
    ``<artifacts>/<tier>/``.
    """

    def metric(self, tier: str) -> str:
        """Name of the holdout metric (higher is better) that decides a promotion."""
        ...

    def holdout_keys(self, tier: str) -> frozenset[str]:
        """SHA-256 hex digests of the bytes of every image in the tier's fixed holdout."""
        ...

    def train(
        self, tier: str, *, extra_samples: Sequence[Sample], parent_version: str
    ) -> Challenger:
        """Train, calibrate and save a challenger on the base data plus ``extra_samples``."""
        ...

    def evaluate(self, tier: str, version: str) -> dict[str, float]:
        """Metrics of a saved version on the tier's fixed holdout."""
        ...


@dataclass
class Outcome:
    """What one retraining attempt did (also its lineage record)."""

    tier: str
    version: str
    parent_version: str
    decision: str
    reason: str
    trigger: str
    metric: str
    metrics: dict[str, float]
    parent_metrics: dict[str, float]
    annotation_ids: list[str]
    excluded: dict[str, str]
    started_at: datetime
    finished_at: datetime

    def record(self) -> dict[str, Any]:
        """Return the lineage record (see :func:`phenocascade.store.lineage.save_lineage`)."""
        return dict(self.__dict__)


@dataclass
class RetrainerStats:
    """Counts of one retrainer run."""

    messages: int = 0
    stored: int = 0
    dead_letters: int = 0
    outcomes: list[Outcome] = field(default_factory=list)


def promotion_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Return the metrics a ``ModelPromoted`` event carries for a promoted attempt.

    Parameters
    ----------
    record : Mapping
        The attempt's lineage record (:meth:`Outcome.record`, or
        :func:`~phenocascade.store.lineage.get_lineage`).

    Returns
    -------
    dict of str to float
        The challenger's holdout metrics, ``parent_<metric>`` (the champion's deciding
        metric on the same holdout, NaN if unknown) and ``annotations`` (how many
        annotations trained it).
    """
    metric = record["metric"]
    return {
        **record["metrics"],
        f"parent_{metric}": record["parent_metrics"].get(metric, float("nan")),
        "annotations": float(len(record["annotation_ids"])),
    }


def decide(
    *,
    metric: str,
    metrics: Mapping[str, float],
    parent_metrics: Mapping[str, float],
    parent_version: str,
) -> tuple[str, str]:
    """Return the champion/challenger decision on a trained model, and its reason.

    Parameters
    ----------
    metric : str
        The deciding metric (higher is better).
    metrics, parent_metrics : Mapping of str to float
        The model's and the champion's metrics on the same holdout.
    parent_version : str
        The champion's version; ``""`` when the tier has none.

    Returns
    -------
    decision : {"promoted", "rejected"}
        Promoted when the tier has no champion, or when ``metric`` is strictly above the
        champion's; a metric that is missing or NaN never beats a champion.
    reason : str
        One line saying why, with both figures.
    """
    new = metrics.get(metric, float("nan"))
    old = parent_metrics.get(metric, float("nan"))
    if not parent_version:
        # Nothing to compare with: the first model routes only what its certificate
        # allows, and everything else still goes to experts.
        return PROMOTED, f"first model of the tier (cold start); {metric} {new:.4f} on the holdout"
    # NaN compares false, so a metric that could not be computed never promotes.
    if new > old:
        return PROMOTED, f"{metric} {new:.4f} > champion's {old:.4f} on the holdout"
    return REJECTED, f"{metric} {new:.4f} is not above champion's {old:.4f} on the holdout"


@dataclass(frozen=True)
class Announcer:
    """Where decisions are recorded and promotions announced.

    Attributes
    ----------
    session : cassandra.cluster.Session
        Holds the lineage tables (:mod:`phenocascade.store.lineage`).
    producer : confluent_kafka.Producer
        Produces ``ModelPromoted`` events.
    models_topic : str
        The compacted topic tier workers read promotions from.
    codec : EventCodec
        Encodes the events.
    """

    session: Session
    producer: Producer
    models_topic: str
    codec: EventCodec

    def publish(
        self, artifact: str, version: str, *, parent_version: str, metrics: Mapping[str, float]
    ) -> None:
        """Produce ``ModelPromoted`` (keyed by tier: the compacted topic keeps the latest).

        Raises
        ------
        InfraError
            If Kafka did not acknowledge the event within 30 s.
        """
        record = {
            "tier": artifact,
            "version": version,
            "parent_version": parent_version,
            "metrics": dict(metrics),
            "promoted_at": events.now_ms(),
        }
        self.producer.produce(
            self.models_topic,
            key=artifact.encode(),
            value=self.codec.encode("ModelPromoted", record),
        )
        if self.producer.flush(30):
            raise InfraError(
                f"ModelPromoted for {artifact}/{version} was not acknowledged by Kafka on "
                f"topic {self.models_topic} within 30 s (`phenocascade topics create` makes "
                "the topology's topics); the version is champion: workers load it when they "
                "start"
            )


def apply_decision(
    outcome: Outcome, *, artifacts: Path, artifact: str, announcer: Announcer | None
) -> None:
    """Make a decided attempt take effect: ``CHAMPION``, its lineage, ``ModelPromoted``.

    A promoted version becomes ``CHAMPION`` of ``artifact`` first. Then the attempt's
    record (any decision) is saved to the lineage tables and, for a promotion,
    ``ModelPromoted`` is published. Lineage goes before the event: if the event is lost,
    :meth:`Retrainer.reconcile` finds its metrics.

    Parameters
    ----------
    outcome : Outcome
        The attempt, with its ``decision`` (see :func:`decide`) and ``finished_at`` set.
    artifacts : pathlib.Path
        The artifacts folder the workers serve from.
    artifact : str
        The tier's artifact name (``TierSpec.artifact``).
    announcer : Announcer or None
        ``None`` (offline: ``phenocascade sweep --no-publish``) only sets ``CHAMPION``;
        workers load it when they start, and the next retrainer start announces it if
        it has a parent (a tier's first champion is loaded by every worker that starts).

    Raises
    ------
    ArtifactError
        If a promoted version has no artifact.
    InfraError
        If Kafka did not acknowledge ``ModelPromoted`` (``CHAMPION`` is already set).
    """
    promoted = outcome.decision == PROMOTED
    if promoted:
        set_champion(artifacts, artifact, outcome.version)
    if announcer is None:
        return
    record = outcome.record()
    save_lineage(session=announcer.session, record=record)
    if promoted:
        announcer.publish(
            artifact,
            outcome.version,
            parent_version=outcome.parent_version,
            metrics=promotion_metrics(record),
        )


def image_key(data: bytes) -> str:
    """Return the identity of an image's bytes (SHA-256 hex), used to recognise holdout images."""
    return hashlib.sha256(data).hexdigest()


def newest_per_image(
    annotations: Iterable[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], dict[str, str]]:
    """Keep the newest annotation of each image; return it and ``{superseded id: reason}``.

    The kept annotations are sorted by image id, so training sees the same order whatever
    order the annotations arrived in.
    """
    newest: dict[str, Mapping[str, Any]] = {}
    superseded: dict[str, str] = {}
    for a in sorted(annotations, key=lambda a: (a["created_at"], a["annotation_id"])):
        old = newest.get(a["image_id"])
        if old is not None:
            superseded[old["annotation_id"]] = f"superseded by {a['annotation_id']}"
        newest[a["image_id"]] = a
    return [newest[i] for i in sorted(newest)], superseded


def annotation_samples(
    annotations: Iterable[Mapping[str, Any]],
    *,
    classes: Sequence[str],
    holdout_keys: frozenset[str],
    roots: Sequence[Path],
    inline_bytes: Callable[[Mapping[str, Any]], bytes | None],
    cache_dir: Path,
) -> tuple[list[Sample], dict[str, str]]:
    """Turn annotations into training samples; say why each one left out was left out.

    Parameters
    ----------
    annotations : iterable of Mapping
        ``Annotation`` records of one tier (the newest per image, see
        :func:`newest_per_image`).
    classes : sequence of str
        The tier's classes; an annotation naming another label is left out.
    holdout_keys : frozenset of str
        :func:`image_key` of every holdout image; annotations of those are left out, so the
        holdout never receives training labels.
    roots : sequence of pathlib.Path
        Allowed roots: a URI outside them is left out (as a worker would dead-letter it).
    inline_bytes : callable
        ``annotation -> bytes or None``: the encoded image when it is not its URI's file
        (the task row's inline bytes, or a slide's tile read from the slide); ``None``:
        the URI's file, and an annotation with neither is left out.
    cache_dir : pathlib.Path
        Where inline images are written (named by their key) so training reads them from
        a file like any other sample.

    Returns
    -------
    samples : list of Sample
        ``image_id`` and ``path`` of the image, ``labels`` the annotated labels, ``boxes``
        the annotated boxes ``[x_min, y_min, x_max, y_max]`` in pixels (half-open).
    excluded : dict of str to str
        ``{annotation_id: reason}`` of the annotations left out.
    """
    known = set(classes)
    samples: list[Sample] = []
    excluded: dict[str, str] = {}
    for a in annotations:
        aid = a["annotation_id"]
        labels = set(a["labels"]) | {b["label"] for b in a["boxes"]}
        unknown = sorted(labels - known)
        if unknown:
            excluded[aid] = f"labels {unknown} are not classes of the model {sorted(known)}"
            continue
        try:
            inline = inline_bytes(a)
            if inline is not None:
                data = inline
                path = cache_dir / f"{image_key(inline)}.img"
                if not path.is_file():
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(inline)
            elif a["uri"]:
                path = resolve_under_roots(a["uri"], roots)
                data = path.read_bytes()
            else:
                excluded[aid] = "no URI and no inline bytes in the annotation task"
                continue
        except BadInputError as exc:
            excluded[aid] = str(exc)
            continue
        except OSError as exc:
            excluded[aid] = f"cannot read {a['uri']}: {exc.strerror}"
            continue
        if image_key(data) in holdout_keys:
            excluded[aid] = HOLDOUT_REASON
            continue
        boxes = tuple(
            Box(b["x_min"], b["y_min"], b["x_max"], b["y_max"], b["label"], 1.0) for b in a["boxes"]
        )
        samples.append(
            Sample(
                image_id=a["image_id"],
                path=path,
                labels=frozenset(labels),
                boxes=boxes,
                group=a["image_id"],
            )
        )
    return samples, excluded


class Retrainer:
    """Consume ``Annotation`` events, store them, and retrain tiers as labels accumulate.

    Parameters
    ----------
    settings : Settings
        Kafka and Cassandra settings, the artifacts folder (shared with the tier workers),
        the allowed roots and ``home`` (inline images are cached under
        ``home/retraining/inline``).
    topology : Topology
        Names the annotations, models and dead-letter topics and the tiers.
    trainer : ChallengerTrainer
        Trains and scores challengers.
    every : int or None, default None
        Retrain a tier once this many of its annotations are new to retraining; ``None``
        retrains only on demand.
    tiers : sequence of str or None, default None
        Topology tier names that may be retrained (default: all). Annotations of every
        tier are stored regardless.
    session : cassandra.cluster.Session or None, default None
        Cassandra session; ``None`` connects with ``settings.cassandra``.
    group : str or None, default None
        Consumer group id; ``None`` takes the topology's ``retrainer_group``.
    batch_size : int, default 64
        Most messages handled per commit.
    keep_rejected : bool, default False
        Keep the artifact folder of a challenger that was rejected (or failed after it was
        saved); by default it is deleted once its lineage record is written.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        topology: Topology,
        trainer: ChallengerTrainer,
        every: int | None = None,
        tiers: Sequence[str] | None = None,
        session: Session | None = None,
        group: str | None = None,
        batch_size: int = 64,
        keep_rejected: bool = False,
    ) -> None:
        if every is not None and every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.settings = settings
        self.topology = topology
        self.trainer = trainer
        self.every = every
        self.specs: dict[str, TierSpec] = {
            t.name: t for t in topology.tiers if tiers is None or t.name in tiers
        }
        self.group = group or topology.retrainer_group
        self.batch_size = batch_size
        self.keep_rejected = keep_rejected
        self.codec = EventCodec()
        self.stats = RetrainerStats()
        self._session = session
        self._tiers = {t.name for t in topology.tiers}
        self._lock = threading.Lock()
        self._seen: dict[str, set[str]] = {}
        self._considered: dict[str, set[str]] = {}
        self._producer: Producer | None = None

    # -- connections -----------------------------------------------------------------------
    @property
    def session(self) -> Session:
        """The Cassandra session (connected on first use)."""
        if self._session is None:
            self._session = connect(self.settings.cassandra)
        return self._session

    @property
    def producer(self) -> Producer:
        """The producer of ``ModelPromoted`` events and dead letters (created on first use)."""
        if self._producer is None:
            self._producer = plain_producer(self.settings.kafka)
        return self._producer

    # -- counting --------------------------------------------------------------------------
    def _load_counts(self, tier: str) -> None:
        """Read which annotations of ``tier`` exist and which the last attempt considered."""
        seen = {a["annotation_id"] for a in annotations_by_tier(session=self.session, tier=tier)}
        last = lineage_by_tier(session=self.session, tier=tier, limit=1)
        considered = set(last[0]["annotation_ids"]) | set(last[0]["excluded"]) if last else set()
        with self._lock:
            self._seen[tier] = seen
            self._considered[tier] = considered

    def pending(self, tier: str) -> int:
        """Return how many stored annotations of ``tier`` no retraining has considered yet."""
        if tier not in self._seen:
            self._load_counts(tier)
        with self._lock:
            return len(self._seen[tier] - self._considered[tier])

    # -- storing ---------------------------------------------------------------------------
    def _annotation(self, msg: Message) -> dict[str, Any]:
        _, annotation = self.codec.decode(msg.value(), expected="Annotation")
        if annotation["tier"] not in self._tiers:
            raise BadInputError(
                f"annotation {annotation['annotation_id']} of image {annotation['image_id']} "
                f"names tier {annotation['tier']!r}, which the topology does not have "
                f"({sorted(self._tiers)}); fix the producer's topology"
            )
        return annotation

    def store(self, msgs: Sequence[Message]) -> None:
        """Store one batch of annotations; dead letters are flushed before this returns.

        Raises
        ------
        InfraError
            If a dead letter was not acknowledged by Kafka (the batch is then not committed).
        """
        for msg in msgs:
            try:
                annotation = self._annotation(msg)
            except BadInputError as exc:
                self._dead_letter(msg, exc)
                continue
            tier = annotation["tier"]
            stored = save_annotation(session=self.session, annotation=annotation)
            self.stats.stored += stored
            ANNOTATIONS.labels(tier).inc(stored)
            if tier in self.specs:
                self.pending(tier)
                with self._lock:
                    self._seen[tier].add(annotation["annotation_id"])
        self.stats.messages += len(msgs)
        if self.producer.flush(30):
            raise InfraError("dead letters were not acknowledged by Kafka within 30 s")

    def _dead_letter(self, msg: Message, exc: BadInputError) -> None:
        key = msg.key()
        produce_dead_letter(
            self.producer,
            self.codec,
            self.topology.dead_letter_topic,
            msg,
            tier=RETRAINER_NAME,
            error_kind=exc.kind,
            reason=str(exc),
            image_id=key.decode("utf-8", "replace") if key else None,
        )
        self.stats.dead_letters += 1
        DEAD_LETTERS.labels(RETRAINER_NAME, exc.kind).inc()

    def sync(self) -> int:
        """Store every annotation now in the topic (idempotent); return how many were read.

        Lets an on-demand retraining see third-party annotations even when no retrainer
        consumer is running.
        """
        count = 0
        for _, value in scan_topic(self.settings.kafka, self.topology.annotations_topic):
            try:
                _, annotation = self.codec.decode(value, expected="Annotation")
            except PhenocascadeError as exc:
                log.warning("sync skips an unreadable annotation message: %s", exc)
                continue
            if annotation["tier"] in self._tiers:
                save_annotation(session=self.session, annotation=annotation)
                count += 1
        return count

    # -- retraining ------------------------------------------------------------------------
    def _inline_bytes(self, annotation: Mapping[str, Any]) -> bytes | None:
        """Return an annotated image's bytes when they are not its URI's file.

        The task's inline bytes; for a slide's tile, the tile read from the slide and
        encoded as a TIFF (a sample is a whole image, never the slide).
        """
        task = get_task(
            session=self.session, image_id=annotation["image_id"], tier=annotation["tier"]
        )
        if task is None:
            return None
        tile = submission_tile(self.codec, task["submitted"])
        if tile is not None:
            pixels = read_tile(task["uri"], tile, settings=self.settings, what=task["image_id"])
            buf = io.BytesIO()
            rgb = pixels.shape[2] == 3
            tifffile.imwrite(
                buf, pixels if rgb else pixels[:, :, 0], photometric="rgb" if rgb else None
            )
            return buf.getvalue()
        data: bytes | None = task["inline"]
        return data

    def retrain(self, tier: str, *, trigger: str = "manual") -> Outcome:
        """Train a challenger for ``tier`` on all its annotations and promote it if better.

        Parameters
        ----------
        tier : str
            Topology tier name.
        trigger : str, default "manual"
            Why: ``"count"`` (enough new annotations) or ``"manual"``.

        Returns
        -------
        Outcome
            The attempt, also saved as lineage; ``decision`` is ``"promoted"``,
            ``"rejected"`` or ``"failed"`` (``reason`` says why).

        Raises
        ------
        ConfigError
            If ``tier`` is not one this retrainer may retrain, or has neither a champion
            nor ``labels`` in the topology.

        Notes
        -----
        A tier without a champion (cold start) trains its first model from the
        annotations and promotes it without a comparison.
        """
        spec = self.specs.get(tier)
        if spec is None:
            raise ConfigError(
                f"tier {tier!r} is not retrained here; choose from {list(self.specs)}"
            )
        started = datetime.now(tz=UTC)
        artifacts = self.settings.artifacts
        parent = champion_version(artifacts, spec.artifact) or ""
        if parent:
            classes = ArtifactMeta.read(artifacts / spec.artifact / parent).classes
        else:
            classes = tier_classes(spec)[1]
        metric = self.trainer.metric(spec.artifact)
        stored = annotations_by_tier(session=self.session, tier=tier)
        newest, excluded = newest_per_image(stored)
        samples, left_out = annotation_samples(
            newest,
            classes=classes,
            holdout_keys=self.trainer.holdout_keys(spec.artifact),
            roots=self.settings.roots(),
            inline_bytes=self._inline_bytes,
            cache_dir=self.settings.home / "retraining" / "inline",
        )
        excluded.update(left_out)
        for aid, reason in sorted(excluded.items()):
            log.info("tier %s: annotation %s left out of training: %s", tier, aid, reason)
        used = [s.image_id for s in samples]
        by_image = {a["image_id"]: a["annotation_id"] for a in newest}
        outcome = Outcome(
            tier=tier,
            version="",
            parent_version=parent,
            decision=FAILED,
            reason="",
            trigger=trigger,
            metric=metric,
            metrics={},
            parent_metrics={},
            annotation_ids=[by_image[i] for i in used],
            excluded=excluded,
            started_at=started,
            finished_at=started,
        )
        log.info(
            "tier %s: training %s on %d annotations (%d left out)",
            tier,
            f"a challenger to {parent}" if parent else "its first model (cold start)",
            len(samples),
            len(excluded),
        )
        (artifacts / spec.artifact).mkdir(parents=True, exist_ok=True)
        before = {p.name for p in (artifacts / spec.artifact).iterdir()}
        created: Path | None = None
        try:
            challenger = self.trainer.train(
                spec.artifact, extra_samples=samples, parent_version=parent
            )
            outcome.version = challenger.version
            created = self._created_folder(spec.artifact, challenger.version, before)
            outcome.metrics = challenger.metrics
            if parent:
                outcome.parent_metrics = self.trainer.evaluate(spec.artifact, parent)
        except Exception as exc:  # any training failure is recorded, the loop goes on
            log.exception("tier %s: retraining failed", tier)
            # A failure inside train() leaves no version: a pseudo one names the attempt.
            outcome.version = outcome.version or f"failed-{uuid.uuid4().hex[:12]}"
            outcome.reason = f"{type(exc).__name__}: {exc}"
            return self._finish(outcome, spec, created)
        outcome.decision, outcome.reason = decide(
            metric=metric,
            metrics=challenger.metrics,
            parent_metrics=outcome.parent_metrics,
            parent_version=parent,
        )
        return self._finish(outcome, spec, created)

    def _created_folder(self, artifact: str, version: str, before: set[str]) -> Path | None:
        """Return the folder of ``version`` if the attempt created it, else ``None``.

        Only such a folder may ever be deleted: a version named by the trainer that
        already existed (the champion, an earlier model) or that is not a plain folder
        name under ``<artifacts>/<artifact>/`` is never touched.
        """
        folder = self.settings.artifacts / artifact / version
        if version in before or version in ("", ".", "..") or Path(version).name != version:
            return None
        return folder if folder.is_dir() and not folder.is_symlink() else None

    def _announcer(self) -> Announcer:
        return Announcer(self.session, self.producer, self.topology.models_topic, self.codec)

    def _finish(self, outcome: Outcome, spec: TierSpec, created: Path | None) -> Outcome:
        outcome.finished_at = datetime.now(tz=UTC)
        apply_decision(
            outcome,
            artifacts=self.settings.artifacts,
            artifact=spec.artifact,
            announcer=self._announcer(),
        )
        if outcome.decision != PROMOTED and created is not None and not self.keep_rejected:
            self._discard(spec.artifact, created)
        with self._lock:
            self._considered[outcome.tier] = set(outcome.annotation_ids) | set(outcome.excluded)
        self.stats.outcomes.append(outcome)
        ATTEMPTS.labels(outcome.tier, outcome.decision).inc()
        log.info(
            "tier %s: challenger %s %s (%s)",
            outcome.tier,
            outcome.version,
            outcome.decision,
            outcome.reason,
        )
        return outcome

    def _discard(self, artifact: str, folder: Path) -> None:
        """Delete a challenger's artifact folder, unless it has become the champion."""
        if champion_version(self.settings.artifacts, artifact) == folder.name:
            log.warning("tier %s: %s is champion now; its folder is kept", artifact, folder.name)
            return
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            log.warning(
                "tier %s: could not delete the artifact folder %s of a challenger that was not "
                "promoted (%s); delete it by hand",
                artifact,
                folder,
                exc,
            )
            return
        log.info(
            "tier %s: deleted %s (not promoted; its metrics stay in its lineage record, "
            "keep_rejected / --keep-rejected keeps such folders)",
            artifact,
            folder,
        )

    # -- reconciling -----------------------------------------------------------------------
    def _published(self) -> dict[str, str]:
        """Return ``{tier artifact: version}`` of the newest ``ModelPromoted`` per tier."""
        latest: dict[str, str] = {}
        for key, value in scan_topic(self.settings.kafka, self.topology.models_topic):
            if value is None:  # a tombstone: the tier's announcement was deleted
                if key is not None:
                    latest.pop(key.decode("utf-8", "replace"), None)
                continue
            try:
                _, promoted = self.codec.decode(value, expected="ModelPromoted")
            except PhenocascadeError as exc:
                log.warning("reconcile skips an unreadable message on the models topic: %s", exc)
                continue
            latest[promoted["tier"]] = promoted["version"]
        return latest

    def reconcile(self) -> dict[str, str]:
        """Announce every champion of this retrainer's tiers that the models topic does not.

        A promotion sets ``CHAMPION`` and then publishes ``ModelPromoted``; a retrainer
        that dies in between leaves running workers on the old model until they restart.
        For each tier, the champion is compared with the newest ``ModelPromoted`` of the
        tier: if they differ, ``ModelPromoted`` is published again for the champion
        (``CHAMPION`` is the truth, also when it was set back by hand). A bootstrap
        champion (no ``parent_version``) that nothing was ever published for is left
        alone: workers load ``CHAMPION`` when they start.

        The event's metrics are those of the version's lineage record
        (:func:`promotion_metrics`), or, when the retrainer died before writing it, the
        summary metrics in the artifact's metadata (``auroc``, ``ap50``, ...). A tier that
        cannot be reconciled (no readable metadata, Kafka not acknowledging) is logged and
        skipped; the next start tries again.

        Returns
        -------
        dict of str to str
            ``{tier artifact: version}`` of the announcements published.

        Raises
        ------
        confluent_kafka.KafkaException
            If the models topic cannot be read.
        """
        artifacts = self.settings.artifacts
        published = self._published()
        announced: dict[str, str] = {}
        for artifact in sorted({spec.artifact for spec in self.specs.values()}):
            champion = champion_version(artifacts, artifact)
            if champion is None or published.get(artifact) == champion:
                continue
            try:
                record = get_lineage(session=self.session, version=champion)
                if record is not None:
                    parent, metrics = record["parent_version"], promotion_metrics(record)
                else:
                    meta = ArtifactMeta.read(artifacts / artifact / champion)
                    parent, metrics = meta.parent_version, summary_metrics(meta.metrics)
                if artifact not in published and not parent:
                    continue  # a bootstrap champion: workers load it when they start
                log.warning(
                    "tier %s: CHAMPION is %s but the newest ModelPromoted on %s names %s (a "
                    "retrainer stopped between setting CHAMPION and announcing it, or CHAMPION "
                    "was changed by hand); publishing ModelPromoted for %s, metrics from its %s",
                    artifact,
                    champion,
                    self.topology.models_topic,
                    published.get(artifact, "no version"),
                    champion,
                    "lineage record" if record is not None else "artifact metadata",
                )
                self._announcer().publish(
                    artifact, champion, parent_version=parent, metrics=metrics
                )
                announced[artifact] = champion
            except PhenocascadeError as exc:
                log.error(
                    "tier %s: champion %s could not be announced (retried at the next start): %s",
                    artifact,
                    champion,
                    exc,
                )
        return announced

    # -- the loop --------------------------------------------------------------------------
    def _retrain_due(self, tier: str) -> Outcome | None:
        """Retrain a tier whose count was reached; a tier that cannot be retrained waits."""
        try:
            return self.retrain(tier, trigger="count")
        except PhenocascadeError as exc:
            # Without a champion (or a recipe) nothing changes by retrying at once: wait
            # for `every` more annotations before trying again.
            log.error("tier %s cannot be retrained: %s", tier, exc)
            with self._lock:
                self._considered[tier] = set(self._seen[tier])
            return None

    def _due(self, running: Mapping[str, Future[Outcome | None]]) -> list[str]:
        if self.every is None:
            return []
        return [t for t in self.specs if t not in running and self.pending(t) >= self.every]

    def run(
        self,
        stop: threading.Event,
        *,
        until_caught_up: bool = False,
        max_messages: int | None = None,
    ) -> RetrainerStats:
        """Consume until ``stop`` is set; retrain tiers in the background as labels arrive.

        Parameters
        ----------
        stop : threading.Event
            Set it to stop; a retraining under way is finished first.
        until_caught_up : bool, default False
            Also stop once every partition has been read to its end and no retraining is
            running or due (tests, one-shot runs).
        max_messages : int or None, default None
            Also stop after this many messages (and the retrainings they started).

        Returns
        -------
        RetrainerStats
            What this run did.

        Notes
        -----
        Before consuming, :meth:`reconcile` announces any champion a previous retrainer
        set but did not get announced.
        """
        self.reconcile()
        consumer: Consumer = group_consumer(self.settings.kafka, self.group)
        consumer.subscribe([self.topology.annotations_topic])
        running: dict[str, Future[Outcome | None]] = {}
        # One retraining at a time: training is CPU-bound and shares the machine.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrain")
        for tier in self.specs:
            self._load_counts(tier)
        try:
            while not stop.is_set():
                msgs = [m for m in consumer.consume(self.batch_size, 0.5) if not consumer_error(m)]
                if msgs:
                    self.store(msgs)
                    consumer.commit(asynchronous=False)
                for tier, future in list(running.items()):
                    if future.done():
                        del running[tier]
                        future.result()
                for tier in self._due(running):
                    running[tier] = pool.submit(self._retrain_due, tier)
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
                if (
                    until_caught_up
                    and not msgs
                    and not running
                    and AnnotationSink.caught_up(consumer)
                ):
                    break
        finally:
            pool.shutdown(wait=True)
            for future in running.values():
                future.result()
            consumer.close()
            if self._producer is not None:
                self._producer.flush(10)
        return self.stats
