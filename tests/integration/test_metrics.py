"""Every process's Prometheus metrics during a real stream add up to the report, and the
command line's console stays clean of driver chatter. Real brokers, real models, real
processes."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping

import pytest
from harness import Cascade
from prometheus_client.parser import text_string_to_metric_families

from phenocascade.cli.cascade import build_report, cascade_commands
from phenocascade.cli.demo import sample_images
from phenocascade.config import Settings, Topology, load_topology
from phenocascade.models.base import champion_version
from phenocascade.recipes import ensure_bootstrap

pytestmark = [pytest.mark.integration, pytest.mark.slow]

Samples = list[tuple[str, dict[str, str], float]]


def _free_ports(n: int) -> int:
    """Return a base port such that it and the ``n`` ports above it are free now."""
    for _ in range(50):
        base = random.randint(20000, 60000 - n)
        try:
            for port in range(base, base + n + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free range of ports")


def small_topology() -> Topology:
    """The packaged gate and its first branch, that branch as 2 single-thread replicas.

    Small enough to stream through quickly on two cores, and the replicas show that each
    process counts its own share.
    """
    data = load_topology().model_dump()
    gates = [t for t in data["tiers"] if t["role"] == "gate"]
    branch = next(t for t in data["tiers"] if t["role"] == "branch")
    data["tiers"] = [*gates, {**branch, "replicas": 2, "threads": 1}]
    return Topology.model_validate(data)


@pytest.fixture(scope="module")
def cascade(infra: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cascade]:
    topology = small_topology()
    if any(champion_version(infra.artifacts, t.artifact) is None for t in topology.tiers):
        ensure_bootstrap(infra)
    workdir = tmp_path_factory.mktemp("metrics")
    c = Cascade(infra, workdir, topology, metrics_port=_free_ports(len(cascade_commands(topology))))
    c.start()
    yield c
    c.stop()


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def total(scraped: Mapping[str, Samples], name: str, **labels: str) -> float:
    """Sum ``name`` over every process, for samples whose labels include ``labels``."""
    return sum(
        value
        for samples in scraped.values()
        for n, have, value in samples
        if n == name and labels.items() <= have.items()
    )


def _scrape_all(cascade: Cascade) -> dict[str, Samples]:
    return {name: scrape(port) for name, port in cascade.metrics_ports.items()}


def _lag(scraped: Mapping[str, Samples], group: str) -> dict[tuple[str, str], float]:
    """Each partition's lag of ``group``, as its processes last measured it."""
    return {
        (have["topic"], have["partition"]): value
        for samples in scraped.values()
        for n, have, value in samples
        if n == "phenocascade_consumer_lag" and have["group"] == group
    }


def _run_cli(cascade: Cascade, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "phenocascade", *args],
        env=cascade.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_quiet(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr
    for noise in ("anti-pattern", "%4|", "%3|", "Traceback", "INFO cassandra"):
        assert noise not in done.stderr, done.stderr


def test_every_process_counts_what_the_report_counts(cascade: Cascade) -> None:
    images = sample_images(cascade.settings, dsb=6, bccd=3, bbbc006_unclear=3, bbbc006_clear=0)
    broken = cascade.roots / "empty.png"
    broken.write_bytes(b"")
    ids = cascade.submit([*images, broken], prefix="m-")
    dead_id = ids[-1]
    counts = cascade.wait_until_done(ids, timeout_s=600, dead_ok=[dead_id])
    assert set(counts) | {dead_id} == set(ids), cascade.log_tail()
    report = build_report(cascade.settings, cascade.topology, prefix=cascade.prefix + "m-")
    assert report["submitted"] == 13 and report["balanced"] and report["dead_lettered"] == 1

    # The joiner counts an output after sending it; give the last one a moment.
    deadline = time.monotonic() + 30
    while True:
        scraped = _scrape_all(cascade)
        outputs = total(scraped, "phenocascade_outputs_total")
        if outputs >= len(counts) or time.monotonic() > deadline:
            break
        time.sleep(1)

    topology = cascade.topology
    out = "phenocascade_tier_images_out_total"
    for tier in topology.tiers:
        taken = total(scraped, "phenocascade_tier_images_in_total", tier=tier.name)
        scored = total(scraped, out, tier=tier.name)
        dead = total(scraped, "phenocascade_dead_letters_total", tier=tier.name)
        assert taken == scored + dead > 0, (tier.name, taken, scored, dead)
        # every image a tier scored reached the joiner
        assert total(scraped, "phenocascade_joiner_results_in_total", tier=tier.name) == scored
    (gate,) = topology.gate_tiers
    branches = topology.branch_tiers
    routes = {r: total(scraped, out, tier=gate.name, route=r) for r in ("PASS", "SKIP", "ANNOTATE")}
    dead_at_gate = total(scraped, "phenocascade_dead_letters_total", tier=gate.name)
    assert sum(routes.values()) + dead_at_gate == report["submitted"], routes
    assert dead_at_gate == report["dead_lettered"]
    for kind, n in report["dead_letter_kinds"].items():
        assert total(scraped, "phenocascade_dead_letters_total", tier=gate.name, kind=kind) == n
    for branch in branches:
        assert (
            total(scraped, "phenocascade_tier_images_in_total", tier=branch.name) == routes["PASS"]
        )

    for status in ("analyzed", "unusable", "awaiting_annotation"):
        assert total(scraped, "phenocascade_outputs_total", status=status) == report[status], status
    assert total(scraped, "phenocascade_end_to_end_seconds_count") == len(counts)
    assert 0 < total(scraped, "phenocascade_end_to_end_seconds_sum") < 600 * len(counts)

    commands = cascade_commands(topology)
    for tier in topology.tiers:
        version = champion_version(cascade.settings.artifacts, tier.artifact)
        served = {
            have["version"]
            for name, args in commands.items()
            if args[:2] == ["worker", tier.name]
            for n, have, _ in scraped[name]
            if n == "phenocascade_model_info"
        }
        assert served == {version}, (tier.name, served)


def test_lag_is_reported_per_group_and_partition_and_drains(cascade: Cascade) -> None:
    topology = cascade.topology
    partitions = {t.name: t.partitions for t in topology.topics}
    groups = {t.group: [t.input] for t in topology.tiers}
    groups[topology.joiner.app_id] = [t.result_topic for t in topology.tiers]
    expected = {
        g: {(t, str(p)) for t in ts for p in range(partitions[t])} for g, ts in groups.items()
    }
    # A group commits up to a partition's last message; the marker of the transaction that
    # wrote it lies past it (PartitionLag.caught_up): one offset per partition may remain,
    # for the joiner (aiokafka) and for a worker whose last batch ended at that message.
    allowed = dict.fromkeys(groups, 1)
    deadline = time.monotonic() + 60
    while True:
        # each process measures its group's lag every 5 s
        scraped = _scrape_all(cascade)
        lags = {group: _lag(scraped, group) for group in groups}
        settled = all(
            set(lags[g]) == expected[g] and max(lags[g].values()) <= allowed[g] for g in groups
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(2)
    for group in groups:
        assert set(lags[group]) == expected[group], group
        assert max(lags[group].values()) <= allowed[group], (group, lags[group])


def test_status_reads_every_group_and_champion_and_the_console_is_clean(
    cascade: Cascade,
) -> None:
    topology_file = str(cascade.settings.topology)
    status = _run_cli(cascade, "status", "--json", "--interval", "0.5", "--topology", topology_file)
    _assert_quiet(status)
    record = json.loads(status.stdout)
    by_group = {g["group"]: g for g in record["groups"]}
    for tier in cascade.topology.tiers:
        assert by_group[tier.group]["topics"] == [tier.input]
        assert by_group[tier.group]["partitions"], tier.group
        assert record["champions"][tier.name] == champion_version(
            cascade.settings.artifacts, tier.artifact
        )
    assert cascade.topology.joiner.app_id in by_group

    # Commands that prepare Cassandra statements and open Kafka clients, on a console
    # (`status` without --once: off a terminal it prints one reading and exits).
    for args in (
        ("topics", "create", "--topology", topology_file),
        ("report", "--prefix", cascade.prefix + "m-", "--topology", topology_file),
        ("results", "--study", cascade.prefix + "it", "--topology", topology_file),
        ("status", "--interval", "0.5", "--topology", topology_file),
    ):
        done = _run_cli(cascade, *args)
        _assert_quiet(done)
        assert done.stdout.strip(), args
