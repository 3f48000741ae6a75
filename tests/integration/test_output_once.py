"""The joiner publishes each output once, through a crash at any point of its send.

On the real broker: a joiner that crashed after its output's transaction committed (but
before it recorded the emission), or in the middle of that transaction, is followed by a
successor with the same transactional id that is told when the send began. The results
topic must then hold the output exactly once.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from phenocascade.config import Settings
from phenocascade.consumers.joiner import OutputPublisher
from phenocascade.domain import OutputStatus
from phenocascade.streams.events import image_output, now_ms
from phenocascade.streams.kafka import transactional_producer
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec

pytestmark = [pytest.mark.integration]

BOX = {"x_min": 1.5, "y_min": 2.0, "x_max": 5.25, "y_max": 6.0, "label": "WBC", "score": 0.9}


def _output(image_id: str, **versions: str) -> dict[str, Any]:
    return image_output(
        image_id,
        status=OutputStatus.ANALYZED,
        study="s1",
        uri=f"/images/{image_id}.png",
        labels={"small": 0.1, "dense": 0.93},
        boxes=[BOX],
        routes={"quality": "PASS", "majority": "PASS"},
        model_versions=versions or {"quality": "v1", "majority": "v1"},
    )


@pytest.fixture
def topic(kafka_settings: Settings) -> str:
    """A fresh results topic of three partitions."""
    name = f"results-once-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(kafka_settings.kafka.config())
    for future in admin.create_topics([NewTopic(name, num_partitions=3)]).values():
        future.result(timeout=30)
    return name


def _on_topic(settings: Settings, topic: str, image_id: str) -> list[dict[str, Any]]:
    codec = EventCodec()
    return [
        codec.decode(value, "ImageOutput")[1]
        for key, value in scan_topic(settings.kafka, topic, 30, must_finish=True)
        if key == image_id.encode()
    ]


def test_a_successor_does_not_send_again_what_a_crash_left_committed(
    kafka_settings: Settings, topic: str
) -> None:
    tid, image_id = f"joiner-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    began = now_ms()
    first = OutputPublisher(kafka_settings.kafka, topic, tid)
    assert first.send(_output(image_id))  # committed; then the joiner dies unrecorded
    time.sleep(0.01)
    successor = OutputPublisher(kafka_settings.kafka, topic, tid)
    remade = _output(image_id)  # the same output, made again later from the same state
    assert not successor.send(remade, unsure_since_ms=began)
    outputs = _on_topic(kafka_settings, topic, image_id)
    assert len(outputs) == 1
    assert outputs[0]["labels"] == {"small": 0.1, "dense": 0.93}
    # Another output of the image (a new version) is not mistaken for the sent one.
    newer = _output(image_id, quality="v2", majority="v1")
    assert successor.send(newer, unsure_since_ms=began)
    assert [o["model_versions"]["quality"] for o in _on_topic(kafka_settings, topic, image_id)] == [
        "v1",
        "v2",
    ]
    first.close()
    successor.close()


def test_a_transaction_a_crash_left_open_is_aborted_and_the_output_sent_once(
    kafka_settings: Settings, topic: str
) -> None:
    tid, image_id = f"joiner-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    began = now_ms()
    crashed = transactional_producer(kafka_settings.kafka, tid)
    crashed.begin_transaction()
    value = EventCodec().encode("ImageOutput", _output(image_id))
    crashed.produce(topic, key=image_id.encode(), value=value)
    assert crashed.flush(30) == 0  # on the broker, in a transaction never committed
    successor = OutputPublisher(kafka_settings.kafka, topic, tid)
    assert successor.send(_output(image_id), unsure_since_ms=began)
    assert len(_on_topic(kafka_settings, topic, image_id)) == 1
    assert successor.send(_output(image_id, quality="v2")) is True  # a first send: no look
    assert len(_on_topic(kafka_settings, topic, image_id)) == 2
    successor.close()
