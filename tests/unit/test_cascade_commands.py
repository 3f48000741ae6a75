"""Which processes a cascade runs, whole or tier by tier (as the demo starts them)."""

from __future__ import annotations

from phenocascade.cli.cascade import cascade_commands
from phenocascade.config import get_settings, load_topology


def test_the_demo_can_start_the_cascade_tier_by_tier() -> None:
    topology = load_topology(get_settings().topology)
    whole = cascade_commands(topology)
    assert list(whole) == ["quality", "majority", "minority", "minority-2", "joiner"]

    parts = [cascade_commands(topology, only=[t]) for t in ("joiner", "quality", "minority")]
    assert [list(p) for p in parts] == [["joiner"], ["quality"], ["minority", "minority-2"]]
    # Each replica keeps the arguments (and the instance id) it has in the whole cascade.
    for part in parts:
        assert all(whole[name] == args for name, args in part.items())
    assert cascade_commands(topology, only=[]) == {}
