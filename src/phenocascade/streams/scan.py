"""Read a whole topic once, from the beginning to its current end (reports and tests)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from phenocascade.config import KafkaSettings


def scan_topic(
    kafka: KafkaSettings, topic: str, timeout_s: float = 30.0
) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Yield ``(key, value)`` of every committed message now in ``topic``.

    It uses a throw-away consumer group that commits nothing, and stops at each
    partition's end as it was when the scan started.
    """
    consumer = Consumer(
        kafka.config(
            **{
                "group.id": f"phenocascade-scan-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
            }
        )
    )
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            return
        remaining: dict[int, int] = {}
        assign = []
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                remaining[p] = high
                assign.append(TopicPartition(topic, p, OFFSET_BEGINNING))
        consumer.assign(assign)
        while remaining:
            msg = consumer.poll(timeout_s)
            if msg is None:
                return
            part = msg.partition()
            assert part is not None
            if msg.error():
                # Partition EOF: under read_committed, control records can sit before the high mark.
                remaining.pop(part, None)
                continue
            offset = msg.offset()
            assert offset is not None
            yield msg.key(), msg.value()
            if offset + 1 >= remaining.get(part, 0):
                remaining.pop(part, None)
    finally:
        consumer.close()
