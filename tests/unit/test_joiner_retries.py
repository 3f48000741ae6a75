"""The joiner tries a refused state write or output send again instead of dropping it.

faust acknowledges a message whose handler raised, so an error that escaped would let the
offset be committed past a result whose state was never written.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable

from phenocascade.consumers import joiner


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(joiner, "_RETRY_S", (0.001, 0.002))


def test_a_refused_cassandra_write_is_tried_until_taken() -> None:
    calls: list[dict[str, Any]] = []

    def write(**kwargs: Any) -> str:
        calls.append(kwargs)
        if len(calls) == 1:
            raise OperationTimedOut("client timeout")
        if len(calls) == 2:
            raise NoHostAvailable("no host answered", {})
        return "written"

    assert asyncio.run(joiner._durably("a write", write, part="tier")) == "written"
    assert calls == [{"part": "tier"}] * 3


def test_an_error_that_is_not_cassandras_is_not_swallowed() -> None:
    def broken(**kwargs: Any) -> None:
        raise KeyError("image_id")

    with pytest.raises(KeyError):
        asyncio.run(joiner._durably("a write", broken))


class _Topic:
    """A results topic whose broker times out the first ``fail`` sends."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.sent: list[tuple[bytes, bytes]] = []

    async def send(self, *, key: bytes, value: bytes) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail:
            self.fail -= 1
            done.set_exception(KafkaTimeoutError())
        else:
            self.sent.append((key, value))
            done.set_result(None)
        return done


def test_an_unacknowledged_output_is_sent_again_until_acknowledged() -> None:
    topic = _Topic(fail=2)
    asyncio.run(joiner._published(topic, "img-1", b"output"))
    assert topic.sent == [(b"img-1", b"output")]
