"""Metrics ports of the command line: one per process, ``phenocascade run``'s children above it.

A long-running command (``worker``, ``joiner``, ``sink``, ``retrainer``, ``rescorer``,
``ui``, ``run``) serves its Prometheus metrics on ``--metrics-port``, by default the base
``PHENOCASCADE_METRICS_PORT`` (9400; 0: none), or for the annotation loop's commands the
base plus their :data:`STANDALONE_OFFSETS`. ``phenocascade run`` serves on the base port
and starts its ``n`` processes with ``--metrics-port base+1`` ... ``base+n``, in the order
:func:`~phenocascade.cli.cascade.cascade_commands` names them; a base of 0 turns every one
of them off.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Mapping, Sequence

from phenocascade.config import Settings
from phenocascade.observability import serve_metrics, watch_lag
from phenocascade.streams.lag import LagReader

METRICS_FLAG = "--metrics-port"


STANDALONE_OFFSETS = {"sink": 100, "ui": 101, "retrainer": 102, "rescorer": 103}
"""Default ports of the annotation loop's commands, above the base: started by hand beside
``phenocascade run`` (which takes the base and the ports just above it), none collides."""


def add_metrics_port(parser: argparse.ArgumentParser, command: str | None = None) -> None:
    """Add ``--metrics-port`` to a long-running command's parser.

    ``command`` names one of :data:`STANDALONE_OFFSETS`, whose default port is that far
    above the base; others default to the base.
    """
    offset = STANDALONE_OFFSETS[command] if command is not None else 0
    default = f"PHENOCASCADE_METRICS_PORT + {offset}" if offset else "PHENOCASCADE_METRICS_PORT"
    parser.add_argument(
        METRICS_FLAG,
        type=int,
        default=None,
        help=f"serve Prometheus metrics on this port (default: {default}, the base being 9400; "
        "0: none)",
    )
    parser.set_defaults(metrics_offset=offset)


def metrics_port(args: argparse.Namespace, settings: Settings) -> int:
    """Return the port this command serves metrics on.

    Its flag, else the settings' base plus the command's offset (a base of 0: none).
    """
    port: int | None = getattr(args, "metrics_port", None)
    if port is not None:
        return port
    base = settings.metrics_port
    return base + getattr(args, "metrics_offset", 0) if base else 0


def start_metrics(
    args: argparse.Namespace,
    settings: Settings,
    groups: Mapping[str, Sequence[str]] | None = None,
) -> int | None:
    """Serve this process's metrics and export the lag of its consumer groups.

    Parameters
    ----------
    args : argparse.Namespace
        The command's arguments (``metrics_port``).
    settings : Settings
        Metrics port and host, and Kafka for the lag.
    groups : Mapping of str to sequence of str or None, default None
        ``{consumer group: its input topics}`` whose lag this process reports
        (``phenocascade_consumer_lag``), every 5 s from a background thread.

    Returns
    -------
    int or None
        The port served, or ``None`` (none asked for, or the port was in use).
    """
    port = serve_metrics(metrics_port(args, settings), settings.metrics_host)
    if port is not None and groups:
        reader = LagReader(settings.kafka)
        for group, topics in groups.items():
            watch_lag(group, functools.partial(reader.measure, group, list(topics)))
    return port


def child_metrics_ports(names: Sequence[str], base: int) -> dict[str, int]:
    """Return the metrics port of each of ``run``'s processes: ``base + 1``, ``base + 2``...

    A ``base`` of 0 gives every process 0 (no metrics).
    """
    return {name: base + i if base else 0 for i, name in enumerate(names, start=1)}


def with_metrics_ports(commands: Mapping[str, Sequence[str]], base: int) -> dict[str, list[str]]:
    """Return ``commands`` with each one's ``--metrics-port`` from :func:`child_metrics_ports`."""
    ports = child_metrics_ports(list(commands), base)
    return {name: [*args, METRICS_FLAG, str(ports[name])] for name, args in commands.items()}
