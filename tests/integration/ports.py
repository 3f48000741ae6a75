"""Free ports for the nodes a test starts in a home of its own."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable

from phenocascade.infra.local import source_port_range

# The default local infra's ports (Kafka, its controller, CQL, Cassandra storage).
_DEFAULT_PORTS = frozenset({7000, 9042, 9092, 9093})


def _free(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def listen_ports(spans: Iterable[int], *, hosts: tuple[str, ...] = ("127.0.0.1",)) -> list[int]:
    """Return a first port p per span n, with p .. p + n - 1 free on every host given.

    The ports lie below the kernel's ephemeral range. A node that connects to a peer's
    port before the peer listens on it can be given that very port as its own source
    port, and then talks to itself: a Kafka node reads its own request as the answer
    (``CorrelationIdMismatchException``, a fatal exit). A port below the range is never
    a source port.
    """
    end = source_port_range()[0]
    taken: set[int] = set(_DEFAULT_PORTS)
    found = []
    for span in spans:
        for _ in range(1000):
            port = random.randrange(10000, end - span)
            ports = range(port, port + span)
            if taken.isdisjoint(ports) and all(_free(h, p) for h in hosts for p in ports):
                break
        else:
            raise RuntimeError(f"no {span} free ports in a row below {end}")
        taken.update(ports)
        found.append(port)
    return found
