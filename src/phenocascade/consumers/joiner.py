"""The joiner: a faust-streaming app merging tier results into outputs.

It reads every tier's result topic and the experts' annotations topic (all co-partitioned
by image id), keeps each image's partial results and expert answers in Cassandra
(:mod:`phenocascade.store.join_state`), and when
:func:`~phenocascade.consumers.joining.merge` (or
:func:`~phenocascade.consumers.joining.merge_annotation`) says an output is due, writes it
to Cassandra (idempotent upsert) and then to the results topic. The emission keys stored
with the state make re-delivered results and annotations harmless.

Each output is published once, through crashes: the joiner records when it began to send
it, sends it in a Kafka transaction of its own (:class:`OutputPublisher`; the id is stable
per joiner app and host, so a restarted joiner fences its predecessor and aborts what it
left open), and records the emission once the transaction committed. A successor that
finds the start recorded and the emission not looks on the results topic first, from the
recorded time on, and sends the output only if it is not there.

A tile of a slide (its results carry a ``tile`` record, and are keyed by the slide's id) is
joined as an image, but its output is not published: it is folded into the slide's state
(:func:`~phenocascade.consumers.tiles.tile_part`), and the slide's one output is emitted
once every tile of the slide has one (:func:`~phenocascade.consumers.tiles.slide_emission`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar, cast

import faust
from cassandra import DriverException
from cassandra.cluster import NoHostAvailable, Session
from faust.types.auth import CredentialsT
from prometheus_client import Counter, Histogram

from phenocascade.config import KafkaSettings, Settings, Topology
from phenocascade.consumers.joining import merge, merge_annotation
from phenocascade.consumers.tiles import slide_emission, tile_of, tile_part
from phenocascade.errors import ConfigError, InfraError, PhenocascadeError
from phenocascade.store.cassandra import connect, save_output
from phenocascade.store.join_state import (
    EMITTED,
    SENDING,
    TILE,
    changed_parts,
    count_parts,
    load_state,
    save_part,
)
from phenocascade.streams.events import now_ms, to_epoch_ms
from phenocascade.streams.ingest import TransactionalPublisher
from phenocascade.streams.kafka import default_instance_id
from phenocascade.streams.serde import EventCodec

log = logging.getLogger(__name__)

RESULTS_IN = Counter(
    "phenocascade_joiner_results_in_total", "Tier results the joiner read, by tier", ["tier"]
)
ANSWERS_IN = Counter(
    "phenocascade_joiner_annotations_in_total",
    "Expert annotations the joiner folded into outputs, by tier",
    ["tier"],
)
OUTPUTS = Counter("phenocascade_outputs_total", "Image outputs emitted, by status", ["status"])
FOUND_SENT = Counter(
    "phenocascade_joiner_outputs_found_sent_total",
    "Outputs a crashed or failed send had published after all (found on the results topic)",
)
END_TO_END = Histogram(
    "phenocascade_end_to_end_seconds",
    "From an image's submission (submitted_at) to its output, by status",
    ["status"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
)


def observe_output(result: Mapping[str, Any], output: Mapping[str, Any]) -> None:
    """Count an emitted output and its end-to-end latency (when its result carries one).

    ``result`` is the ``TierResult`` that completed the image; its ``submitted_at`` is the
    image's submission time (``None`` from writers older than the field).
    """
    OUTPUTS.labels(output["status"]).inc()
    if result.get("submitted_at") is not None:
        seconds = time.time() - to_epoch_ms(result["submitted_at"]) / 1000
        END_TO_END.labels(output["status"]).observe(max(0.0, seconds))


# What faust's Kafka client (aiokafka) can do of librdkafka's security.protocol and
# sasl.mechanism; GSSAPI (librdkafka's default mechanism) and OAUTHBEARER need more than
# the client settings carry.
_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """Map librdkafka's TLS and SASL settings to faust credentials.

    Read from ``kafka.client``: ``security.protocol``, ``sasl.mechanism`` (or its alias
    ``sasl.mechanisms``), ``sasl.username``, ``sasl.password``, ``ssl.ca.location``,
    ``ssl.certificate.location``, ``ssl.key.location``, ``ssl.key.password`` and
    ``ssl.endpoint.identification.algorithm`` (``none`` turns off the host name check), so
    that the joiner reaches the brokers the confluent-kafka clients reach.

    Raises
    ------
    ConfigError
        If the protocol or mechanism is one the joiner cannot use, or a TLS file cannot be
        loaded.
    """
    conf = kafka.client
    protocol = conf.get("security.protocol", "PLAINTEXT").upper()
    if protocol not in _PROTOCOLS:
        raise ConfigError(
            f"PHENOCASCADE_KAFKA__CLIENT: security.protocol {protocol!r} is not one of "
            f"{', '.join(_PROTOCOLS)}"
        )
    context = _ssl_context(conf) if protocol.endswith("SSL") else None
    if protocol.startswith("SASL"):
        mechanism = conf.get("sasl.mechanism", conf.get("sasl.mechanisms", "GSSAPI")).upper()
        if mechanism not in _MECHANISMS:
            raise ConfigError(
                f"PHENOCASCADE_KAFKA__CLIENT: the joiner supports sasl.mechanism "
                f"{', '.join(_MECHANISMS)}, not {mechanism!r}"
            )
        return faust.SASLCredentials(
            username=conf.get("sasl.username"),
            password=conf.get("sasl.password"),
            mechanism=mechanism,
            ssl_context=context,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def _ssl_context(conf: Mapping[str, str]) -> ssl.SSLContext:
    """Return the TLS context that librdkafka's ``ssl.*`` settings describe."""
    try:
        context = ssl.create_default_context(cafile=conf.get("ssl.ca.location"))
        if "ssl.certificate.location" in conf:
            context.load_cert_chain(
                conf["ssl.certificate.location"],
                conf.get("ssl.key.location"),
                conf.get("ssl.key.password"),
            )
    except OSError as exc:
        raise ConfigError(
            f"PHENOCASCADE_KAFKA__CLIENT: cannot load the TLS files of ssl.ca.location, "
            f"ssl.certificate.location or ssl.key.location ({exc})"
        ) from exc
    if conf.get("ssl.endpoint.identification.algorithm", "https").lower() == "none":
        context.check_hostname = False
    return context


# An output's timestamp is taken after its send began; the margin covers a clock stepped
# back in between.
_CLOCK_MARGIN_MS = 1000


class OutputPublisher:
    """Publish outputs to the results topic, each in a Kafka transaction, once.

    Parameters
    ----------
    kafka : KafkaSettings
        How to reach Kafka.
    topic : str
        The results topic.
    transactional_id : str
        Stable per joiner app and instance (see :func:`make_app`).
    timeout_s : float, default 10.0
        How long one attempt may wait on the broker.
    """

    def __init__(
        self, kafka: KafkaSettings, topic: str, transactional_id: str, *, timeout_s: float = 10.0
    ) -> None:
        self._codec = EventCodec()
        self._topic = TransactionalPublisher(
            kafka, topic, transactional_id, timeout_s=timeout_s, event="ImageOutput"
        )

    @property
    def transactional_id(self) -> str:
        """The Kafka transactional id its transactions go out under."""
        return self._topic.transactional_id

    def landed(self, output: Mapping[str, Any], since_ms: int) -> bool:
        """Whether ``output`` is committed on the topic, sent at ``since_ms`` or later.

        Outputs are compared whole but for ``produced_at`` (an output is a function of
        the join state, so a successor's is the same but for the time it was made).

        Raises
        ------
        InfraError
            If the topic cannot be read to its end.
        """
        want = self._comparable(self._codec.decode(self._codec.encode("ImageOutput", output))[1])
        return any(
            key == output["image_id"] and self._comparable(record) == want
            for key, record in self._topic.committed_since(since_ms - _CLOCK_MARGIN_MS)
        )

    def send(self, output: Mapping[str, Any], unsure_since_ms: int | None = None) -> bool:
        """Publish ``output`` in a transaction of its own and wait for the commit.

        Parameters
        ----------
        output : Mapping
            An ``ImageOutput``.
        unsure_since_ms : int or None, default None
            When an earlier send of this output began (by this joiner or a crashed one),
            if it may have committed: the topic is then read from that time on first,
            and the output is not sent again if it is there.

        Returns
        -------
        bool
            Whether this call sent it (``False``: it had landed already).

        Raises
        ------
        InfraError
            If the broker cannot be reached, or did not commit: call again, with
            ``unsure_since_ms``.
        """
        if not self._topic.connected:
            self._topic.connect()  # fences a predecessor; aborts what it left open
        if unsure_since_ms is not None and self.landed(output, unsure_since_ms):
            return False
        self._topic.send([output])
        return True

    def close(self) -> None:
        """Drop the producer."""
        self._topic.close()

    @staticmethod
    def _comparable(record: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k != "produced_at"}


def results_publisher(
    settings: Settings, topology: Topology, instance: str | None = None
) -> OutputPublisher:
    """Return the publisher of a joiner's outputs (see :func:`make_app` for ``instance``)."""
    spec = topology.joiner
    return OutputPublisher(
        settings.kafka,
        spec.results_topic,
        f"{spec.app_id}-results-{instance or default_instance_id()}",
    )


def make_app(settings: Settings, topology: Topology, *, instance: str | None = None) -> faust.App:
    """Build the joiner app (not started).

    ``instance`` names this joiner among those of its app (default: the host name): its
    outputs go out under the transactional id ``<app id>-results-<instance>``, so a
    restarted joiner fences its own crashed predecessor, and two joiners of one app on
    one host need two instance ids, or each would fence the other in turn.
    """
    spec = topology.joiner
    partitions = {t.name: t.partitions for t in topology.topics}
    result_topics = [t.result_topic for t in topology.tiers]
    n = partitions[result_topics[0]]
    datadir = settings.home / "joiner" / spec.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        spec.app_id,
        broker=f"kafka://{settings.kafka.bootstrap_servers}",
        broker_credentials=_credentials(settings.kafka),
        store="memory://",
        topic_partitions=n,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        producer_acks=-1,
        datadir=str(datadir),
    )
    codec = EventCodec()
    source = app.topic(
        *result_topics,
        topology.annotations_topic,
        key_type=bytes,
        value_type=bytes,
        value_serializer="raw",
    )
    publisher = results_publisher(settings, topology, instance)
    session_holder: dict[str, Any] = {}

    @app.task
    async def _connect() -> None:
        loop = asyncio.get_running_loop()
        session_holder["session"] = await loop.run_in_executor(None, connect, settings.cassandra)

    async def session() -> Session:
        while "session" not in session_holder:
            await asyncio.sleep(0.1)
        return cast(Session, session_holder["session"])

    @app.agent(source)
    async def join(stream: Any) -> None:
        async for key, value in stream.items():
            try:
                event, result = codec.decode(value)
            except PhenocascadeError as exc:
                log.warning("joiner skipped an unreadable message (key %r): %s", key, exc)
                continue
            image_id = result.get("image_id")
            if event not in ("TierResult", "Annotation") or not isinstance(image_id, str):
                log.warning("joiner skipped a %s message (key %r)", event, key)
                continue
            where = {"session": await session(), "app_id": spec.app_id, "image_id": image_id}
            # Every step below is done before the next message is taken (faust commits an
            # offset once the message after it is taken), and retried until it is done: the
            # state a successor reads is never behind the offsets this joiner commits.
            state = await _durably(f"reading {image_id}'s state", load_state, **where)
            if event == "Annotation":
                ANSWERS_IN.labels(result["tier"]).inc()
                new_state, output = merge_annotation(topology, state, result)
            else:
                RESULTS_IN.labels(result["tier"]).inc()
                new_state, output = merge(topology, state, result)
            await _saved(where, state, new_state)
            if output is None:
                continue
            key = new_state["emitted"][-1]
            tile = tile_of(new_state)
            if tile is not None:
                await _fold_tile(where, tile, key, output, result)
                await _record_emission(where, key)
            else:
                await _emitted(where, state, (key, output), result)

    async def _saved(
        where: dict[str, Any], state: Mapping[str, Any], new: Mapping[str, Any]
    ) -> None:
        """Write the parts of an image's join state that ``new`` changed."""
        for part, name, value in changed_parts(state, new):
            await _durably(
                f"recording {where['image_id']}'s {part} {name}",
                save_part,
                **where,
                part=part,
                name=name,
                value=value,
            )

    async def _record_emission(where: dict[str, Any], key: str) -> None:
        """Record that an image's output of emission key ``key`` is stored and published."""
        await _durably(
            f"recording {where['image_id']}'s emission", save_part, **where, part=EMITTED, name=key
        )

    async def _fold_tile(
        where: dict[str, Any],
        tile: dict[str, Any],
        key: str,
        output: dict[str, Any],
        result: Mapping[str, Any],
    ) -> None:
        """Store a tile's output in its slide's state; emit the slide's output when due.

        The tile's output is written to the slide's state before the tile's emission is
        recorded: a crash in between writes it again, the same value. The slide's state is
        read whole only once all its tiles have an output (until then, its tiles are
        counted), so a slide of n tiles costs n small reads, not n whole ones.
        """
        slide = {**where, "image_id": tile["parent_id"]}
        name, value = tile_part(tile, key, output)
        what = f"{slide['image_id']}'s tile {name}"
        await _durably(f"recording {what}", save_part, **slide, part=TILE, name=name, value=value)
        done = await _durably(f"counting {what}", count_parts, **slide, part=TILE)
        if done < tile["count"]:
            return
        state = await _durably(f"reading {slide['image_id']}'s state", load_state, **slide)
        emission = slide_emission(state, tile)
        if emission is not None:
            await _emitted(slide, state, emission, result)

    async def _emitted(
        where: dict[str, Any],
        state: Mapping[str, Any],
        emission: tuple[str, dict[str, Any]],
        result: Mapping[str, Any],
    ) -> None:
        """Store an output, publish it once, and record its emission (key, output).

        The emission is recorded only once the output's transaction committed. The start
        of its sending is recorded before: a successor that finds that, and not the
        emission, sends the output only if it is not on the results topic.
        """
        key, output = emission
        image_id = output["image_id"]
        await _durably(
            f"storing {image_id}'s output", save_output, session=where["session"], output=output
        )
        began = state.get("sending", {}).get(key)
        unsure = began is not None  # a predecessor began to send it: it may have committed
        if began is None:
            began = now_ms()
            await _durably(
                f"recording {image_id}'s output as being sent",
                save_part,
                **where,
                part=SENDING,
                name=key,
                value=began,
            )
        if await _sent_once(publisher, output, began, unsure=unsure):
            observe_output(result, output)
        else:
            FOUND_SENT.inc()
            log.info("joiner: %s's output %s was on the results topic already", image_id, key)
        await _record_emission(where, key)

    return app


_T = TypeVar("_T")
_RETRY_S = (0.5, 10.0)  # first and longest pause between tries


async def _until_done(
    what: str, attempt: Callable[[], Awaitable[_T]], errors: tuple[type[Exception], ...]
) -> _T:
    """Return ``await attempt()``, tried again after each of ``errors`` until it is done.

    The pause between tries starts at ``_RETRY_S[0]`` and doubles up to ``_RETRY_S[1]``. A
    joiner that cannot reach its state or its results topic stops where it is, committing
    nothing past it; one stopped for ``--stall-exit-s`` exits
    (:class:`~phenocascade.streams.lag.StallWatch`) for its supervisor to start a fresh one.
    Any other error propagates.
    """
    pause = _RETRY_S[0]
    while True:
        try:
            return await attempt()
        except errors as exc:
            log.warning("joiner: %s failed (%s); trying again in %.1f s", what, exc, pause)
            await asyncio.sleep(pause)
            pause = min(2 * pause, _RETRY_S[1])


class _Sender(Protocol):
    def send(self, output: Mapping[str, Any], unsure_since_ms: int | None = None) -> bool: ...


async def _sent_once(
    publisher: _Sender, output: Mapping[str, Any], began: int, *, unsure: bool
) -> bool:
    """Send ``output`` (begun at ``began``) until committed; return whether this sent it.

    Each attempt after a failed one, and the first when ``unsure`` (a predecessor began
    the send), looks for the output on the topic first: a failed attempt may have
    committed.
    """
    loop = asyncio.get_running_loop()
    since = [began if unsure else None]

    def attempt() -> Awaitable[bool]:
        now, since[0] = since[0], began
        return loop.run_in_executor(None, publisher.send, output, now)

    return await _until_done(f"sending {output['image_id']}'s output", attempt, (InfraError,))


async def _durably(what: str, call: Callable[..., _T], **kwargs: Any) -> _T:
    """Return ``call(**kwargs)``, run in a thread and tried until Cassandra takes it."""
    loop = asyncio.get_running_loop()

    def attempt() -> Awaitable[_T]:
        return loop.run_in_executor(None, functools.partial(call, **kwargs))

    return await _until_done(what, attempt, (DriverException, NoHostAvailable))


def run_joiner(settings: Settings, topology: Topology, *, instance: str | None = None) -> None:
    """Run the joiner (see :func:`make_app`) until SIGINT/SIGTERM."""
    app = make_app(settings, topology, instance=instance)
    from faust.worker import Worker

    Worker(app, loglevel="INFO", quiet=True).execute_from_commandline()
