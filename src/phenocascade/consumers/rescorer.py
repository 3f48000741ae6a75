"""The re-scoring consumer: after a promotion, re-score the images still waiting for an expert.

With ``PHENOCASCADE_RESCORE_ON_PROMOTION`` on, ``phenocascade rescorer`` reads the
``ModelPromoted`` events of the ``models`` topic. For each promotion of a tier's model to
version ``V`` it:

1. lists the tier's annotation tasks that no expert has answered (open or claimed,
   :func:`~phenocascade.store.annotations.unanswered_tasks`) and that a model other than
   ``V`` asked;
2. publishes their images again from the image store (:mod:`phenocascade.store.images`),
   under their own ids, to the submitted topic, as ``phenocascade replay`` does
   (:mod:`phenocascade.consumers.resubmit`): the tiers score them with the models they
   serve, and the joiner adds an output under the new model versions, keeping the old. A
   task of a slide's tile re-scores the whole slide (its one output per versions);
3. follows each image until an output of ``V`` for the tier is in Cassandra. When ``V``
   decides the image on its own (its route is not ``ANNOTATE``; for a tile, the tile's
   route in its slide's join state, once the slide's output of ``V`` is in), the task is withdrawn
   (:func:`~phenocascade.store.annotations.supersede_task`), so no expert is asked what
   the model now answers; when ``V`` asks too, the task stays. An image a worker scored
   before it swapped to ``V`` gets no new output (the joiner keeps one output per set of
   versions), so images without one are sent again every ``resend_s`` seconds, for up
   to ``wait_s`` seconds.

The offset of a promotion is committed after these steps, so a rescorer that dies meanwhile
does them again on its next start; sending an image again and withdrawing a withdrawn
task change nothing. A new consumer group starts at the topic's end: promotions made
before the first start are not re-scored (``phenocascade replay --tiers`` does that).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cassandra.cluster import Session
from confluent_kafka import Consumer, Message, TopicPartition
from prometheus_client import Counter
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from phenocascade.config import Settings, Topology
from phenocascade.consumers.resubmit import plan_replay, publish
from phenocascade.errors import ConfigError, PhenocascadeError
from phenocascade.store.annotations import (
    TASK_CLAIMED,
    TASK_OPEN,
    get_task,
    supersede_task,
    unanswered_tasks,
)
from phenocascade.store.cassandra import connect, get_outputs
from phenocascade.store.images import ImageStore, StoredImage
from phenocascade.store.join_state import load_state
from phenocascade.streams.kafka import consumer_error, group_consumer, partition_end
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import routing_key, stored_id

log = logging.getLogger(__name__)

RESCORE_ENV = "PHENOCASCADE_RESCORE_ON_PROMOTION"
WAIT_ENV = "PHENOCASCADE_RESCORE_WAIT_S"

RESCORED = Counter(
    "phenocascade_rescore_images_total",
    "Images of unanswered annotation tasks re-scored after a promotion, by tier and outcome "
    "(superseded: the new model decides them; asked: it asks an expert too; left_out: not "
    "in the image store; unfinished: no output of the new model in time)",
    ["tier", "outcome"],
)


class RescoreSettings(BaseSettings):
    """Whether promotions re-score unanswered annotation images, and how long to follow them.

    Attributes
    ----------
    on_promotion : bool, default False
        ``PHENOCASCADE_RESCORE_ON_PROMOTION`` (``1``/``true``/``on`` or ``0``/``false``/
        ``off``): re-score after each promotion; ``phenocascade run --learning`` then
        starts ``phenocascade rescorer``.
    wait_s : float, default 300.0
        ``PHENOCASCADE_RESCORE_WAIT_S``: how long the images of one promotion are followed
        (sent again while no output of the new model is in).
    """

    model_config = SettingsConfigDict(env_prefix="PHENOCASCADE_RESCORE_", extra="ignore")

    on_promotion: bool = False
    wait_s: float = Field(default=300.0, gt=0)

    @classmethod
    def from_env(cls) -> RescoreSettings:
        """Read the settings from the environment.

        Raises
        ------
        ConfigError
            If a variable is invalid: naming it, the form expected and the value given.
        """
        try:
            return cls()
        except ValidationError as exc:
            names = {"on_promotion": RESCORE_ENV, "wait_s": WAIT_ENV}
            raise ConfigError(
                "; ".join(
                    f"{names[str(e['loc'][0])]}={e['input']!r}: {e['msg']}" for e in exc.errors()
                )
            ) from None


@dataclass
class Rescore:
    """What re-scoring after one promotion did.

    Attributes
    ----------
    tier_artifact, version : str
        The promotion: the tiers' artifact name and the promoted version.
    sent : dict of str to str
        ``{image id: tier}`` of the images published again; a tile's task names the tile,
        and its whole slide is published again (once, whichever of its tiles asked).
    superseded, asked : list of str
        Image ids the new model decides on its own (their task withdrawn, unless an expert
        holds a live claim on it), and those it sends to an expert too.
    left_out : dict of str to str
        ``{image id: reason}`` of the images that could not be sent.
    unfinished : list of str
        Image ids with no output of the new model within ``wait_s``.
    """

    tier_artifact: str
    version: str
    sent: dict[str, str] = field(default_factory=dict)
    superseded: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    unfinished: list[str] = field(default_factory=list)


def newest_output_of(
    outputs: Sequence[Mapping[str, Any]], tier: str, version: str
) -> Mapping[str, Any] | None:
    """Return the newest of an image's outputs in which ``tier`` used ``version``, or ``None``."""
    made = [o for o in outputs if o["model_versions"].get(tier) == version]
    return max(made, key=lambda o: o["produced_at"]) if made else None


class Rescorer:
    """Re-score the images of unanswered annotation tasks after each promotion.

    Parameters
    ----------
    settings : Settings
        Kafka, Cassandra and the allowed roots (how a stored image is sent again).
    topology : Topology
        Names the models and submitted topics, and which tiers serve which artifact.
    store : ImageStore
        Where the images are read from.
    session : cassandra.cluster.Session or None, default None
        Cassandra session; ``None`` connects with ``settings.cassandra``.
    wait_s : float, default 300.0
        How long the images of one promotion are followed.
    resend_s : float, default 30.0
        An image without an output of the new model is sent again after this long (a
        worker may have scored it before it swapped models).
    poll_s : float, default 2.0
        Seconds between two looks at the outputs.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        topology: Topology,
        store: ImageStore,
        session: Session | None = None,
        wait_s: float = 300.0,
        resend_s: float = 30.0,
        poll_s: float = 2.0,
    ) -> None:
        self.settings = settings
        self.topology = topology
        self.store = store
        # Derived from the retrainer's so that a namespaced topology namespaces it too.
        self.group = f"{topology.retrainer_group}-rescorer"
        self.wait_s = wait_s
        self.resend_s = resend_s
        self.poll_s = poll_s
        self.codec = EventCodec()
        self.done: list[Rescore] = []
        # Set once the consumer is positioned: promotions from then on are re-scored.
        self.positioned = threading.Event()
        self._session = session

    @property
    def session(self) -> Session:
        """The Cassandra session (connected on first use)."""
        if self._session is None:
            self._session = connect(self.settings.cassandra)
        return self._session

    # -- one promotion ---------------------------------------------------------------------
    def rescore(self, promoted: Mapping[str, Any], stop: threading.Event) -> Rescore:
        """Re-score the unanswered annotation images of one ``ModelPromoted``.

        Parameters
        ----------
        promoted : Mapping
            The decoded ``ModelPromoted`` (``tier`` is the tiers' artifact name).
        stop : threading.Event
            Set it to stop following the images (those not settled count as unfinished).

        Raises
        ------
        InfraError
            If Kafka did not take the images, or the image store cannot be read.
        """
        job = Rescore(promoted["tier"], promoted["version"])
        tiers = [t.name for t in self.topology.tiers if t.artifact == job.tier_artifact]
        for tier in tiers:
            for entry in unanswered_tasks(session=self.session, tier=tier):
                if entry["model_version"] != job.version and self._unanswered(entry):
                    job.sent.setdefault(entry["image_id"], tier)
        images: dict[str, StoredImage] = {}  # a slide once, whichever of its tiles asked
        for image_id in list(job.sent):
            kept_as = stored_id(image_id)
            image = images.get(kept_as) or self.store.get(kept_as)
            if image is None:
                job.left_out[image_id] = f"{kept_as} is not in the image store {self.store.url}"
            else:
                images[kept_as] = image
        plan = plan_replay(self.settings, self.store, images.values())
        for image_id in job.sent:
            if stored_id(image_id) in plan.left_out:
                job.left_out[image_id] = plan.left_out[stored_id(image_id)]
        for image_id in job.left_out:
            RESCORED.labels(job.sent.pop(image_id), "left_out").inc()
        records: dict[str, list[dict[str, Any]]] = {}  # by routing key: a slide's tiles together
        for record in plan.records:
            records.setdefault(routing_key(record).decode(), []).append(record)
        publish(self.settings, self.topology.submitted_topic, plan.records)
        log.info(
            "%s %s promoted: %d unanswered annotation images sent again, %d left out",
            job.tier_artifact,
            job.version,
            len(records),
            len(job.left_out),
        )
        for image_id, reason in list(job.left_out.items())[:10]:
            log.warning("not re-scored: %s: %s", image_id, reason)
        self._follow(job, records, stop)
        return job

    def _unanswered(self, entry: Mapping[str, Any]) -> bool:
        """Whether a queue entry's task is still unanswered (the queue may lag the task)."""
        task = get_task(session=self.session, image_id=entry["image_id"], tier=entry["tier"])
        return task is not None and task["status"] in (TASK_OPEN, TASK_CLAIMED)

    def _new_route(self, image_id: str, tier: str, version: str) -> str | None:
        """Return the route ``tier`` gave an image with ``version``; ``None`` until it is in.

        A tile's is read from its slide's join state once the slide's output of ``version``
        is in (that output is emitted only once every tile has one of ``version``); a tile
        the tier did not see (its gate skipped it) counts as ``SKIP``.
        """
        slide = stored_id(image_id)
        output = newest_output_of(get_outputs(session=self.session, image_id=slide), tier, version)
        if output is None:
            return None
        if slide == image_id:
            return str(output["routes"][tier])
        state = load_state(session=self.session, app_id=self.topology.joiner.app_id, image_id=slide)
        return str(state["tile_outputs"].get(image_id, {}).get("routes", {}).get(tier, "SKIP"))

    def _follow(
        self,
        job: Rescore,
        records: Mapping[str, Sequence[Mapping[str, Any]]],
        stop: threading.Event,
    ) -> None:
        """Settle each sent image once its output of the new model is in; send stragglers again.

        ``records`` holds the submissions by routing key: an image's, or a slide's tiles.
        """
        waiting = dict(job.sent)
        started = sent_at = time.monotonic()
        while waiting and not stop.is_set():
            for image_id, tier in list(waiting.items()):
                route = self._new_route(image_id, tier, job.version)
                if route is None:
                    continue
                del waiting[image_id]
                if route == "ANNOTATE":
                    job.asked.append(image_id)
                    RESCORED.labels(tier, "asked").inc()
                    continue
                superseded = supersede_task(
                    session=self.session, image_id=image_id, tier=tier, model_version=job.version
                )
                if superseded is not None:
                    job.superseded.append(image_id)
                    RESCORED.labels(tier, "superseded").inc()
            now = time.monotonic()
            if not waiting or now - started >= self.wait_s:
                break
            if now - sent_at >= self.resend_s:
                again = {stored_id(i) for i in waiting}
                publish(
                    self.settings,
                    self.topology.submitted_topic,
                    [r for key in again for r in records[key]],
                )
                sent_at = now
            stop.wait(self.poll_s)
        job.unfinished = sorted(waiting)
        for tier in waiting.values():
            RESCORED.labels(tier, "unfinished").inc()
        if waiting:
            log.warning(
                "%s %s: %d re-scored images have no output of the new model after %.0f s "
                "(is the cascade running?); their tasks stay open: %s",
                job.tier_artifact,
                job.version,
                len(waiting),
                self.wait_s,
                ", ".join(job.unfinished[:10]),
            )

    # -- the loop --------------------------------------------------------------------------
    def _position(self, consumer: Consumer) -> None:
        """Resume after the group's last committed promotion, or at the topic's end."""
        part = TopicPartition(self.topology.models_topic, 0)
        (committed,) = consumer.committed([part], timeout=30)
        consumer.assign([committed if committed.offset >= 0 else partition_end(consumer, part)])
        self.positioned.set()

    def run(self, stop: threading.Event) -> list[Rescore]:
        """Re-score after each promotion until ``stop`` is set; return what was done."""
        consumer = group_consumer(self.settings.kafka, self.group)
        try:
            self._position(consumer)
            while not stop.is_set():
                msg = consumer.poll(0.5)
                if msg is None or consumer_error(msg):
                    continue
                self._handle(msg, stop)
                if not stop.is_set():
                    consumer.commit(message=msg, asynchronous=False)
        finally:
            consumer.close()
        return self.done

    def _handle(self, msg: Message, stop: threading.Event) -> None:
        try:
            _, promoted = self.codec.decode(msg.value(), expected="ModelPromoted")
        except PhenocascadeError as exc:
            log.warning("ignoring unreadable message on %s: %s", msg.topic(), exc)
            return
        self.done.append(self.rescore(promoted, stop))
