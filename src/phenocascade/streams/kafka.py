"""confluent-kafka client factories and topic administration (no torch here)."""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from phenocascade.config import KafkaSettings, Topology
from phenocascade.errors import ConfigError, InfraError
from phenocascade.streams import events
from phenocascade.streams.serde import EventCodec

log = logging.getLogger(__name__)


@contextlib.contextmanager
def client_settings_checked() -> Iterator[None]:
    """Turn librdkafka's refusal of a client config into a one-line :class:`ConfigError`.

    Wrap the construction of a producer, consumer or admin client: librdkafka checks its
    settings there (unknown property, bad value, unreadable ``ssl.ca.location``...).
    """
    try:
        yield
    except KafkaException as exc:
        raise ConfigError(
            f"PHENOCASCADE_KAFKA__CLIENT: the Kafka client refused its settings: "
            f"{exc.args[0].str()}"
        ) from exc


def transactional_producer(
    kafka: KafkaSettings, transactional_id: str, *, init_timeout_s: float | None = 30.0
) -> Producer:
    """Return a producer ready for transactions (``init_transactions`` already called).

    A stable ``transactional_id`` per worker instance lets a restarted worker fence its
    crashed predecessor and abort its open transaction at once. With ``init_timeout_s=None``
    the caller calls ``init_transactions`` itself, and may retry it on the same producer
    while the broker is away.

    Raises
    ------
    InfraError
        If ``init_transactions`` fails: the broker refused the credentials or the TLS
        handshake, or did not answer within ``init_timeout_s``.
    ConfigError
        If the client settings are invalid (``PHENOCASCADE_KAFKA__CLIENT``).
    """
    # The client's latest errors, to tell a refusal from silence if the start fails.
    errors: deque[KafkaError] = deque(maxlen=16)
    with client_settings_checked():
        producer = Producer(
            kafka.config(
                **{
                    "transactional.id": transactional_id,
                    "enable.idempotence": True,
                    "transaction.timeout.ms": 60000,
                    "linger.ms": 5,
                    "message.max.bytes": 16 * 1024 * 1024,
                    "error_cb": errors.append,
                }
            )
        )
    if init_timeout_s is not None:
        try:
            producer.init_transactions(init_timeout_s)
        except KafkaException as exc:
            producer.poll(0)  # serves the error callbacks still queued
            raise InfraError(
                _refusal(kafka, list(errors))
                or _silence(kafka, f"did not start the transactions of {transactional_id!r}", exc)
            ) from exc
    return producer


def plain_producer(kafka: KafkaSettings) -> Producer:
    """Return an idempotent, non-transactional producer (submit, UI, tests)."""
    with client_settings_checked():
        return Producer(
            kafka.config(
                **{
                    "enable.idempotence": True,
                    "linger.ms": 5,
                    "message.max.bytes": 16 * 1024 * 1024,
                }
            )
        )


def group_consumer(kafka: KafkaSettings, group: str, **extra: Any) -> Consumer:
    """Return a consumer that reads only committed data and never auto-commits."""
    conf = kafka.config(
        **{
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
            "max.poll.interval.ms": 600000,
            "fetch.max.bytes": 64 * 1024 * 1024,
            **extra,
        }
    )
    with client_settings_checked():
        return Consumer(conf)


def create_topics(kafka: KafkaSettings, topology: Topology, timeout_s: float = 30.0) -> list[str]:
    """Create every topic of ``topology`` that does not exist yet.

    Returns
    -------
    list of str
        Names of the topics created by this call (existing ones are left as they are).

    Raises
    ------
    InfraError
        If the broker does not answer, refuses the client's credentials or a topic.
    ConfigError
        If the client settings are invalid (``PHENOCASCADE_KAFKA__CLIENT``).
    """
    errors: list[KafkaError] = []
    with client_settings_checked():
        admin = AdminClient(kafka.config(error_cb=errors.append))
    deadline = time.monotonic() + timeout_s
    while True:
        # In slices, so that refused credentials end the wait at once: librdkafka would
        # retry them until the timeout.
        try:
            existing = set(admin.list_topics(timeout=min(1.0, timeout_s)).topics)
            break
        except KafkaException as exc:
            admin.poll(0)  # serves the error callbacks still queued
            refusal = _refusal(kafka, errors)
            if refusal is not None:
                raise InfraError(refusal) from exc
            if time.monotonic() >= deadline:
                raise InfraError(_silence(kafka, "does not answer", exc)) from exc
    new = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=-1,
            config={
                "retention.ms": str(spec.retention_ms),
                "cleanup.policy": spec.cleanup_policy,
                "max.message.bytes": str(16 * 1024 * 1024),
            },
        )
        for spec in topology.topics
        if spec.name not in existing
    ]
    created: list[str] = []
    if not new:
        return created
    for name, future in admin.create_topics(new, operation_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise InfraError(f"cannot create topic {name}: {exc}") from exc
    _wait_for_leaders(admin, created, timeout_s)
    return created


def _refusal(kafka: KafkaSettings, errors: list[KafkaError]) -> str | None:
    """Say why Kafka refused the client, if it did: the credentials, or the TLS handshake.

    ``errors`` are those the client reported while trying (its ``error_cb``); a failed
    request itself only says that no broker answered.
    """
    where = f"Kafka at {kafka.bootstrap_servers}"
    for error in errors:
        if error.code() == KafkaError._AUTHENTICATION:
            return (
                f"{where} refused the client's credentials ({error.str()}); check "
                "sasl.mechanism, sasl.username and sasl.password in PHENOCASCADE_KAFKA__CLIENT"
            )
        if error.code() == KafkaError._SSL:
            return (
                f"{where}: the TLS handshake failed ({error.str()}); check ssl.ca.location in "
                "PHENOCASCADE_KAFKA__CLIENT"
            )
    return None


def _silence(kafka: KafkaSettings, what: str, exc: KafkaException) -> str:
    """Say that Kafka did ``what`` without refusing anything, and what may be wrong."""
    return (
        f"Kafka at {kafka.bootstrap_servers} {what} ({exc.args[0].str()}); run `phenocascade "
        "infra up`, or, if it requires TLS or SASL, set security.protocol and the credentials "
        "in PHENOCASCADE_KAFKA__CLIENT"
    )


def _wait_for_leaders(admin: AdminClient, topics: list[str], timeout_s: float) -> None:
    """Wait until every partition of ``topics`` has a leader.

    Without it the first client of a topic this process just created may see
    ``NOT_LEADER_FOR_PARTITION``.
    """
    deadline = time.monotonic() + timeout_s
    pending = set(topics)
    while pending:
        meta = admin.list_topics(timeout=timeout_s).topics
        pending = {
            t
            for t in pending
            if t not in meta
            or meta[t].error is not None
            or any(p.leader < 0 or p.error is not None for p in meta[t].partitions.values())
        }
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise InfraError(
                f"topics without a partition leader after {timeout_s:.0f} s: {sorted(pending)}"
            )
        time.sleep(0.2)


def produce_dead_letter(
    producer: Producer,
    codec: EventCodec,
    topic: str,
    msg: Message,
    *,
    tier: str,
    error_kind: str,
    reason: str,
    image_id: str | None,
) -> None:
    """Produce a ``DeadLetter`` for ``msg`` (its origin, reason and payload) to ``topic``."""
    record = events.dead_letter(
        topic=msg.topic() or "",
        partition=msg.partition() or 0,
        offset=msg.offset() or 0,
        tier=tier,
        error_kind=error_kind,
        message=reason,
        payload=msg.value(),
        image_id=image_id,
    )
    producer.produce(topic, key=msg.key(), value=codec.encode("DeadLetter", record))
    log.warning("dead-lettered %s/%s@%s: %s", msg.topic(), msg.partition(), msg.offset(), reason)


def consumer_error(msg: Message) -> bool:
    """Whether a consumed message is an error event (then logged) rather than a record."""
    if msg.error() is None:
        return False
    log.warning("consumer error: %s", msg.error())
    return True


def partition_end(
    consumer: Consumer, partition: TopicPartition, *, timeout_s: float = 30.0
) -> TopicPartition:
    """Return ``partition`` at its current end, to read what is produced from now on.

    A fresh topic's leader may not be known for a while (``NOT_LEADER_FOR_PARTITION``), so
    the end is asked for again until ``timeout_s``; if it is still unknown then, the
    partition comes back at the logical end (:data:`~confluent_kafka.OFFSET_END`), which
    the consumer resolves when it first reads.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, end = consumer.get_watermark_offsets(partition, timeout=10)
            return TopicPartition(partition.topic, partition.partition, end)
        except KafkaException as exc:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            log.warning(
                "the end of %s[%d] is unknown (%s); reading from its end when first read",
                partition.topic,
                partition.partition,
                exc,
            )
            return TopicPartition(partition.topic, partition.partition, OFFSET_END)


def default_instance_id() -> str:
    """Return this host's name, the default worker instance id."""
    return socket.gethostname()
