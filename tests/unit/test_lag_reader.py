"""LagReader: each reading on a consumer of its own that never joins the group, closed after.

librdkafka's admin client aborts the process in its group-offsets requests once a broker
restart left requests timed out on it (confluentinc/librdkafka#4605, #3663).
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from phenocascade.config import KafkaSettings
from phenocascade.errors import InfraError
from phenocascade.streams import lag


class _Consumer:
    """A consumer of one partition; the first one read from times out, as after a restart."""

    made: list[_Consumer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.broken = len(_Consumer.made) == 1  # the first after the settings check
        self.closed = self.subscribed = False
        _Consumer.made.append(self)

    def list_topics(self, timeout: float) -> Any:
        if self.broken:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        topic = type("Topic", (), {"error": None, "partitions": {0: None}})()
        return type("Meta", (), {"topics": {"tier.quality": topic}})()

    def committed(self, parts: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 40) for tp in parts]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        return 0, 42

    def subscribe(self, topics: list[str]) -> None:
        self.subscribed = True

    def close(self) -> None:
        self.closed = True


def test_each_reading_has_a_consumer_of_its_own_that_never_joins_the_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _Consumer.made.clear()
    monkeypatch.setattr(lag, "Consumer", _Consumer)
    reader = lag.LagReader(KafkaSettings(bootstrap_servers="127.0.0.1:9092"))
    with pytest.raises(InfraError, match="cannot read the offsets of group g"):
        reader.lag("g", ["tier.quality"])
    (reading,) = reader.lag("g", ["tier.quality"])
    assert (reading.committed, reading.end, reading.lag) == (40, 42, 2)
    assert len(_Consumer.made) == 3  # the settings check, then one per reading
    assert all(c.closed and not c.subscribed for c in _Consumer.made)
    used = _Consumer.made[1:]
    assert {c.config["group.id"] for c in used} == {"g"}
    assert all(c.config["isolation.level"] == "read_committed" for c in used)
    assert not any(c.config["enable.auto.commit"] for c in used)
