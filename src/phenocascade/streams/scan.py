"""Read a topic once, from its beginning (or given offsets) to its current end."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from phenocascade.config import KafkaSettings
from phenocascade.errors import InfraError
from phenocascade.streams.kafka import client_settings_checked

# Answers a broker gives for a moment after a topic is created (its metadata can name the
# leader before the partition is loaded there) or while leadership moves. librdkafka does
# not always flag them retriable on a watermark query, so they are named here.
_TRANSIENT = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)


def _transient(error: KafkaError) -> bool:
    return bool(error.retriable()) or error.code() in _TRANSIENT


def _watermarks(consumer: Consumer, part: TopicPartition, deadline: float) -> tuple[int, int]:
    """Return ``(low, high)`` of ``part``, retrying while the broker says a retriable error.

    Right after a topic is created (or while a broker moves leadership) the broker answers
    ``NOT_LEADER_FOR_PARTITION`` or ``LEADER_NOT_AVAILABLE`` for a moment.
    """
    while True:
        try:
            low, high = consumer.get_watermark_offsets(
                part, timeout=max(1.0, deadline - time.monotonic())
            )
            return int(low), int(high)
        except KafkaException as exc:
            if not _transient(exc.args[0]) or time.monotonic() >= deadline:
                raise
            time.sleep(0.25)


def offsets_at(
    kafka: KafkaSettings, topic: str, epoch_ms: int, timeout_s: float = 30.0
) -> dict[int, int]:
    """Return, per partition of ``topic``, the first offset stamped ``epoch_ms`` or later.

    A partition with no such message maps to its current end, so that
    :func:`scan_topic` given the result as ``start`` reads exactly the messages stamped
    ``epoch_ms`` or later.

    Raises
    ------
    KafkaException
        If the broker does not answer within ``timeout_s``.
    """
    with client_settings_checked():
        consumer = Consumer(
            kafka.config(
                **{"group.id": f"phenocascade-scan-{uuid.uuid4().hex}", "enable.auto.commit": False}
            )
        )
    try:
        deadline = time.monotonic() + timeout_s
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            return {}
        found = consumer.offsets_for_times(
            [TopicPartition(topic, p, epoch_ms) for p in meta.partitions], timeout=timeout_s
        )
        starts = {}
        for part in found:
            if part.error is not None:
                raise KafkaException(part.error)
            starts[part.partition] = (
                part.offset
                if part.offset >= 0
                else _watermarks(consumer, TopicPartition(topic, part.partition), deadline)[1]
            )
        return starts
    finally:
        consumer.close()


def scan_topic(
    kafka: KafkaSettings,
    topic: str,
    timeout_s: float = 30.0,
    *,
    start: Mapping[int, int] | None = None,
    must_finish: bool = False,
) -> Iterator[tuple[bytes | None, bytes | None]]:
    """Yield ``(key, value)`` of every committed message now in ``topic``.

    It uses a throw-away consumer group that commits nothing, and stops at each
    partition's end as it was when the scan started. ``start`` maps a partition to the
    offset to read it from (default: its beginning), so a caller that remembers where it
    stopped reads only the tail. A poll that waits ``timeout_s`` for nothing ends the
    scan early; with ``must_finish`` it raises :class:`~phenocascade.errors.InfraError`
    instead, for callers that must not mistake a slow broker for an absent message.
    """
    with client_settings_checked():
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
        deadline = time.monotonic() + timeout_s
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            return
        remaining: dict[int, int] = {}
        assign = []
        for p in meta.partitions:
            low, high = _watermarks(consumer, TopicPartition(topic, p), deadline)
            first = max(low, (start or {}).get(p, low))
            if high > first:
                remaining[p] = high
                begin = OFFSET_BEGINNING if first == low else first
                assign.append(TopicPartition(topic, p, begin))
        consumer.assign(assign)
        while remaining:
            msg = consumer.poll(timeout_s)
            if msg is None:
                if must_finish:
                    raise InfraError(
                        f"{topic}: partitions {sorted(remaining)} not read to their end "
                        f"in {timeout_s:.0f} s"
                    )
                return
            part = msg.partition()
            assert part is not None
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    # Under read_committed, control records can sit before the high mark.
                    remaining.pop(part, None)
                elif not _transient(error):
                    raise KafkaException(error)
                continue
            offset = msg.offset()
            assert offset is not None
            yield msg.key(), msg.value()
            if offset + 1 >= remaining.get(part, 0):
                remaining.pop(part, None)
    finally:
        consumer.close()
