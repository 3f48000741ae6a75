"""The annotation sink: materialise the ``annotate`` topic into the annotation task table.

One consumer group (the topology's ``sink_group``) reads ``AnnotationRequest`` events
and writes each as a task (:func:`~phenocascade.store.annotations.add_task`, idempotent per
image and tier). Offsets are committed only after the batch's writes (and dead letters) are
done, so a crash replays the batch and the replay changes nothing. A message that cannot
be decoded, or names a tier the topology does not have, goes to the dead-letter topic with
its reason, and the sink goes on.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from cassandra.cluster import Session
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from prometheus_client import Counter

from phenocascade.config import Settings, Topology
from phenocascade.errors import BadInputError, InfraError, SchemaError
from phenocascade.observability import DEAD_LETTERS
from phenocascade.store.annotations import add_task
from phenocascade.store.cassandra import connect
from phenocascade.streams.kafka import (
    consumer_error,
    group_consumer,
    plain_producer,
    produce_dead_letter,
)
from phenocascade.streams.serde import EventCodec

log = logging.getLogger(__name__)

SINK_NAME = "annotation_sink"

TASKS = Counter("phenocascade_annotation_tasks_total", "Annotation requests sunk", ["created"])


@dataclass
class SinkStats:
    """Counts of one sink run."""

    messages: int = 0
    created: int = 0
    duplicates: int = 0
    dead_letters: int = 0


class AnnotationSink:
    """Consume ``AnnotationRequest`` events into the task table.

    Parameters
    ----------
    settings : Settings
        Kafka and Cassandra settings.
    topology : Topology
        Names the annotate and dead-letter topics and the known tiers.
    session : cassandra.cluster.Session or None, default None
        Cassandra session; ``None`` connects with ``settings.cassandra``.
    group : str or None, default None
        Consumer group id; ``None`` takes the topology's ``sink_group``.
    batch_size : int, default 64
        Most messages handled per commit.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        topology: Topology,
        session: Session | None = None,
        group: str | None = None,
        batch_size: int = 64,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.group = group or topology.sink_group
        self.batch_size = batch_size
        self.codec = EventCodec()
        self.stats = SinkStats()
        self._session = session
        self._tiers = {t.name for t in topology.tiers}

    def _request(self, msg: Message) -> dict[str, Any]:
        """Decode and check one message; raise a :class:`BadInputError` if it is unusable."""
        _, request = self.codec.decode(msg.value(), expected="AnnotationRequest")
        if request["tier"] not in self._tiers:
            raise BadInputError(
                f"annotation request for image {request['image_id']} names tier "
                f"{request['tier']!r}, which the topology does not have "
                f"({sorted(self._tiers)}); fix the producer's topology"
            )
        if not request["classes"]:
            raise SchemaError(
                f"annotation request for image {request['image_id']} has no classes to choose from"
            )
        return request

    def _dead_letter(self, producer: Producer, msg: Message, exc: BadInputError) -> None:
        key = msg.key()
        produce_dead_letter(
            producer,
            self.codec,
            self.topology.dead_letter_topic,
            msg,
            tier=SINK_NAME,
            error_kind=exc.kind,
            reason=str(exc),
            image_id=key.decode("utf-8", "replace") if key else None,
        )
        self.stats.dead_letters += 1
        DEAD_LETTERS.labels(SINK_NAME, exc.kind).inc()

    def process(self, session: Session, producer: Producer, msgs: list[Message]) -> None:
        """Write one batch of tasks; dead letters are flushed before this returns.

        Raises
        ------
        InfraError
            If a dead letter was not acknowledged by Kafka (the batch is then not committed).
        """
        for msg in msgs:
            try:
                request = self._request(msg)
            except BadInputError as exc:
                self._dead_letter(producer, msg, exc)
                continue
            created = add_task(session=session, request=request)
            self.stats.created += created
            self.stats.duplicates += not created
            TASKS.labels(str(created).lower()).inc()
        self.stats.messages += len(msgs)
        if producer.flush(30):
            raise InfraError("dead letters were not acknowledged by Kafka within 30 s")

    @staticmethod
    def caught_up(consumer: Consumer) -> bool:
        """Whether every assigned partition has been read to its current end."""
        assignment = consumer.assignment()
        if not assignment:
            return False
        committed = {
            (tp.topic, tp.partition): tp.offset for tp in consumer.committed(assignment, timeout=10)
        }
        for tp in consumer.position(assignment):
            low, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=10, cached=False
            )
            # A partition nothing was returned from yet has no position: it resumes from the
            # group's committed offset, or from the start (auto.offset.reset=earliest).
            offset = tp.offset
            if offset < 0:
                offset = committed.get((tp.topic, tp.partition), -1)
            if offset < 0:
                offset = low
            if offset < high:
                return False
        return True

    def run(
        self,
        stop: threading.Event,
        *,
        until_caught_up: bool = False,
        max_messages: int | None = None,
    ) -> SinkStats:
        """Consume until ``stop`` is set.

        Parameters
        ----------
        stop : threading.Event
            Set it to stop after the current batch.
        until_caught_up : bool, default False
            Also stop once every partition has been read to its end (tests, one-shot runs).
        max_messages : int or None, default None
            Also stop after this many messages.

        Returns
        -------
        SinkStats
            What this run did.
        """
        session = self._session or connect(self.settings.cassandra)
        consumer = group_consumer(self.settings.kafka, self.group)
        producer = plain_producer(self.settings.kafka)
        consumer.subscribe([self.topology.annotate_topic])
        try:
            while not stop.is_set():
                msgs = [m for m in consumer.consume(self.batch_size, 0.5) if not consumer_error(m)]
                if msgs:
                    self.process(session, producer, msgs)
                    consumer.commit(asynchronous=False)
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
                if until_caught_up and not msgs and self.caught_up(consumer):
                    break
        finally:
            consumer.close()
            producer.flush(10)
        return self.stats
