"""Watermark queries retry the broker's transient answers and give up on the others."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from phenocascade.streams.scan import _watermarks


class _Flaky:
    """Answers ``errors`` in turn, then the watermarks."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls = 0

    def get_watermark_offsets(self, part: TopicPartition, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return 3, 9


def test_not_leader_and_unknown_partition_are_retried() -> None:
    consumer = _Flaky(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError._UNKNOWN_PARTITION)
    part = TopicPartition("t", 0)
    assert _watermarks(consumer, part, time.monotonic() + 10) == (3, 9)  # type: ignore[arg-type]
    assert consumer.calls == 3


def test_a_permanent_error_is_raised_at_once() -> None:
    consumer = _Flaky(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        _watermarks(consumer, TopicPartition("t", 0), time.monotonic() + 10)  # type: ignore[arg-type]
    assert consumer.calls == 1


def test_a_transient_error_past_the_deadline_is_raised() -> None:
    consumer = _Flaky(*[KafkaError.NOT_LEADER_FOR_PARTITION] * 100)
    with pytest.raises(KafkaException):
        _watermarks(consumer, TopicPartition("t", 0), time.monotonic() + 0.6)  # type: ignore[arg-type]
    assert 1 < consumer.calls < 100
