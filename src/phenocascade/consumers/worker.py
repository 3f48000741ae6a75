"""A tier worker: a Kafka loop + a :class:`~phenocascade.models.base.Stage` + the router.

The loop knows nothing about models beyond the ``Stage`` contract, and the stage knows
nothing about Kafka. Each batch is read, scored and routed inside one Kafka transaction
(read-process-write): its outputs and its input offsets commit together, so after a crash
the batch is either fully visible downstream or redone, never half-done or doubled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Histogram, Info

from phenocascade.config import Settings, TierSpec, Topology
from phenocascade.domain import (
    NO_MODEL_VERSION,
    DecodedImage,
    LabelThresholds,
    Route,
    StageKind,
    StageOutput,
    exclusive_groups,
    pending_labels,
    route,
)
from phenocascade.errors import BadInputError, ConfigError, NoChampionError, PhenocascadeError
from phenocascade.imaging import decode_bytes, read_image
from phenocascade.models import acquisition, runtime
from phenocascade.models.base import Stage, load_stage, set_compute_threads, tier_classes
from phenocascade.observability import DEAD_LETTERS
from phenocascade.store.slides import read_tile
from phenocascade.streams import events
from phenocascade.streams.kafka import (
    consumer_error,
    group_consumer,
    partition_end,
    plain_producer,
    produce_dead_letter,
    transactional_producer,
)
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import routing_key

log = logging.getLogger(__name__)

# Batch counts are added once the batch's transaction commits, so a batch redone after an
# abort counts once, as its outputs do.
IMAGES_IN = Counter(
    "phenocascade_tier_images_in_total", "Messages a tier took from its input topic", ["tier"]
)
IMAGES_OUT = Counter(
    "phenocascade_tier_images_out_total", "Images a tier scored, by route", ["tier", "route"]
)
LABEL_DECISIONS = Counter(
    "phenocascade_tier_label_decisions_total",
    "Scores per label: at or above its positive threshold (present), at or below its negative "
    "one (absent), or between (uncertain)",
    ["tier", "label", "decision"],
)
BATCH_SECONDS = Histogram("phenocascade_batch_seconds", "Wall time of one batch", ["tier"])
SWAPS = Counter("phenocascade_model_swaps_total", "Hot-swaps to a promoted model", ["tier"])
MODEL = Info("phenocascade_model", "The model each tier serves: name and version", ["tier"])


@dataclass
class _BatchTally:
    """One batch's counts, added to the metrics by :meth:`publish` after its commit."""

    tier: str
    taken: int
    routes: dict[str, int] = field(default_factory=dict)
    dead: dict[str, int] = field(default_factory=dict)
    labels: dict[tuple[str, str], int] = field(default_factory=dict)

    def scored(
        self,
        decision: Route,
        output: StageOutput,
        thresholds: dict[str, LabelThresholds],
        pending: Sequence[str],
    ) -> None:
        """Count one scored image: its route and the decision on each of its labels."""
        self.routes[decision.value] = self.routes.get(decision.value, 0) + 1
        for label, p in output.scores.items():
            key = (label, label_decision(p, thresholds.get(label), pending=label in pending))
            self.labels[key] = self.labels.get(key, 0) + 1

    def publish(self) -> None:
        """Add the counts to the process's metrics."""
        IMAGES_IN.labels(self.tier).inc(self.taken)
        for r, n in self.routes.items():
            IMAGES_OUT.labels(self.tier, r).inc(n)
        for kind, n in self.dead.items():
            DEAD_LETTERS.labels(self.tier, kind).inc(n)
        for (label, decision), n in self.labels.items():
            LABEL_DECISIONS.labels(self.tier, label, decision).inc(n)


def take_batch(consumer: Consumer, size: int, wait_s: float) -> list[Message]:
    """Return up to ``size`` messages, without waiting for more than are there.

    What the consumer holds already, if anything; else the first message to come within
    ``wait_s`` and whatever came with it. A batch never waits to fill: under load the
    messages queue while the previous batch computes, so batches fill by themselves, and
    at low load an image is not held back for others that are not coming.
    """
    msgs = consumer.consume(size, 0)
    if not msgs:
        msgs = consumer.consume(1, wait_s)
        if msgs and size > 1:
            msgs += consumer.consume(size - 1, 0)
    return list(msgs)


def label_decision(p: float, thresholds: LabelThresholds | None, *, pending: bool) -> str:
    """Return ``"present"``, ``"absent"`` or ``"uncertain"`` for one label's score ``p``.

    ``pending`` (:func:`~phenocascade.domain.pending_labels`) says whether an expert is
    asked the label; a decided label is present at or above its confident threshold and
    absent below it (a detector class with no confident box that is certified to be
    found).
    """
    if pending:
        return "uncertain"
    if thresholds is not None and p >= thresholds.positive:
        return "present"
    return "absent"


@dataclass(frozen=True)
class _Scored:
    """A scored batch, and the kind, model name, version and classes to record.

    Per image: its output (or the exception that failed it), its route and its pending
    labels.
    """

    outputs: list[StageOutput | Exception]
    routes: list[Route]
    pending: list[tuple[str, ...]]
    kind: StageKind
    model_name: str
    version: str
    classes: list[str]


@dataclass
class WorkerStats:
    """Counts of one worker's run."""

    batches: int = 0
    images: int = 0
    dead_letters: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    swaps: list[str] = field(default_factory=list)


StageLoader = Callable[[str | None], Stage]


class TierWorker:
    """Run one tier of the cascade as a member of its consumer group.

    Parameters
    ----------
    settings : Settings
        Connection settings, allowed roots and limits.
    topology : Topology
        The flow; ``tier`` must be one of its tiers.
    tier : TierSpec
        The tier to run.
    instance : str
        Stable id of this worker instance; with the tier name it forms the transactional id,
        so a restarted instance fences its crashed predecessor at once. The transactional id
        is ``<consumer group>-<instance>``: unique per tier and namespace.
    stage_loader : callable or None, default None
        ``version -> Stage`` (``None`` = champion); defaults to loading artifacts from
        ``settings.artifacts`` on the tier's device.
    slowdown : float, default 1.0
        A drill setting: each batch takes this many times as long as its model needs (the
        worker sleeps the rest), to watch backpressure on the other tiers and the joiner.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        topology: Topology,
        tier: TierSpec,
        instance: str,
        stage_loader: StageLoader | None = None,
        slowdown: float = 1.0,
    ) -> None:
        if slowdown < 1.0:
            raise ConfigError(f"a worker's slowdown must be at least 1, not {slowdown}")
        self.slowdown = slowdown
        self.settings = settings
        self.topology = topology
        self.tier = tier
        self.instance = instance
        self.codec = EventCodec()
        self._load: StageLoader = stage_loader or self._load_artifact
        # The runtime the served model computes in (``tier.runtime`` once checked).
        self.runtime = "eager"
        self.stats = WorkerStats()
        self.stage: Stage | None = None
        # Dead-letters refused promotions; made on the first one. The batch producer cannot:
        # it is transactional, and the models topic is read outside any transaction.
        self._refusals: Producer | None = None

    # -- model -----------------------------------------------------------------------------
    def _load_artifact(self, version: str | None) -> Stage:
        """Load a version (``None``: the champion) to serve in the tier's checked runtime."""
        tier = self.tier
        stage = load_stage(self.settings.artifacts, tier.artifact, version, device=tier.device)
        folder = self.settings.artifacts / tier.artifact / stage.version
        served, self.runtime = runtime.serving(
            stage, folder, tier.runtime, device=tier.device, tier=tier.name
        )
        return cast(Stage, served)

    def _thresholds(self, stage: Stage) -> dict[str, LabelThresholds]:
        override = self.tier.thresholds
        if override is None:
            return dict(stage.thresholds)
        t = LabelThresholds(positive=override.positive, negative=override.negative)
        return {label: t for label in stage.classes}

    def _poll_promotions(self, models: Consumer) -> None:
        """Swap to a newly promoted model; called only between batches.

        A promotion whose artifact does not load (a version or tier name that is not a
        plain artifact name, weights whose SHA-256 is not the recorded one, a missing or
        broken artifact) is dead-lettered with the reason, and the current model keeps
        serving.
        """
        while True:
            msg = models.poll(0)
            if msg is None or msg.error():
                return
            try:
                _, promoted = self.codec.decode(msg.value(), expected="ModelPromoted")
            except PhenocascadeError as exc:
                log.warning("ignoring unreadable message on %s: %s", msg.topic(), exc)
                continue
            if promoted["tier"] != self.tier.artifact or (
                self.stage is not None and promoted["version"] == self.stage.version
            ):
                continue
            try:
                self.stage = self._load(promoted["version"])
            except Exception as exc:  # whatever the artifact's fault, this worker goes on
                self._refuse_promotion(msg, exc)
                continue
            self.stats.swaps.append(promoted["version"])
            SWAPS.labels(self.tier.name).inc()
            self._show_model()
            log.info("tier %s now serves model %s", self.tier.name, promoted["version"])

    def _refuse_promotion(self, msg: Message, exc: Exception) -> None:
        """Dead-letter a ``ModelPromoted`` whose artifact did not load, with the reason."""
        kind = exc.kind if isinstance(exc, PhenocascadeError) else "artifact"
        log.error(
            "tier %s refuses a promoted model and keeps its own: %s",
            self.tier.name,
            exc,
            exc_info=not isinstance(exc, PhenocascadeError),  # unexpected: keep its traceback
        )
        if self._refusals is None:
            self._refusals = plain_producer(self.settings.kafka)
        produce_dead_letter(
            self._refusals,
            self.codec,
            self.topology.dead_letter_topic,
            msg,
            tier=self.tier.name,
            error_kind=kind,
            reason=f"refused promoted model: {type(exc).__name__}: {exc}",
            image_id=None,
        )
        self._refusals.flush(10)  # rare, and run() knows nothing of this producer
        DEAD_LETTERS.labels(self.tier.name, kind).inc()

    def _show_model(self) -> None:
        """Export the model now served (``phenocascade_model_info``)."""
        stage = self.stage
        MODEL.labels(self.tier.name).info(
            {"name": stage.model_name, "version": stage.version, "runtime": self.runtime}
            if stage is not None
            else {"name": self.tier.backend, "version": NO_MODEL_VERSION, "runtime": "eager"}
        )

    # -- input -----------------------------------------------------------------------------
    def _pixels(self, submitted: dict[str, Any]) -> DecodedImage:
        image_id = submitted["image_id"]
        tile = submitted.get("tile")
        if tile is not None:
            pixels = read_tile(submitted["uri"], tile, settings=self.settings, what=image_id)
        elif submitted["inline"] is not None:
            data: bytes = submitted["inline"]
            if len(data) > self.settings.max_inline_bytes:
                raise BadInputError(
                    f"{image_id}: inline image of {len(data)} bytes exceeds max_inline_bytes="
                    f"{self.settings.max_inline_bytes}; submit it by URI instead"
                )
            pixels = decode_bytes(data, max_pixels=self.settings.max_image_pixels, what=image_id)
        elif submitted["uri"] is not None:
            pixels = read_image(
                submitted["uri"],
                roots=self.settings.roots(),
                max_pixels=self.settings.max_image_pixels,
                max_bytes=self.settings.max_file_bytes,
            )
        else:
            raise BadInputError(f"{image_id}: the submission has neither uri nor inline bytes")
        return DecodedImage(image_id=image_id, pixels=pixels)

    def _dead_letter(
        self, producer: Any, msg: Message, kind: str, reason: str, image_id: str | None
    ) -> None:
        produce_dead_letter(
            producer,
            self.codec,
            self.topology.dead_letter_topic,
            msg,
            tier=self.tier.name,
            error_kind=kind,
            reason=reason,
            image_id=image_id,
        )
        self.stats.dead_letters += 1

    def _predict(
        self, stage: Stage, images: Sequence[DecodedImage]
    ) -> list[StageOutput | Exception]:
        """Score the batch; if the batch fails, score images one by one to isolate the culprit."""
        if not images:
            return []
        try:
            return list(stage.predict(images))
        except Exception:
            log.exception("batch prediction failed in tier %s; retrying one by one", self.tier.name)
        results: list[StageOutput | Exception] = []
        for image in images:
            try:
                results.append(stage.predict([image])[0])
            except Exception as exc:
                results.append(exc)
        return results

    def _score(self, images: Sequence[DecodedImage]) -> _Scored:
        """Score and route images with the current model, or ask experts if there is none."""
        stage = self.stage
        if stage is None:
            kind, classes = tier_classes(self.tier)
            return _Scored(
                outputs=[StageOutput(scores={}) for _ in images],
                routes=[Route.ANNOTATE] * len(images),
                pending=[tuple(classes)] * len(images),
                kind=kind,
                model_name=self.tier.backend,
                version=NO_MODEL_VERSION,
                classes=classes,
            )
        thresholds = self._thresholds(stage)
        groups = exclusive_groups(stage.classes, self.tier.groups)
        started = time.monotonic()
        outputs = self._predict(stage, images)
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * (time.monotonic() - started))
        routes: list[Route] = []
        pending: list[tuple[str, ...]] = []
        for o in outputs:
            if isinstance(o, Exception):
                routes.append(Route.ANNOTATE)
                pending.append(())
                continue
            routes.append(route(stage.kind, o, thresholds, stage.gate_label, groups))
            pending.append(pending_labels(stage.kind, o, thresholds, stage.gate_label, groups))
        return _Scored(
            outputs=outputs,
            routes=routes,
            pending=pending,
            kind=stage.kind,
            model_name=stage.model_name,
            version=stage.version,
            classes=list(stage.classes),
        )

    def _priorities(self, images: Sequence[DecodedImage], scored: _Scored) -> list[float | None]:
        """Return the annotation-queue priority of each image, by the tier's ``acquisition``.

        Strategies of :mod:`phenocascade.models.acquisition`, mapped onto ``[0, 1]``
        (``random``: one priority for all, so arrival order). ``None`` leaves the request's
        default, the least sure label (1.0 for a novel image, which goes first whatever its
        scores): for ``uncertainty``, for an image not sent to a person or novel, and when
        there is no model.
        """
        strategy, stage = self.tier.acquisition, self.stage
        out: list[float | None] = [None] * len(images)
        asked = [
            j
            for j, (o, r) in enumerate(zip(scored.outputs, scored.routes, strict=True))
            if r is Route.ANNOTATE and isinstance(o, StageOutput) and not o.novel
        ]
        if strategy == "uncertainty" or stage is None or not asked:
            return out
        if strategy == "random":
            return [acquisition.RANDOM_PRIORITY if j in asked else None for j in range(len(out))]
        columns = acquisition.group_columns(
            stage.classes, getattr(stage, "softmax_groups", None) or ()
        )
        if strategy == "bald":
            try:
                draw = cast(Any, stage).sample_probabilities
                samples = draw([images[j] for j in asked])
            except (AttributeError, ConfigError) as exc:
                log.warning("tier %s: no BALD priority (%s); least sure label", self.tier.name, exc)
                return out
            values = acquisition.bald(samples, columns) / acquisition.max_bits(columns)
        else:
            outputs = [cast(StageOutput, scored.outputs[j]) for j in asked]
            probs = np.array([[o.scores.get(c, 0.0) for c in stage.classes] for o in outputs])
            values = acquisition.priority(strategy, probs, columns)
            if strategy == "entropy":
                values = values / acquisition.max_bits(columns)
        for j, v in zip(asked, values, strict=True):
            out[j] = float(np.clip(v, 0.0, 1.0))
        return out

    # -- one batch -------------------------------------------------------------------------
    def process_batch(self, consumer: Consumer, producer: Any, msgs: Sequence[Message]) -> None:
        """Decode, score, route and produce one batch inside one transaction."""
        producer.begin_transaction()
        tally = _BatchTally(self.tier.name, len(msgs))
        good: list[tuple[Message, dict[str, Any], DecodedImage]] = []
        for msg in msgs:
            raw_key = msg.key()
            image_id = raw_key.decode("utf-8", "replace") if raw_key else None
            try:
                _, submitted = self.codec.decode(msg.value(), expected="ImageSubmitted")
                # A slide's tile fails its slide: the slide is the image that was submitted.
                image_id = routing_key(submitted).decode()
                good.append((msg, submitted, self._pixels(submitted)))
            except BadInputError as exc:
                self._dead_letter(producer, msg, exc.kind, str(exc), image_id)
                tally.dead[exc.kind] = tally.dead.get(exc.kind, 0) + 1
        scored = self._score([g[2] for g in good])
        priorities = self._priorities([g[2] for g in good], scored)
        kind, model_name, version = scored.kind, scored.model_name, scored.version
        thresholds = self._thresholds(self.stage) if self.stage is not None else {}
        for (msg, submitted, _), output, decision, pending, priority in zip(
            good, scored.outputs, scored.routes, scored.pending, priorities, strict=True
        ):
            if isinstance(output, Exception):
                self._dead_letter(
                    producer,
                    msg,
                    "model_error",
                    f"{submitted['image_id']}: {type(output).__name__}: {output}",
                    routing_key(submitted).decode(),
                )
                tally.dead["model_error"] = tally.dead.get("model_error", 0) + 1
                continue
            key = routing_key(submitted)
            result = events.tier_result(
                submitted,
                tier=self.tier.name,
                kind=kind,
                route=decision,
                output=output,
                model_name=model_name,
                model_version=version,
                pending=pending,
            )
            producer.produce(
                self.tier.result_topic, key=key, value=self.codec.encode("TierResult", result)
            )
            if kind is StageKind.GATE and decision is not Route.ANNOTATE:
                target = self.tier.routes["pass" if decision is Route.PASS else "skip"]
                producer.produce(target, key=key, value=msg.value())
            if decision is Route.ANNOTATE:
                request = events.annotation_request(
                    submitted,
                    msg.value() or b"",
                    tier=self.tier.name,
                    output=output,
                    classes=scored.classes,
                    model_name=model_name,
                    model_version=version,
                    ask=[] if version == NO_MODEL_VERSION or output.novel else pending,
                    priority=priority,
                )
                producer.produce(
                    self.topology.annotate_topic,
                    key=key,
                    value=self.codec.encode("AnnotationRequest", request),
                )
            self.stats.routes[decision.value] = self.stats.routes.get(decision.value, 0) + 1
            tally.scored(decision, output, thresholds, pending)
        producer.send_offsets_to_transaction(
            consumer.position(consumer.assignment()), consumer.consumer_group_metadata()
        )
        producer.commit_transaction()
        tally.publish()
        self.stats.batches += 1
        self.stats.images += len(msgs)

    @staticmethod
    def _rewind(consumer: Consumer) -> None:
        """After an aborted transaction, go back to the last committed offsets."""
        for tp in consumer.committed(consumer.assignment(), timeout=10):
            if tp.offset >= 0:
                consumer.seek(tp)
            else:
                consumer.seek(TopicPartition(tp.topic, tp.partition, 0))

    # -- the loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event, max_images: int | None = None) -> WorkerStats:
        """Consume until ``stop`` is set (or ``max_images`` were processed).

        Returns
        -------
        WorkerStats
            What this run did.
        """
        kafka = self.settings.kafka
        if self.tier.threads is not None:
            set_compute_threads(self.tier.threads)
        # Promotions are read from the end the models topic has *before* the champion is
        # loaded: one announced while it loads (a minute on a loaded machine) is then
        # applied at once, instead of waiting for this worker's next restart.
        models = group_consumer(
            kafka, f"{self.tier.group}-models-{self.instance}", **{"auto.offset.reset": "latest"}
        )
        models.assign([partition_end(models, TopicPartition(self.topology.models_topic, 0))])
        try:
            self.stage = self._load(None)
            log.info(
                "tier %s serving %s %s", self.tier.name, self.stage.model_name, self.stage.version
            )
        except NoChampionError:
            tier_classes(self.tier)  # refuses a tier whose experts could not be asked anything
            log.info(
                "tier %s has no model yet: every image goes to annotation until one is promoted",
                self.tier.name,
            )
        self._show_model()
        consumer = group_consumer(kafka, self.tier.group)
        producer = transactional_producer(kafka, f"{self.tier.group}-{self.instance}")
        consumer.subscribe([self.tier.input])
        try:
            while not stop.is_set():
                self._poll_promotions(models)
                msgs = take_batch(consumer, self.tier.batch_size, self.tier.max_wait_ms / 1000)
                msgs = [m for m in msgs if not consumer_error(m)]
                if not msgs:
                    continue
                started = time.perf_counter()
                try:
                    self.process_batch(consumer, producer, msgs)
                except KafkaException as exc:
                    error = exc.args[0]
                    if not error.txn_requires_abort():
                        raise
                    log.warning("aborting transaction of tier %s: %s", self.tier.name, error)
                    producer.abort_transaction()
                    self._rewind(consumer)
                BATCH_SECONDS.labels(self.tier.name).observe(time.perf_counter() - started)
                if max_images is not None and self.stats.images >= max_images:
                    break
        finally:
            consumer.close()
            models.close()
            producer.flush(10)
        return self.stats
