"""Consumer lag: a group's committed offsets against its topics' ends (no torch here).

Lag is measured from outside the consumer, by a client that reads the group's committed
offsets without joining it, so one reader serves a worker reporting its own group and
``phenocascade status`` reporting every group alike.
The end of a partition is its last stable offset (``read_committed``): records of an open
transaction are not yet lag. A group that has committed nothing on a partition starts
from its beginning (``auto.offset.reset=earliest`` everywhere in phenocascade), so all of
it counts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from phenocascade.config import KafkaSettings
from phenocascade.errors import InfraError
from phenocascade.streams.kafka import client_settings_checked

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionLag:
    """Where one consumer group stands on one partition.

    Attributes
    ----------
    topic, partition : str, int
        The partition.
    committed : int or None
        The group's committed offset (the next message it will read), ``None`` if none.
    start, end : int
        The partition's first offset and its last stable offset.
    """

    topic: str
    partition: int
    committed: int | None
    start: int
    end: int

    @property
    def lag(self) -> int:
        """Messages the group has still to commit: ``end - committed`` (or ``- start``)."""
        done = self.start if self.committed is None else max(self.committed, self.start)
        return max(0, self.end - done)

    @property
    def caught_up(self) -> bool:
        """Whether the group has read every record: a lag of at most 1.

        The marker that ends the last transaction written to a partition takes an offset,
        which a consumer's commit does not always cover, so 1 is no record waiting.
        """
        return self.lag <= 1


class LagReader:
    """Measure consumer groups' lag through a consumer that never joins the group.

    Each reading makes a consumer with the group's id that subscribes to nothing: its
    ``committed`` asks the group coordinator for the committed offsets (OffsetFetch) and
    its ``get_watermark_offsets`` the partitions' ends, which a ``read_committed``
    consumer gets as last stable offsets (librdkafka 1.8 and later). The consumer is
    closed after the reading. The admin client's ``list_consumer_group_offsets`` is not
    used: after a broker restart its timed-out requests abort the process
    (``rd_kafka_enq_once_del_source_return: Assertion `eonce->refcnt > 0' failed``,
    confluentinc/librdkafka#4605 and #3663), which killed the joiner of the chaos drill
    through its stall watch.

    Parameters
    ----------
    kafka : KafkaSettings
        How to reach Kafka.
    timeout_s : float, default 10.0
        How long each request may take.
    """

    def __init__(self, kafka: KafkaSettings, timeout_s: float = 10.0) -> None:
        self.kafka = kafka
        self.timeout_s = timeout_s
        self._consumer("phenocascade-lag").close()  # bad client settings: one line, now

    def _consumer(self, group: str) -> Consumer:
        with client_settings_checked():
            return Consumer(
                self.kafka.config(
                    **{
                        "group.id": group,
                        "enable.auto.commit": False,
                        "isolation.level": "read_committed",
                    }
                )
            )

    def lag(self, group: str, topics: Sequence[str]) -> list[PartitionLag]:
        """Return where ``group`` stands on every partition of ``topics``.

        A topic that does not exist has no partitions.

        Raises
        ------
        InfraError
            If Kafka does not answer.
        """
        consumer = self._consumer(group)
        try:
            meta = consumer.list_topics(timeout=self.timeout_s).topics
            parts = [
                TopicPartition(t, p)
                for t in topics
                if t in meta and meta[t].error is None
                for p in sorted(meta[t].partitions)
            ]
            if not parts:
                return []
            committed = {
                (tp.topic, tp.partition): tp.offset
                for tp in consumer.committed(parts, timeout=self.timeout_s)
                if tp.offset >= 0
            }
            marks = {
                (tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=self.timeout_s)
                for tp in parts
            }
        except KafkaException as exc:
            raise InfraError(
                f"cannot read the offsets of group {group} at {self.kafka.bootstrap_servers} "
                f"({exc}); is Kafka up (`phenocascade infra status`)?"
            ) from exc
        finally:
            consumer.close()
        return [
            PartitionLag(
                tp.topic,
                tp.partition,
                committed.get((tp.topic, tp.partition)),
                int(marks[(tp.topic, tp.partition)][0]),
                int(marks[(tp.topic, tp.partition)][1]),
            )
            for tp in parts
        ]

    def measure(self, group: str, topics: Sequence[str]) -> dict[tuple[str, int], tuple[int, int]]:
        """Return ``{(topic, partition): (committed offset or -1, lag)}`` of ``group``.

        The shape :func:`phenocascade.observability.watch_lag` expects.
        """
        return {
            (p.topic, p.partition): (-1 if p.committed is None else p.committed, p.lag)
            for p in self.lag(group, topics)
        }


class StallWatch:
    """Notice a consumer group that stopped committing on a partition with records waiting.

    A consumer can stall without dying: a client library that lost a partition's fetcher
    in a broker restart (seen with the joiner's aiokafka in the chaos drill: one partition
    stuck for good, every other one served) keeps its process alive and its group
    membership, so no supervisor restarts it and no rebalance moves the partition. From
    outside, through the committed offsets, the stall shows: records wait (the partition
    is not :attr:`~PartitionLag.caught_up`) while the committed offset stays put.

    Parameters
    ----------
    stall_s : float
        Seconds a partition may wait with an unchanged committed offset before it counts
        as stalled. Allow for a slow batch and for the consumer's own start (a joiner
        restoring its tables commits nothing meanwhile).
    """

    def __init__(self, stall_s: float) -> None:
        if stall_s <= 0:
            raise ValueError(f"stall_s must be positive, not {stall_s}")
        self.stall_s = stall_s
        self._since: dict[tuple[str, int], tuple[int | None, float]] = {}

    def check(self, lags: Sequence[PartitionLag], now: float) -> list[tuple[PartitionLag, float]]:
        """Return the stalled partitions of one reading, with the seconds each has stalled.

        Parameters
        ----------
        lags : sequence of PartitionLag
            One reading of the group (:meth:`LagReader.lag`).
        now : float
            The reading's time, in the seconds of a monotonic clock.
        """
        stalled = []
        for p in lags:
            key = (p.topic, p.partition)
            seen = self._since.get(key)
            if p.caught_up:
                self._since.pop(key, None)
            elif seen is None or seen[0] != p.committed:
                self._since[key] = (p.committed, now)
            elif now - seen[1] >= self.stall_s:
                stalled.append((p, now - seen[1]))
        return stalled


def watch_stalls(
    reader: LagReader,
    group: str,
    topics: Sequence[str],
    *,
    stall_s: float,
    on_stall: Callable[[PartitionLag, float], None],
    interval_s: float = 10.0,
) -> threading.Thread:
    """Read ``group``'s lag every ``interval_s`` and call ``on_stall`` on a stalled partition.

    Returns the started daemon thread. A failed reading is logged and the next one tries
    again (a broker restart is no stall); ``on_stall`` is called once, for the first
    stalled partition, and the thread ends.
    """
    watch = StallWatch(stall_s)

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            try:
                lags = reader.lag(group, topics)
            except InfraError as exc:
                log.warning("cannot read the offsets of group %s: %s", group, exc)
                continue
            for partition, seconds in watch.check(lags, time.monotonic()):
                on_stall(partition, seconds)
                return

    thread = threading.Thread(target=loop, name=f"stalls-{group}", daemon=True)
    thread.start()
    return thread
