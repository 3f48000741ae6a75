"""Publish records in Kafka transactions, and find which of them landed.

A batch of records (``ImageSubmitted`` from ``watch``, ``ImageOutput`` from the joiner)
goes out in one transaction, so a reader with ``isolation.level=read_committed`` (every
tier worker, :func:`scan_topic`) sees all of it or none of it. The transactional id is
stable per publisher: a restarted one fences its crashed predecessor and aborts the
transaction it left open. Only a commit whose answer was lost, or a crash right after a
commit, is ambiguous; :meth:`TransactionalPublisher.landed` and
:meth:`TransactionalPublisher.committed_since` read the topic's tail to settle it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from phenocascade.config import KafkaSettings
from phenocascade.errors import InfraError, SchemaError
from phenocascade.streams.kafka import transactional_producer
from phenocascade.streams.scan import offsets_at, scan_topic
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import routing_key

log = logging.getLogger(__name__)


class TransactionalPublisher:
    """Publish batches of records to one topic, a transaction per batch.

    Parameters
    ----------
    kafka : KafkaSettings
        How to reach Kafka.
    topic : str
        The topic (the submitted topic for a watcher, the results topic for the joiner).
    transactional_id : str
        Stable per publisher (one watcher state, one joiner app on one host: one id).
    timeout_s : float, default 10.0
        How long one attempt (connect, deliver, commit, read the tail) may wait on the
        broker before it counts as failed.
    event : str, default "ImageSubmitted"
        The schema of the records.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        transactional_id: str,
        *,
        timeout_s: float = 10.0,
        event: str = "ImageSubmitted",
    ) -> None:
        self.kafka = kafka
        self.topic = topic
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        self.event = event
        self._codec = EventCodec()
        self._producer: Producer | None = None
        self._ready = False

    @property
    def connected(self) -> bool:
        """Whether the producer is ready (set by :meth:`connect`, cleared by a failure)."""
        return self._ready

    def connect(self) -> None:
        """Make the producer ready; any transaction a predecessor left open is aborted.

        The same producer is kept across attempts while the broker is away (librdkafka
        resumes a timed-out ``init_transactions`` and reports a broker that stays down once).

        Raises
        ------
        InfraError
            If the broker does not answer within ``timeout_s``.
        """
        if self._producer is None:
            self._producer = transactional_producer(
                self.kafka, self.transactional_id, init_timeout_s=None
            )
        try:
            self._producer.init_transactions(self.timeout_s)
        except KafkaException as exc:
            error = exc.args[0]
            if not error.retriable():
                self._producer = None
            raise InfraError(
                f"Kafka at {self.kafka.bootstrap_servers} does not answer: {error.str()}"
            ) from exc
        self._ready = True

    def send(self, records: Sequence[Mapping[str, Any]]) -> dict[int, int]:
        """Publish ``records`` (keyed by image id; a tile, by its slide's) in one transaction.

        Returns
        -------
        dict of int to int
            ``{partition: offset after the last record written there}``, once committed.

        Raises
        ------
        InfraError
            If the transaction is not known to be committed. The producer is then dropped:
            call :meth:`connect` again (which aborts the transaction if it is still open)
            and :meth:`landed` to learn whether its commit went through.
        """
        if self._producer is None or not self._ready:
            raise InfraError("not connected to Kafka")
        producer = self._producer
        offsets: dict[int, int] = {}
        failures: list[KafkaError] = []

        def delivered(error: KafkaError | None, msg: Message) -> None:
            if error is not None:
                failures.append(error)
                return
            part, offset = msg.partition(), msg.offset()
            if part is not None and offset is not None:
                offsets[part] = max(offsets.get(part, 0), offset + 1)

        try:
            producer.begin_transaction()
            for record in records:
                value = self._codec.encode(self.event, record)
                producer.produce(
                    self.topic, key=routing_key(record), value=value, on_delivery=delivered
                )
            if producer.flush(self.timeout_s) or failures:
                reason = (
                    failures[0].str() if failures else f"not delivered in {self.timeout_s:.0f} s"
                )
                raise InfraError(f"Kafka did not take the batch: {reason}")
            producer.commit_transaction(self.timeout_s)
        except (KafkaException, BufferError, InfraError) as exc:
            self.close()
            reason = exc.args[0].str() if isinstance(exc, KafkaException) else str(exc)
            raise InfraError(f"batch of {len(records)} not committed: {reason}") from exc
        return offsets

    def landed(self, start: Mapping[int, int]) -> set[str]:
        """Return the keys of the committed messages on the topic from ``start`` on.

        Raises
        ------
        InfraError
            If the topic cannot be read to its end.
        """
        try:
            scan = scan_topic(self.kafka, self.topic, self.timeout_s, start=start, must_finish=True)
            return {key.decode() for key, _ in scan if key}
        except KafkaException as exc:
            raise InfraError(f"cannot read {self.topic}: {exc.args[0].str()}") from exc

    def committed_since(self, epoch_ms: int) -> list[tuple[str, dict[str, Any]]]:
        """Return ``(key, record)`` of each committed message stamped ``epoch_ms`` or later.

        Messages are found by their timestamps (the producer's clock: a record sent after
        ``epoch_ms`` on the clock that gave it is found), on every partition. A message
        that is not a record of this publisher's schema is left out.

        Raises
        ------
        InfraError
            If the topic cannot be read to its end.
        """
        try:
            start = offsets_at(self.kafka, self.topic, epoch_ms, self.timeout_s)
            scan = scan_topic(self.kafka, self.topic, self.timeout_s, start=start, must_finish=True)
            found = []
            for key, value in scan:
                with contextlib.suppress(SchemaError):
                    record = self._codec.decode(value, self.event)[1]
                    found.append(((key or b"").decode(errors="replace"), record))
            return found
        except KafkaException as exc:
            raise InfraError(f"cannot read {self.topic}: {exc.args[0].str()}") from exc

    def close(self) -> None:
        """Drop the producer, purging anything a failed transaction still holds."""
        # A purged producer can never deliver the failed batch later; the next connect()
        # fences it in any case.
        if self._producer is not None:
            self._producer.purge()
        self._producer, self._ready = None, False
