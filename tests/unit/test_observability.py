"""Metrics ports, the counts a batch adds, lag arithmetic, the joiner's end-to-end latency,
the status command's pure parts, the console's log filter and fully qualified CQL."""

from __future__ import annotations

import importlib
import json
import logging
import os
import pty
import re
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from rich.console import Console

from phenocascade.cli import build_parser
from phenocascade.cli.cascade import cascade_commands
from phenocascade.cli.logs import ConsoleFilter
from phenocascade.cli.metrics import child_metrics_ports, metrics_port, with_metrics_ports
from phenocascade.cli.status import rates, status_record, status_view, tier_modes, topology_groups
from phenocascade.config import LIBRDKAFKA_LOGGER, Settings, load_topology
from phenocascade.consumers.joiner import observe_output
from phenocascade.consumers.worker import _BatchTally, label_decision
from phenocascade.domain import LabelThresholds, Route, StageKind, StageOutput
from phenocascade.errors import ConfigError
from phenocascade.observability import serve_metrics
from phenocascade.store.cql import bind_keyspace, check_keyspace, qualified
from phenocascade.streams import events
from phenocascade.streams.lag import PartitionLag
from phenocascade.streams.serde import EventCodec, default_schema_dir

ROOT = Path(__file__).resolve().parents[2]


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- ports ---------------------------------------------------------------------------------
def test_each_process_of_run_gets_its_own_port_above_the_base() -> None:
    commands = cascade_commands(load_topology())
    ports = child_metrics_ports(list(commands), 9400)
    assert list(ports.values()) == list(range(9401, 9401 + len(commands)))
    flagged = with_metrics_ports(commands, 9400)
    parser = build_parser()
    for name, args in flagged.items():
        assert args[-2:] == ["--metrics-port", str(ports[name])]
        assert parser.parse_args(args).metrics_port == ports[name]


def test_the_annotation_loop_started_by_hand_beside_run_takes_ports_of_its_own() -> None:
    parser = build_parser()
    settings = Settings(metrics_port=9400)
    run = len(cascade_commands(load_topology())) + 3  # run's processes with --learning
    ports = {
        command: metrics_port(parser.parse_args([command]), settings)
        for command in ("sink", "ui", "retrainer", "rescorer")
    }
    assert len(set(ports.values())) == len(ports)
    assert all(p > 9400 + run for p in ports.values()), ports
    assert metrics_port(parser.parse_args(["run"]), settings) == 9400
    assert metrics_port(parser.parse_args(["sink", "--metrics-port", "9500"]), settings) == 9500
    off = Settings(metrics_port=0)
    assert metrics_port(parser.parse_args(["ui"]), off) == 0


def test_base_zero_turns_every_process_off() -> None:
    commands = cascade_commands(load_topology())
    assert set(child_metrics_ports(list(commands), 0).values()) == {0}
    assert all(a[-1] == "0" for a in with_metrics_ports(commands, 0).values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_are_served_and_a_busy_port_is_only_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert serve_metrics(0) is None
    port = _free_port()
    assert serve_metrics(port) == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert b"phenocascade_dead_letters_total" in answer.read()
    with caplog.at_level(logging.WARNING):
        assert serve_metrics(port) is None
    assert "in use" in caplog.text


# -- what a tier worker counts --------------------------------------------------------------
def test_label_decision_follows_the_thresholds_and_what_is_pending() -> None:
    t = LabelThresholds(positive=0.8, negative=0.2)
    assert [label_decision(p, t, pending=False) for p in (0.9, 0.8, 0.2, 0.1)] == [
        "present",
        "present",
        "absent",
        "absent",
    ]
    # A pending label is uncertain whatever its score (its group was not decided).
    assert label_decision(0.9, t, pending=True) == "uncertain"
    # A detector class with no confident box that is certified to be found: absent.
    assert label_decision(0.5, t, pending=False) == "absent"


def test_a_batch_counts_only_when_published() -> None:
    tier = "unit-tally"
    tally = _BatchTally(tier, taken=3)
    t = {"a": LabelThresholds(positive=0.8, negative=0.2)}
    tally.scored(Route.ANNOTATE, StageOutput(scores={"a": 0.9, "b": 0.9}), t, ("b",))
    tally.scored(Route.ANNOTATE, StageOutput(scores={"a": 0.5}), t, ("a",))
    tally.dead["corrupt_image"] = 1
    assert _value("phenocascade_tier_images_in_total", tier=tier) == 0
    tally.publish()
    assert _value("phenocascade_tier_images_in_total", tier=tier) == 3
    assert _value("phenocascade_tier_images_out_total", tier=tier, route="ANNOTATE") == 2
    assert _value("phenocascade_dead_letters_total", tier=tier, kind="corrupt_image") == 1
    decisions = "phenocascade_tier_label_decisions_total"
    assert _value(decisions, tier=tier, label="a", decision="present") == 1
    assert _value(decisions, tier=tier, label="a", decision="uncertain") == 1
    assert _value(decisions, tier=tier, label="b", decision="uncertain") == 1


# -- end to end ----------------------------------------------------------------------------
def test_a_tier_result_carries_its_submission_time_to_the_joiner() -> None:
    submitted = events.image_submitted("e2e-1", uri="/a.png")
    result = events.tier_result(
        submitted,
        tier="quality",
        kind=StageKind.GATE,
        route=Route.SKIP,
        output=StageOutput(scores={"clear": 0.0}),
        model_name="m",
        model_version="v1",
    )
    codec = EventCodec()
    _, back = codec.decode(codec.encode("TierResult", result))
    assert events.to_epoch_ms(back["submitted_at"]) == submitted["submitted_at"]
    before = _value("phenocascade_end_to_end_seconds_count", status="unusable")
    observe_output(back, {"status": "unusable"})
    assert _value("phenocascade_end_to_end_seconds_count", status="unusable") == before + 1
    assert _value("phenocascade_outputs_total", status="unusable") >= 1


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_an_older_tier_result_reads_without_a_submission_time(tmp_path: Path, version: str) -> None:
    old = json.loads((default_schema_dir() / "history" / f"TierResult.{version}.avsc").read_text())
    assert "submitted_at" not in {f["name"] for f in old["fields"]}
    (tmp_path / "history").mkdir()
    (tmp_path / "TierResult.avsc").write_text(json.dumps(old))
    record = {
        "image_id": "old-1",
        "tier": "quality",
        "kind": "gate",
        "route": "PASS",
        "scores": {},
        "boxes": [],
        "model_name": "m",
        "model_version": "v1",
        "study": "",
        "uri": None,
        "produced_at": datetime.now(UTC),
        "reason": None,
    }
    record = {k: v for k, v in record.items() if k in {f["name"] for f in old["fields"]}}
    _, back = EventCodec().decode(EventCodec(tmp_path).encode("TierResult", record))
    assert back["submitted_at"] is None
    before = _value("phenocascade_end_to_end_seconds_count", status="analyzed")
    observe_output(back, {"status": "analyzed"})  # counted, but no latency to observe
    assert _value("phenocascade_end_to_end_seconds_count", status="analyzed") == before


# -- lag and status ------------------------------------------------------------------------
def test_lag_counts_from_the_commit_or_from_the_start() -> None:
    assert PartitionLag("t", 0, committed=7, start=0, end=10).lag == 3
    assert PartitionLag("t", 0, committed=None, start=4, end=10).lag == 6
    assert PartitionLag("t", 0, committed=2, start=4, end=10).lag == 6  # deleted by retention
    assert PartitionLag("t", 0, committed=10, start=0, end=10).lag == 0


def test_status_names_every_group_of_the_topology_with_its_inputs() -> None:
    topology = load_topology()
    groups = topology_groups(topology)
    for tier in topology.tiers:
        assert tier.input in groups[tier.group]
    assert groups[topology.joiner.app_id] == [t.result_topic for t in topology.tiers]
    assert groups[topology.sink_group] == [topology.annotate_topic]
    assert groups[topology.retrainer_group] == [topology.annotations_topic]


def test_status_rate_is_the_change_of_committed_offsets_per_second() -> None:
    before = {"g": [PartitionLag("t", 0, 10, 0, 30), PartitionLag("t", 1, None, 0, 5)]}
    after = {"g": [PartitionLag("t", 0, 20, 0, 30), PartitionLag("t", 1, 4, 0, 5)]}
    assert rates(before, after, 2.0) == {"g": 7.0}
    record = status_record(after, {"g": 7.0}, {"g": ["t"]}, {"quality": "v1", "minority": None})
    assert record["groups"][0]["lag"] == 11
    assert [p["lag"] for p in record["groups"][0]["partitions"]] == [10, 1]
    assert record["champions"] == {"quality": "v1", "minority": None}


def test_status_says_each_tiers_runtime_and_annotation_queue_order() -> None:
    topology = load_topology()
    tiers = [
        t.model_copy(update={"runtime": "bf16", "acquisition": "margin"})
        if t.name == "majority"
        else t
        for t in topology.tiers
    ]
    modes = tier_modes(topology.model_copy(update={"tiers": tiers}))
    assert modes["majority"] == {"runtime": "bf16", "queue": "margin"}
    assert modes["quality"] == {"runtime": "eager", "queue": "random"}  # packaged
    record = status_record({}, {}, {}, {"majority": "v1"}, modes)
    console = Console(width=140, record=True)
    console.print(status_view(record))
    row = next(line for line in console.export_text().splitlines() if "majority" in line)
    assert "bf16" in row and "margin" in row


# -- the console ---------------------------------------------------------------------------
def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_the_console_shows_ours_and_only_the_drivers_warnings() -> None:
    quiet, verbose = ConsoleFilter(verbose=False), ConsoleFilter(verbose=True)
    assert quiet.filter(_record("phenocascade.cli.cascade", logging.INFO))
    assert not quiet.filter(_record("cassandra.policies", logging.INFO))
    assert quiet.filter(_record("cassandra.cluster", logging.WARNING))
    # librdkafka's warnings are retries while a broker starts: log file only
    assert not quiet.filter(_record(LIBRDKAFKA_LOGGER, logging.WARNING))
    assert quiet.filter(_record(LIBRDKAFKA_LOGGER, logging.ERROR))
    assert verbose.filter(_record("cassandra.policies", logging.INFO))
    assert verbose.filter(_record(LIBRDKAFKA_LOGGER, logging.WARNING))
    assert not verbose.filter(_record("cassandra.pool", logging.DEBUG))


# -- fully qualified CQL ---------------------------------------------------------------------
class _Session:
    """Stands in for a driver session: only its identity matters here."""


def test_statements_name_the_sessions_keyspace() -> None:
    session = _Session()
    with pytest.raises(ConfigError, match="no phenocascade keyspace"):
        qualified(session, "SELECT * FROM {ks}.users")
    bind_keyspace(session, "phenocascade_it_1")
    assert qualified(session, "SELECT * FROM {ks}.users") == "SELECT * FROM phenocascade_it_1.users"


@pytest.mark.parametrize("bad", ["", "1abc", "a;DROP KEYSPACE x", "a.b", "x" * 49])
def test_a_keyspace_that_is_not_a_plain_name_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="PHENOCASCADE_CASSANDRA__KEYSPACE"):
        check_keyspace(bad)


def test_the_joiner_measures_from_the_submission(monkeypatch: pytest.MonkeyPatch) -> None:
    submitted_ms = 1_000_000
    monkeypatch.setattr(time, "time", lambda: submitted_ms / 1000 + 2.5)
    before = _value("phenocascade_end_to_end_seconds_sum", status="awaiting_annotation")
    observe_output({"submitted_at": submitted_ms}, {"status": "awaiting_annotation"})
    after = _value("phenocascade_end_to_end_seconds_sum", status="awaiting_annotation")
    assert after - before == pytest.approx(2.5)


def test_the_dashboard_charts_only_metrics_the_code_declares() -> None:
    for module in (
        "phenocascade.cli.supervise",
        "phenocascade.consumers.annotation_sink",
        "phenocascade.consumers.retrainer",
        "phenocascade.ui.publish",
    ):
        importlib.import_module(module)
    dashboard = json.loads((ROOT / "infra" / "grafana" / "phenocascade.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    used = set(re.findall(r"\bphenocascade_[a-z_]+", exprs))
    declared = set(REGISTRY._names_to_collectors)
    assert len(used) >= 12 and used <= declared, used - declared


def _logging(records: str, log_dir: Path, **streams: Any) -> subprocess.CompletedProcess[str]:
    """Run a process that configures logging as the CLI does, then logs ``records``."""
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from phenocascade.cli.logs import configure_logging\n"
        "configure_logging(False, Path(sys.argv[1]))\n" + records
    )
    return subprocess.run(
        [sys.executable, "-c", script, str(log_dir)],
        text=True,
        timeout=60,
        check=True,
        **(streams or {"capture_output": True}),
    )


def test_driver_chatter_goes_to_the_log_file_not_the_console(tmp_path: Path) -> None:
    done = _logging(
        "logging.getLogger('cassandra.policies').info('driver chatter')\n"
        "logging.getLogger('librdkafka').warning('%4|GETPID| retrying')\n"
        "logging.getLogger('phenocascade.cli').info('what a user needs')\n",
        tmp_path,
    )
    assert "what a user needs" in done.stderr
    assert "chatter" not in done.stderr and "GETPID" not in done.stderr
    kept = (tmp_path / "drivers.log").read_text()
    assert "driver chatter" in kept and "GETPID" in kept and "user needs" not in kept


def test_a_terminal_shows_our_messages_alone_and_a_log_file_keeps_their_time(
    tmp_path: Path,
) -> None:
    records = (
        "logging.getLogger('phenocascade.recipes.core').info('training quality')\n"
        "logging.getLogger('phenocascade.cli').warning('a broker is slow')\n"
    )
    controller, terminal = pty.openpty()
    try:
        _logging(records, tmp_path, stderr=terminal, stdout=subprocess.DEVNULL)
        shown = os.read(controller, 65536).decode().splitlines()
    finally:
        os.close(controller)
        os.close(terminal)
    assert shown == ["training quality", "WARNING phenocascade.cli: a broker is slow"]
    first = _logging(records, tmp_path).stderr.splitlines()[0]
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d [\d:,]+ INFO phenocascade.recipes.core: training quality", first
    )


def test_every_store_statement_names_its_keyspace() -> None:
    store = ROOT / "src" / "phenocascade" / "store"
    unqualified = [
        f"{path.name}: {match.group(0)}"
        for path in sorted(store.glob("*.py"))
        for match in re.finditer(
            r"\b(?:FROM|INTO|UPDATE|TABLE IF NOT EXISTS) (\S+)", path.read_text()
        )
        if not match.group(1).startswith(("{ks}.", "{{ks}}.", "system_schema."))
    ]
    assert unqualified == []
