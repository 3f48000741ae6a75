"""``phenocascade status``: each consumer group's lag and rate, and each tier's champion.

The groups are the topology's: one per tier (its input topic), the joiner's (every tier's
result topic), the annotation sink's (the annotate topic) and the retrainer's (the
annotations topic). Lag is read from Kafka (committed offsets against the partitions'
ends, :class:`~phenocascade.streams.lag.LagReader`); the rate is the change of the
committed offsets between two readings, in offsets per second (a transaction marker on
the input takes an offset too). Champions are read from the artifacts folder.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from phenocascade.config import Settings, Topology, get_settings, load_topology
from phenocascade.models.base import champion_version
from phenocascade.streams.lag import LagReader, PartitionLag

console = Console()

Snapshot = dict[str, list[PartitionLag]]


def topology_groups(topology: Topology) -> dict[str, list[str]]:
    """Return ``{consumer group: its input topics}`` of every consumer of ``topology``."""
    groups: dict[str, list[str]] = {}
    for tier in topology.tiers:
        groups.setdefault(tier.group, []).append(tier.input)
    groups[topology.joiner.app_id] = [t.result_topic for t in topology.tiers]
    groups[topology.sink_group] = [topology.annotate_topic]
    groups[topology.retrainer_group] = [topology.annotations_topic]
    return groups


def champions(settings: Settings, topology: Topology) -> dict[str, str | None]:
    """Return the champion version of each tier's artifact (``None``: no model yet)."""
    return {t.name: champion_version(settings.artifacts, t.artifact) for t in topology.tiers}


def tier_modes(topology: Topology) -> dict[str, dict[str, str]]:
    """Return how each tier serves: its ``runtime`` and its annotation queue's order.

    The order is the tier's ``acquisition`` strategy (docs/active_learning.md); a served
    runtime other than eager also needs a passing check of the champion (the worker logs
    which it serves).
    """
    return {t.name: {"runtime": t.runtime, "queue": t.acquisition} for t in topology.tiers}


def take_snapshot(reader: LagReader, groups: Mapping[str, Sequence[str]]) -> Snapshot:
    """Read where every group stands on every partition of its topics."""
    return {group: reader.lag(group, topics) for group, topics in groups.items()}


def _committed(parts: Sequence[PartitionLag]) -> int:
    return sum(p.start if p.committed is None else p.committed for p in parts)


def rates(before: Snapshot, after: Snapshot, seconds: float) -> dict[str, float]:
    """Return each group's committed offsets per second between two snapshots."""
    return {
        group: max(0.0, (_committed(parts) - _committed(before.get(group, parts))) / seconds)
        for group, parts in after.items()
    }


def status_record(
    snapshot: Snapshot,
    group_rates: Mapping[str, float],
    groups: Mapping[str, Sequence[str]],
    tier_champions: Mapping[str, str | None],
    modes: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """Return the status as JSON-ready data: groups with their partitions, and champions.

    ``modes`` (:func:`tier_modes`) adds each tier's runtime and queue order as ``tiers``.
    """
    return {
        "groups": [
            {
                "group": group,
                "topics": list(groups[group]),
                "lag": sum(p.lag for p in parts),
                "rate_per_s": round(group_rates.get(group, 0.0), 3),
                "partitions": [
                    {
                        "topic": p.topic,
                        "partition": p.partition,
                        "committed": p.committed,
                        "end": p.end,
                        "lag": p.lag,
                    }
                    for p in parts
                ],
            }
            for group, parts in snapshot.items()
        ],
        "champions": dict(tier_champions),
        "tiers": {tier: dict(mode) for tier, mode in (modes or {}).items()},
    }


def status_view(record: Mapping[str, Any]) -> Group:
    """Return the rich tables of a :func:`status_record`."""
    groups = Table(title="consumer groups")
    groups.add_column("group", no_wrap=True)
    groups.add_column("topics", no_wrap=True)
    for col in ("parts", "lag", "max", "rate/s"):
        groups.add_column(col, justify="right")
    for g in record["groups"]:
        parts = g["partitions"]
        groups.add_row(
            g["group"],
            "\n".join(g["topics"]),
            str(len(parts)),
            str(g["lag"]),
            str(max((p["lag"] for p in parts), default=0)),
            f"{g['rate_per_s']:.1f}",
        )
    tiers = Table(title="champions")
    tiers.add_column("tier")
    tiers.add_column("champion")
    tiers.add_column("runtime")
    tiers.add_column("annotation queue by")
    for tier, version in record["champions"].items():
        mode = record.get("tiers", {}).get(tier, {})
        tiers.add_row(
            tier,
            version or "[yellow](no model: every image goes to annotation)",
            mode.get("runtime", ""),
            mode.get("queue", ""),
        )
    return Group(groups, tiers)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the lag and rate of every consumer group and the champion of every tier.

    Live, refreshed every ``--interval`` seconds, until Ctrl-C; ``--once`` or ``--json``
    print one reading (two snapshots ``--interval`` apart, for the rate), and so does a
    console that is not a terminal (a pipe, a log file), which a live view cannot refresh.
    """
    settings = get_settings()
    path = args.topology or settings.topology
    topology = load_topology(Path(path) if path else None)
    groups = topology_groups(topology)
    reader = LagReader(settings.kafka)
    before, at = take_snapshot(reader, groups), time.monotonic()

    def reading() -> dict[str, Any]:
        nonlocal before, at
        time.sleep(args.interval)
        after, now = take_snapshot(reader, groups), time.monotonic()
        group_rates = rates(before, after, now - at)
        before, at = after, now
        return status_record(
            after, group_rates, groups, champions(settings, topology), tier_modes(topology)
        )

    if args.json:
        print(json.dumps(reading(), indent=2))
    elif args.once or not console.is_terminal:
        console.print(status_view(reading()))
    else:
        try:
            with Live(console=console, auto_refresh=False) as live:
                while True:
                    live.update(status_view(reading()), refresh=True)
        except KeyboardInterrupt:
            pass
    return 0


def register(sub: Any) -> None:
    """Register ``phenocascade status``."""
    p = sub.add_parser(
        "status",
        help="lag and rate of every consumer group, champion of every tier (live)",
        description="Print the lag and consume rate of every consumer group of the topology "
        "(from Kafka's committed offsets and the partitions' ends) and the champion of "
        "every tier (from the artifacts folder), refreshed every --interval seconds until "
        "Ctrl-C; off a terminal (piped, redirected), one reading, as --once.",
    )
    p.add_argument("--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.add_argument("--json", action="store_true", help="print one reading as JSON and exit")
    p.add_argument(
        "--interval", type=float, default=2.0, help="seconds between readings (default: 2)"
    )
    p.set_defaults(func=cmd_status)
