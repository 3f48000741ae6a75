"""The topology's tier replicas: the processes `phenocascade run` starts, and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from phenocascade.cli import build_parser
from phenocascade.cli.cascade import cascade_commands
from phenocascade.config import Topology, load_topology
from phenocascade.streams.kafka import default_instance_id


def _with_replicas(tier: str, replicas: int) -> Topology:
    data = load_topology().model_dump()
    for spec in data["tiers"]:
        spec["replicas"] = replicas if spec["name"] == tier else 1
    return Topology.model_validate(data)


def test_each_replica_is_a_named_process_with_its_own_instance_id() -> None:
    commands = cascade_commands(_with_replicas("majority", 3))
    majority = {n: c for n, c in commands.items() if n.startswith("majority")}
    host = default_instance_id()
    assert majority == {
        "majority": ["worker", "majority", "--instance", host],
        "majority-2": ["worker", "majority", "--instance", f"{host}-2"],
        "majority-3": ["worker", "majority", "--instance", f"{host}-3"],
    }
    assert commands["quality"] == ["worker", "quality", "--instance", host]
    assert commands["joiner"] == ["joiner"]
    parser = build_parser()
    for args in commands.values():
        assert callable(parser.parse_args(args).func)


def test_more_replicas_than_input_partitions_is_refused() -> None:
    partitions = {t.name: t.partitions for t in load_topology().topics}
    usable = partitions[load_topology().tier("majority").input]
    _with_replicas("majority", usable)
    with pytest.raises(ValidationError, match="would sit idle"):
        _with_replicas("majority", usable + 1)


def test_the_packaged_queues_use_the_strategy_the_active_learning_benchmark_chose() -> None:
    # benchmarks/active_learning.py picks, per tier, the strategy whose gain over random is
    # significant (else random); the packaged topology must follow its latest result.
    results = Path(__file__).parents[2] / "benchmarks" / "results" / "active_learning.json"
    measured = json.loads(results.read_text())
    tiers = {t.name: t for t in load_topology().tiers}
    chosen = {name: measured[name]["best"] for name in tiers if name in measured}
    assert chosen, "active_learning.json measures none of the packaged tiers"
    assert {name: tiers[name].acquisition for name in chosen} == chosen
