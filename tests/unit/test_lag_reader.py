"""LagReader: every reading on a client of its own, so a broken one is never reused.

librdkafka's admin client has open reports of crashing in its group-offsets requests once a
broker restart left requests timed out on it (confluentinc/librdkafka#4605, #3663).
"""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from phenocascade.config import KafkaSettings
from phenocascade.errors import InfraError
from phenocascade.streams import lag


class _Admin:
    """Admin clients of which the first one read from times out, as one left by a restart."""

    made: list[_Admin] = []

    def __init__(self, config: dict[str, Any]) -> None:
        self.broken = len(_Admin.made) == 1  # the first after the settings check
        _Admin.made.append(self)

    def list_topics(self, timeout: float) -> Any:
        if self.broken:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return type("Meta", (), {"topics": {}})()


def test_a_reading_after_a_failed_one_uses_a_new_client(monkeypatch: pytest.MonkeyPatch) -> None:
    _Admin.made.clear()
    monkeypatch.setattr(lag, "AdminClient", _Admin)
    reader = lag.LagReader(KafkaSettings(bootstrap_servers="127.0.0.1:9092"))
    with pytest.raises(InfraError, match="cannot read the offsets of group g"):
        reader.lag("g", ["tier.quality"])
    assert reader.lag("g", ["tier.quality"]) == []  # the topic does not exist
    assert len(_Admin.made) == 3  # the settings check, then one per reading
