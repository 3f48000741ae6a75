"""The chaos drill's figures: exactly once under faults, recovery and slowdown (issue 12).

A recipe outside the library. It starts its own replicated cluster (``phenocascade infra
up --nodes 3`` in a temporary ``PHENOCASCADE_HOME``, on ports apart from the default
single node's), then runs the drill of ``tests/chaos/drill.py`` twice on it with the same
images and pacing: once without faults (the baseline) and once with them (every cascade
process killed -9 once, a Kafka broker killed and restarted, a Cassandra node down for
30 s, and a retrainer promotion mid-stream). The cluster is stopped afterwards.

Usage::

    .venv/bin/python benchmarks/chaos.py [--images 500] [--seed 0] [--stream-s 300]
        [--out benchmarks/results/chaos.json]

Writes ``chaos.json``: the faulted run's ``images``, ``lost``, ``duplicated``,
``cassandra_matches_topic``, ``faults`` (count per kind), ``recovery_s`` (per kind, the
worst), ``restarts`` and ``latency_s``; ``baseline`` (the same figures without faults);
``slowdown``: the mean latency (submission to output) of the images submitted while
faults were injected, over the baseline run's mean latency; and ``command``, ``commit``,
``host``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "chaos"))

from cluster import local_cluster
from drill import run_drill

from provenance import commit

RESULTS = Path(__file__).parent / "results"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the baseline and the faulted drill on one cluster; write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-s", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="phenocascade-chaos-") as tmp:
        work = Path(tmp)
        with local_cluster(work / "cluster") as (settings, control):
            baseline, faulted = (
                run_drill(
                    settings,
                    work / name,
                    control=ctl,
                    images=args.images,
                    seed=args.seed,
                    stream_s=args.stream_s,
                )
                for name, ctl in (("baseline", None), ("faulted", control))
            )
    first = min(f.at for f in faulted.faults)
    last = max(f.repaired_at or f.at for f in faulted.faults)
    during, usual = faulted.mean_latency(first, last), baseline.mean_latency()
    result = {
        **faulted.as_dict(),
        "slowdown": round(during / usual, 2) if during and usual else None,
        "mean_latency_during_faults_s": during,
        "baseline": baseline.as_dict(),
        "command": shlex.join([".venv/bin/python", "benchmarks/chaos.py", *sys.argv[1:]]),
        "commit": commit(),
        "host": {
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("images", "lost", "duplicated", "slowdown")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
