"""Compute of tiers 2 and 3 with and without unusable images (issue 13, P3).

The goal: with 30 % unusable images, the compute of tiers 2 and 3 (the majority tier and
both minority replicas, which see only the images the quality gate passes) falls by at
least 0.9 x 30 %.

One invocation starts the whole cascade (every tier worker and the joiner as processes,
as ``tests/integration/harness.py``'s ``Cascade`` does, on the running local Kafka and
Cassandra), streams a warm-up batch, then alternates two runs ``--repeats`` times:

- **A (clean):** the first ``--images`` DSB 2018 images (sorted), as one burst;
- **B (unusable):** the same images, with ``round(--unusable x --images)`` of them
  replaced, evenly through the stream, by severely degraded copies (PNG files written
  before the cascade starts, by :mod:`phenocascade.data.degrade`: the ``*:severe``
  kinds, which the gate is trained to call unclear, taken in turn unless ``--kinds``
  names others).

Per run: the CPU seconds (user + system, children included) of each cascade process from
just before the first submission until the harness sees the last output (it polls every
2 s, so a run includes up to 2 s of idle polling; ``idle_cpu_s_per_s`` is that rate,
measured over ``--idle-s`` seconds with nothing submitted), and the gate's route of every
image, from the cascade's outputs.

Usage::

    .venv/bin/python benchmarks/unusable.py [--images 120] [--unusable 0.3] [--repeats 2]

Writes ``--out`` (default ``benchmarks/results/unusable.json``):

- ``cpu_s.{clean,unusable}``: per process, the median over the repetitions, and
  ``tiers_2_3`` (the median of each run's majority + minority replicas);
  ``repetitions``: every run's figures;
- ``fall``: ``1 - tiers_2_3(unusable) / tiers_2_3(clean)``; ``goal``:
  ``0.9 x unusable_fraction``; ``met``: ``fall >= goal``;
- ``expected_fall``: ``1 - reached(unusable) / reached(clean)``, the fall if the compute
  of tiers 2 and 3 were proportional to the images that reach them (the gate passed),
  and ``unreached_gain``: the fraction of images that did not reach them in B minus in
  A; a ``fall`` below ``expected_fall`` is overhead (per-batch or idle work), an
  ``expected_fall`` below the goal is the gate passing degraded images (or stopping
  clean ones);
- ``gate``: per run kind, the gate's routes of the clean and of the degraded images
  (and per degradation kind), medians over the repetitions;
- ``parallelism``, and the command, commit, host, cores and torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from harness import Cascade

from phenocascade.config import get_settings, load_topology
from phenocascade.data import degrade
from phenocascade.data.labelled import stable_seed
from phenocascade.imaging import decode_file
from phenocascade.infra.local import up
from phenocascade.recipes import ensure_bootstrap
from provenance import provenance
from throughput import cpu_seconds

RESULTS = Path(__file__).parent / "results"
DEFAULT_OUT = RESULTS / "unusable.json"
BRANCH_PROCESSES = ("majority", "minority", "minority-2")
"""Tiers 2 and 3: the majority worker and both minority replicas."""

KINDS = ("clean", "unusable")


@dataclass(frozen=True)
class Item:
    """One image of a stream: its file, and its degradation (``""``: the clean image)."""

    path: Path
    degradation: str = ""


def spread_positions(total: int, count: int) -> list[int]:
    """Return ``count`` indices of ``range(total)``, evenly spread."""
    return [i for i in range(total) if (i * count) // total != ((i + 1) * count) // total]


def write_degraded(source: Path, spec: str, folder: Path, max_pixels: int) -> Path:
    """Write a degraded copy of ``source`` into ``folder`` (PNG; 16-bit colour as TIFF)."""
    kind, level = degrade.parse_spec(spec)
    pixels = degrade.apply(
        decode_file(source, max_pixels=max_pixels), spec, stable_seed(source.stem, spec)
    )
    stem = f"{source.stem}_{kind}_{level}"
    if pixels.dtype == np.uint16 and pixels.shape[2] == 3:
        path = folder / f"{stem}.tif"
        tifffile.imwrite(path, pixels)
        return path
    path = folder / f"{stem}.png"
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(path)
    return path


def run_stream(
    cascade: Cascade, pids: Mapping[str, int], items: Sequence[Item], prefix: str
) -> dict[str, Any]:
    """Stream ``items`` through the running cascade as one burst.

    Returns the CPU seconds of each process, the wall seconds of the measured window, the
    gate's routes of the clean and the degraded images, and how many images reached the
    branch tiers.
    """
    gate = cascade.topology.gate_tiers[0].name
    branches = [t.name for t in cascade.topology.branch_tiers]
    before = cpu_seconds(pids)
    start = time.perf_counter()
    ids = cascade.submit([item.path for item in items], prefix=prefix)
    done = cascade.wait_until_done(ids, timeout_s=1800)
    wall = time.perf_counter() - start
    after = cpu_seconds(pids)
    missing = set(ids) - set(done)
    if missing:
        raise SystemExit(f"{len(missing)} of {len(ids)} images had no output within 30 min")
    outputs = {o["image_id"]: o for o in cascade.outputs() if o["image_id"] in done}
    routes: dict[str, Counter[str]] = {"clean": Counter(), "degraded": Counter()}
    by_kind: dict[str, Counter[str]] = {}
    reached = 0
    for image_id, item in zip(ids, items, strict=True):
        seen = outputs[image_id]["routes"]
        decided = seen.get(gate, "none")
        routes["degraded" if item.degradation else "clean"][decided] += 1
        if item.degradation:
            by_kind.setdefault(item.degradation, Counter())[decided] += 1
        reached += any(b in seen for b in branches)
    cpu = {k: round(after[k] - before[k], 2) for k in after if k in before}
    return {
        "cpu_s": cpu,
        "tiers_2_3_cpu_s": round(sum(cpu.get(p, 0.0) for p in BRANCH_PROCESSES), 2),
        "wall_s": round(wall, 1),
        "images": len(ids),
        "reached_tiers_2_3": reached,
        "gate": {k: dict(sorted(v.items())) for k, v in routes.items() if v},
        "gate_by_degradation": {k: dict(sorted(v.items())) for k, v in sorted(by_kind.items())},
    }


def _median_counts(runs: Sequence[Mapping[str, Mapping[str, int]]]) -> dict[str, Any]:
    """Per group and route, the median count over ``runs``."""
    groups = sorted({g for r in runs for g in r})
    return {
        g: {
            route: statistics.median(r.get(g, {}).get(route, 0) for r in runs)
            for route in sorted({x for r in runs for x in r.get(g, {})})
        }
        for g in groups
    }


def summarise(runs: Mapping[str, list[dict[str, Any]]], fraction: float) -> dict[str, Any]:
    """Medians per run kind, the fall of tiers 2 and 3, the goal and the expected fall."""
    cpu: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        names = sorted({n for r in runs[kind] for n in r["cpu_s"]})
        cpu[kind] = {
            n: round(statistics.median(r["cpu_s"].get(n, 0.0) for r in runs[kind]), 2)
            for n in names
        }
        cpu[kind]["tiers_2_3"] = round(
            statistics.median(r["tiers_2_3_cpu_s"] for r in runs[kind]), 2
        )
    reached = {k: statistics.median(r["reached_tiers_2_3"] for r in runs[k]) for k in KINDS}
    images = runs["clean"][0]["images"]
    fall = 1 - cpu["unusable"]["tiers_2_3"] / cpu["clean"]["tiers_2_3"]
    goal = 0.9 * fraction
    return {
        "cpu_s": cpu,
        "fall": round(fall, 3),
        "goal": round(goal, 3),
        "met": fall >= goal,
        "fall_per_repetition": [
            round(1 - b["tiers_2_3_cpu_s"] / a["tiers_2_3_cpu_s"], 3)
            for a, b in zip(runs["clean"], runs["unusable"], strict=True)
        ],
        "reached_tiers_2_3": reached,
        "expected_fall": round(1 - reached["unusable"] / reached["clean"], 3),
        "unreached_gain": round((reached["clean"] - reached["unusable"]) / images, 3),
        "gate": {k: _median_counts([r["gate"] for r in runs[k]]) for k in KINDS},
        "gate_by_degradation": _median_counts([r["gate_by_degradation"] for r in runs["unusable"]]),
        "wall_s": {k: statistics.median(r["wall_s"] for r in runs[k]) for k in KINDS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--unusable", type=float, default=0.3, help="fraction degraded in B")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--kinds",
        default=",".join(degrade.SEVERE),
        help="degradations taken in turn, '<kind>:<level>' (default: every severe kind)",
    )
    parser.add_argument("--idle-s", type=float, default=10.0, help="idle-rate window")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    specs = [s.strip() for s in args.kinds.split(",") if s.strip()]
    for spec in specs:
        degrade.parse_spec(spec)
    if not 0.0 < args.unusable < 1.0:
        raise SystemExit("--unusable must be in (0, 1)")
    command = "python benchmarks/unusable.py " + shlex.join(sys.argv[1:])
    settings = get_settings()
    up(settings)
    ensure_bootstrap(settings)
    topology = load_topology(settings.topology)
    datasets = settings.datasets.resolve()
    paths = sorted((datasets / "dsb2018" / "images").glob("*.png"))[: args.images]
    if len(paths) < args.images:
        raise SystemExit(f"only {len(paths)} DSB images under {datasets}, not {args.images}")
    count = round(args.unusable * len(paths))
    degraded_at = spread_positions(len(paths), count)
    cores = os.cpu_count() or 1
    parallelism = {
        "cores": cores,
        "pipeline_workers": {
            t.name: {"replicas": t.replicas, "torch_threads": t.threads or cores}
            for t in topology.tiers
        },
    }

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        cascade = Cascade(settings, Path(tmp), topology=topology)
        clean = [Item(p) for p in paths]
        unusable = list(clean)
        for n, i in enumerate(degraded_at):
            spec = specs[n % len(specs)]
            copy = write_degraded(paths[i], spec, cascade.roots, settings.max_image_pixels)
            unusable[i] = Item(copy, spec)
        streams = {"clean": clean, "unusable": unusable}
        cascade.start()
        try:
            pids = {n: p.pid for n, p in cascade.procs.items()}
            batch = topology.tiers[0].batch_size
            # warm-up: model loading and first-call allocations, on both kinds of image
            warm = cascade.submit([i.path for i in unusable[: 2 * batch]], prefix="warm-")
            cascade.wait_until_done(warm, timeout_s=600)
            idle_before = cpu_seconds(pids)
            time.sleep(args.idle_s)
            idle_after = cpu_seconds(pids)
            idle = {
                k: round((idle_after[k] - idle_before[k]) / args.idle_s, 4)
                for k in idle_after
                if k in idle_before
            }
            for rep in range(args.repeats):
                for kind in KINDS:
                    run = run_stream(cascade, pids, streams[kind], f"{kind}{rep}-")
                    runs[kind].append(run)
                    print(
                        f"repetition {rep + 1} {kind}: tiers 2+3 {run['tiers_2_3_cpu_s']} "
                        f"CPU s, reached {run['reached_tiers_2_3']}/{run['images']}, "
                        f"gate {run['gate']}",
                        flush=True,
                    )
        finally:
            cascade.stop()
    result: dict[str, Any] = {
        "images": len(paths),
        "unusable_fraction": round(count / len(paths), 4),
        "unusable_requested": args.unusable,
        "degraded_images": count,
        "degradations": specs,
        "repeats": args.repeats,
        **summarise(runs, count / len(paths)),
        "idle_cpu_s_per_s": idle
        | {"tiers_2_3": round(sum(idle.get(p, 0.0) for p in BRANCH_PROCESSES), 4)},
        "repetitions": runs,
        "parallelism": parallelism,
    } | provenance(command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "repetitions"}, indent=2))


if __name__ == "__main__":
    main()
