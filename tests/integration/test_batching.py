"""A worker's batch is what its consumer holds: it never waits for a batch to fill."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from phenocascade.config import Settings
from phenocascade.consumers.worker import take_batch
from phenocascade.streams.kafka import group_consumer, plain_producer

pytestmark = [pytest.mark.integration]


def test_a_batch_takes_what_is_there_without_waiting_to_fill(kafka_settings: Settings) -> None:
    kafka = kafka_settings.kafka
    topic = f"batching-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka.config())
    for future in admin.create_topics([NewTopic(topic, 1)]).values():
        future.result(timeout=30)
    consumer = group_consumer(kafka, f"batching-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    try:
        assert take_batch(consumer, 8, 1.0) == []  # nothing there: waits, returns none
        producer = plain_producer(kafka)
        for i in range(3):
            producer.produce(topic, key=b"k", value=str(i).encode())
        assert producer.flush(30) == 0
        started, taken = time.monotonic(), []
        while len(taken) < 3:
            batch = take_batch(consumer, 8, 60.0)
            assert batch, "a message was there, yet none was taken"
            taken += [m.value() for m in batch]
        # Three messages of a batch of 8: waiting for the batch to fill would take 60 s.
        assert time.monotonic() - started < 30
        assert taken == [b"0", b"1", b"2"]
        producer.produce(topic, value=b"3")
        producer.produce(topic, value=b"4")
        assert producer.flush(30) == 0
        assert [m.value() for m in take_batch(consumer, 1, 60.0)] == [b"3"]
        assert [m.value() for m in take_batch(consumer, 1, 60.0)] == [b"4"]
    finally:
        consumer.close()
