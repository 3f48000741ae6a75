"""Publish saved annotations to Kafka, and send images an expert cleared back into the cascade."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Message
from prometheus_client import Counter

from phenocascade.config import KafkaSettings, Topology
from phenocascade.errors import InfraError
from phenocascade.streams.kafka import plain_producer
from phenocascade.streams.serde import EventCodec

PUBLISHED = Counter(
    "phenocascade_ui_annotations_total",
    "Annotations the app published, by tier and whether the image re-entered the cascade",
    ["tier", "reentry"],
)


class AnnotationPublisher:
    """One idempotent producer shared by the app's request threads.

    Parameters
    ----------
    kafka : KafkaSettings
        How to reach Kafka.
    topology : Topology
        Names the annotations topic.
    timeout_s : float, default 30.0
        How long a save waits for Kafka's acknowledgements.
    """

    def __init__(self, kafka: KafkaSettings, topology: Topology, timeout_s: float = 30.0) -> None:
        self.topology = topology
        self.timeout_s = timeout_s
        self.codec = EventCodec()
        self._producer = plain_producer(kafka)
        # A save waits for its own acknowledgements; one save at a time keeps each
        # flush's delivery reports with the request that produced them.
        self._lock = threading.Lock()

    def publish(self, annotation: Mapping[str, Any], *, reentry: tuple[str, bytes] | None) -> None:
        """Produce an ``Annotation`` (keyed by image id) and wait until Kafka has it.

        Parameters
        ----------
        annotation : Mapping
            An ``Annotation`` record.
        reentry : tuple of (str, bytes) or None
            ``(topic, original ImageSubmitted bytes)`` to produce with the same key, so an
            image an expert marked clear re-enters the cascade after the gate.

        Raises
        ------
        InfraError
            If Kafka did not acknowledge every message within ``timeout_s``.
        """
        key = str(annotation["image_id"]).encode()
        failures: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                failures.append(err)

        with self._lock:
            self._producer.produce(
                self.topology.annotations_topic,
                key=key,
                value=self.codec.encode("Annotation", annotation),
                on_delivery=on_delivery,
            )
            if reentry is not None:
                topic, submitted = reentry
                self._producer.produce(topic, key=key, value=submitted, on_delivery=on_delivery)
            remaining = self._producer.flush(self.timeout_s)
        if remaining or failures:
            raise InfraError(
                f"Kafka did not acknowledge the annotation of {annotation['image_id']} "
                f"({failures or f'{remaining} pending'}); the task stays open, save again"
            )
        PUBLISHED.labels(annotation["tier"], str(reentry is not None).lower()).inc()

    def close(self) -> None:
        """Deliver what is still queued."""
        self._producer.flush(self.timeout_s)
