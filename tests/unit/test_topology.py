"""The topology's tier replicas: the processes `phenocascade run` starts, and validation."""

from __future__ import annotations

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
