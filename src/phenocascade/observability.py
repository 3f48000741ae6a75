"""Prometheus metrics: one HTTP port per process, one metric name per measure.

Every long-running ``phenocascade`` process (tier worker, joiner, annotation sink,
retrainer, annotation app, and ``phenocascade run`` itself) serves ``/metrics`` on its own
port (:func:`serve_metrics`). The metrics that several kinds of process update are declared
here; the others beside the code that counts them (``consumers.worker``,
``consumers.joiner``, ``cli.supervise``...). ``docs/architecture.md`` lists them all, and
``infra/grafana/phenocascade.json`` charts them.

This module imports nothing from phenocascade, so every layer may use it.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable, Mapping

from prometheus_client import Counter, Gauge, start_http_server

log = logging.getLogger(__name__)

DEAD_LETTERS = Counter(
    "phenocascade_dead_letters_total",
    "Messages sent to the dead-letter topic, by the process that refused them and why",
    ["tier", "kind"],
)
CONSUMER_LAG = Gauge(
    "phenocascade_consumer_lag",
    "Messages of a partition not yet committed by a consumer group (end offset - committed)",
    ["group", "topic", "partition"],
)
CONSUMER_COMMITTED = Gauge(
    "phenocascade_consumer_committed_offset",
    "Committed offset of a consumer group on a partition (-1: none yet)",
    ["group", "topic", "partition"],
)

# (topic, partition) -> (committed offset or -1, lag)
LagMeasure = Callable[[], Mapping[tuple[str, int], tuple[int, int]]]


def serve_metrics(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve this process's metrics at ``http://host:port/metrics`` from a daemon thread.

    Parameters
    ----------
    port : int
        TCP port; 0 serves nothing.
    host : str, default "127.0.0.1"
        Address to bind (``0.0.0.0`` to be scraped from other machines).

    Returns
    -------
    int or None
        The port served, or ``None`` if none: ``port`` was 0, or it is already in use. A
        process never stops over its metrics; a busy port is logged as a warning.
    """
    if port == 0:
        return None
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning(
            "metrics port %s:%d is in use; this process serves no metrics "
            "(give it another with --metrics-port)",
            host,
            port,
        )
        return None
    log.info("metrics at http://%s:%d/metrics", host, port)
    return port


def watch_lag(
    group: str, measure: LagMeasure, interval_s: float = 5.0, stop: threading.Event | None = None
) -> threading.Thread:
    """Set ``phenocascade_consumer_lag`` of ``group`` from ``measure()`` every ``interval_s``.

    Parameters
    ----------
    group : str
        The consumer group, the ``group`` label.
    measure : callable
        ``() -> {(topic, partition): (committed offset or -1, lag)}``, e.g.
        :meth:`phenocascade.streams.lag.LagReader.measure` bound to the group's topics.
    interval_s : float, default 5.0
        Seconds between two measurements.
    stop : threading.Event or None, default None
        Set it to end the thread; ``None``: it ends with the process (a daemon thread).

    Returns
    -------
    threading.Thread
        The started thread. A failed measurement is logged and retried at the next interval.
    """
    done = stop or threading.Event()

    def loop() -> None:
        while True:
            try:
                for (topic, partition), (committed, lag) in measure().items():
                    CONSUMER_LAG.labels(group, topic, str(partition)).set(lag)
                    CONSUMER_COMMITTED.labels(group, topic, str(partition)).set(committed)
            except Exception as exc:  # the next interval tries again; the process goes on
                log.warning("cannot measure the lag of group %s: %s", group, exc)
            if done.wait(interval_s):
                return

    thread = threading.Thread(target=loop, name=f"lag-{group}", daemon=True)
    thread.start()
    return thread
