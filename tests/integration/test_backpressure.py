"""Backpressure: a tier slowed tenfold makes the rest of the cascade wait, and drops nothing.

The majority worker runs with the drill setting ``--slowdown 10`` (each batch takes ten
times what its model needs). Kafka holds what it has not read: the gate keeps up, the
joiner holds every image that waits for the slow tier, ``phenocascade status`` shows the
slow group behind while the gate's has caught up, and in the end every image has exactly
one output with the slow tier's decision in it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import Cascade

from phenocascade.cli.cascade import cascade_commands, start_process
from phenocascade.config import Settings
from phenocascade.recipes import ensure_bootstrap
from phenocascade.recipes.bundled_data import split_samples

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 12


def _status(cascade: Cascade, topology_file: Path) -> dict[str, int]:
    """Each consumer group's largest partition lag, as ``phenocascade status --json`` says.

    A group that has read everything may still lag by one on a partition: the marker that
    ends the last transaction written there takes an offset, which a consumer's commit
    does not always cover. A lag of at most 1 per partition is therefore "caught up".
    """
    done = subprocess.run(
        [sys.executable, "-m", "phenocascade", "status", "--json", "--interval", "0.2",
         "--topology", str(topology_file)],
        env=cascade.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record: dict[str, Any] = json.loads(done.stdout)
    return {
        g["group"]: max((p["lag"] for p in g["partitions"]), default=0) for g in record["groups"]
    }


def test_a_tier_ten_times_slower_holds_the_others_back_and_loses_nothing(
    infra: Settings, tmp_path: Path
) -> None:
    ensure_bootstrap(infra)
    cascade = Cascade(infra, tmp_path / "slow")
    topology_file = tmp_path / "slow" / "topology.yaml"
    topology_file.write_text(yaml.safe_dump(cascade.topology.model_dump()))
    commands = cascade_commands(cascade.topology)
    commands["majority"] += ["--slowdown", "10"]
    cascade.procs = {
        name: start_process(name, args, cascade.logs, cascade.env)
        for name, args in commands.items()
    }
    gate = cascade.topology.tier("quality").group
    slow = cascade.topology.tier("majority").group
    try:
        paths = [s.path for s in split_samples(infra, "dsb2018", "test")[:IMAGES] if s.path]
        ids = cascade.submit(paths, prefix="slow-")

        # While the slow tier works, the gate has caught up, the slow group is behind,
        # and the joiner holds the images that wait for it.
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, cascade.log_tail()
            assert all(cascade.alive().values()), cascade.log_tail()
            lag = _status(cascade, topology_file)
            if lag[gate] <= 1 and lag[slow] > 1:
                break
            time.sleep(1.0)
        waiting = len(ids) - len({o["image_id"] for o in cascade.outputs()} & set(ids))
        assert waiting > 0, "every image was out although the slow tier was behind"

        counts = cascade.wait_until_done(ids, timeout_s=900)
        assert sorted(counts) == sorted(ids), cascade.log_tail()
        assert set(counts.values()) == {1}, counts
        assert not [d for d in cascade.dead_letters() if d["image_id"] in set(ids)]
        # Nothing was dropped: every image the gate passed carries the slow tier's route.
        outputs = {o["image_id"]: o for o in cascade.outputs() if o["image_id"] in set(ids)}
        passed = [o for o in outputs.values() if o["routes"].get("quality") == "PASS"]
        assert passed, Counter(o["routes"].get("quality") for o in outputs.values())
        assert all("majority" in o["routes"] for o in passed), [o["routes"] for o in passed]
        # ...and every group of the cascade caught up in the end.
        cascade_groups = [t.group for t in cascade.topology.tiers]
        cascade_groups.append(cascade.topology.joiner.app_id)
        deadline = time.monotonic() + 120
        while any((lag := _status(cascade, topology_file))[g] > 1 for g in cascade_groups):
            assert time.monotonic() < deadline, lag
            time.sleep(2.0)
    finally:
        cascade.stop()
