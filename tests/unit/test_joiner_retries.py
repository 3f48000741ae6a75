"""The joiner tries a refused state write or output send again instead of dropping it.

faust acknowledges a message whose handler raised, so an error that escaped would let the
offset be committed past a result whose state was never written.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any

import pytest
from cassandra import OperationTimedOut
from cassandra.cluster import NoHostAvailable

from phenocascade.cli import build_parser
from phenocascade.config import Settings, load_topology
from phenocascade.consumers import joiner
from phenocascade.errors import InfraError


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


class _Publisher:
    """A results topic whose broker fails the first ``fail`` sends (they may have landed)."""

    def __init__(self, fail: int) -> None:
        self.fail = fail
        self.calls: list[int | None] = []

    def send(self, output: Mapping[str, Any], unsure_since_ms: int | None = None) -> bool:
        self.calls.append(unsure_since_ms)
        if self.fail:
            self.fail -= 1
            raise InfraError("Kafka did not take the batch: timed out")
        return True


def test_a_failed_send_is_tried_again_looking_first_for_what_it_may_have_sent() -> None:
    publisher = _Publisher(fail=2)
    output = {"image_id": "img-1"}
    assert asyncio.run(joiner._sent_once(publisher, output, 1700, unsure=False))
    # The first try is a first send; each one after a failure looks from its start.
    assert publisher.calls == [None, 1700, 1700]


def test_a_send_a_predecessor_began_looks_first() -> None:
    publisher = _Publisher(fail=0)
    assert asyncio.run(joiner._sent_once(publisher, {"image_id": "img-1"}, 1700, unsure=True))
    assert publisher.calls == [1700]


def test_each_joiner_instance_sends_under_its_own_transactional_id() -> None:
    """A restarted joiner fences its predecessor; two joiners of one host must not fence
    each other, so ``--instance`` gives each its own id."""
    settings = Settings()
    topology = load_topology(None)
    app_id = topology.joiner.app_id
    default = joiner.results_publisher(settings, topology)
    assert default.transactional_id == f"{app_id}-results-{socket.gethostname()}"
    second = joiner.results_publisher(settings, topology, "joiner-b")
    assert second.transactional_id == f"{app_id}-results-joiner-b"
    args = build_parser().parse_args(["joiner", "--instance", "joiner-b"])
    assert args.instance == "joiner-b"
