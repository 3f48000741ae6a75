"""Throughput of the same trained models on the same images, in-process vs pipeline.

The pipeline is the whole Kafka cascade (every tier worker and the joiner as processes);
the in-process side runs decode, gate and branches in this one process. Both run in one
invocation, on the same cores, in alternating repetitions (in-process, pipeline, ...):
each repetition streams the same ``--images`` images.

Parallelism is the same on both sides: every core. The in-process side computes with
torch's intra-op threads on every core; the pipeline's workers share the same cores
(each tier at its topology ``threads``, torch's default of every core when unset).
``parallelism`` records both.

Usage::

    .venv/bin/python benchmarks/throughput.py [--images 300] [--repeats 3]

Writes ``benchmarks/results/throughput.json``:

- ``in_process_img_s`` and ``pipeline_img_s``: the medians over the repetitions, and
  ``repetitions.{in_process,pipeline}`` every one, with ``spread.{side}.{min,median,max}``;
  ``ratio``: pipeline median over in-process median;
- ``p50_ms``, ``p95_ms``, ``p99_ms``: submit-to-output latency of every pipeline image of
  every repetition (each repetition is one burst of ``--images`` images);
- ``routes``: whether both sides made the same routing decision per tier and image
  (``agree``, ``compared``, and the first disagreements);
- ``images``, ``peak_rss_mb`` and ``peak_pss_mb`` per process (workers, joiner, Kafka
  and Cassandra), ``stack_peak_rss_mb`` and ``stack_peak_pss_mb`` (the largest sums at one
  instant; PSS counts a shared library page once, RSS once per process; PSS is sampled
  every 2 s, RSS every 0.25 s), ``cpu_s`` (CPU seconds of each side per repetition), and
  the command, commit and host.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from harness import Cascade

import models as bench
from phenocascade.config import TierSpec, get_settings, load_topology
from phenocascade.domain import DecodedImage, Route, exclusive_groups, route
from phenocascade.imaging import read_image
from phenocascade.infra.local import status, up
from phenocascade.models.base import load_stage
from phenocascade.recipes import ensure_bootstrap
from phenocascade.streams.events import to_epoch_ms

RESULTS = Path(__file__).parent / "results"


Routes = dict[str, dict[str, str]]
"""Per image stem, the route of each tier that saw it."""


def in_process(paths: list[Path], batch: int) -> tuple[float, Routes]:
    """Run decode + gate + every branch in this process, batch by batch.

    Returns img/s and each image's routes, decided as the workers decide them.
    """
    settings = get_settings()
    topology = load_topology(settings.topology)
    gate_tier = topology.gate_tiers[0]
    tiers = [gate_tier, *topology.branch_tiers]
    stages = {t.name: load_stage(settings.artifacts, t.artifact) for t in tiers}
    routes: Routes = {}

    def decide(tier: TierSpec, images: list[DecodedImage]) -> list[Route]:
        stage = stages[tier.name]
        groups = exclusive_groups(stage.classes, tier.groups)
        decided = [
            route(stage.kind, out, stage.thresholds, stage.gate_label, groups)
            for out in stage.predict(images)
        ]
        for img, r in zip(images, decided, strict=True):
            routes.setdefault(img.image_id, {})[tier.name] = r.value
        return decided

    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = [
            DecodedImage(
                p.stem, read_image(p, roots=settings.roots(), max_pixels=settings.max_image_pixels)
            )
            for p in paths[i : i + batch]
        ]
        gate = decide(gate_tier, images)
        usable = [img for img, r in zip(images, gate, strict=True) if r is Route.PASS]
        for tier in topology.branch_tiers:
            if usable:
                decide(tier, usable)
    return len(paths) / (time.perf_counter() - start), routes


class MemorySampler(threading.Thread):
    """Sample the memory of named processes (and their children) while the benchmark runs.

    Two measures: the resident set (RSS), which counts a shared page in every process
    that maps it, every 0.25 s; and the proportional set (PSS), which splits it among
    them, every 2 s: the kernel walks a process's page tables for it (about 9 ms for a
    torch worker here), and at 0.25 s the sampler would take a quarter of a core from the
    two it measures. The stack's totals are the largest sums at one instant; the sum of
    PSS is what the machine holds (torch's libraries, mapped by every worker, once).
    """

    TICK_S = 0.25
    PSS_EVERY = 8  # ticks: 2 s

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.peak_pss: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.stack = {"rss": 0.0, "pss": 0.0}
        self.stop = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        tick = 0
        while not self.stop.wait(self.TICK_S):
            measures = ("rss", "pss") if tick % self.PSS_EVERY == 0 else ("rss",)
            tick += 1
            now = dict.fromkeys(measures, 0.0)
            for name, pid in self.pids.items():
                try:
                    proc = psutil.Process(pid)
                    procs = (proc, *proc.children(recursive=True))
                    rss = sum(p.memory_info().rss for p in procs) / 2**20
                    pss = (
                        sum(p.memory_full_info().pss for p in procs) / 2**20
                        if "pss" in measures
                        else 0.0
                    )
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], rss)
                self.peak_pss[name] = max(self.peak_pss[name], pss)
                now["rss"] += rss
                if "pss" in measures:
                    now["pss"] += pss
            self.stack = {k: max(v, now.get(k, 0.0)) for k, v in self.stack.items()}


def cpu_seconds(pids: Mapping[str, int]) -> dict[str, float]:
    """Return the CPU seconds (user + system, children included) each process has used."""
    used: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
            used[name] = sum(sum(p.cpu_times()[:2]) for p in procs)
        except psutil.Error:
            continue
    return used


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


def _compare(ours: Routes, theirs: Routes) -> dict[str, Any]:
    """Count the images whose routes (per tier) agree between the two sides."""
    wrong = [
        {"image": image, "in_process": ours.get(image), "pipeline": theirs.get(image)}
        for image in sorted(set(ours) | set(theirs))
        if ours.get(image) != theirs.get(image)
    ]
    compared = len(set(ours) | set(theirs))
    return {"compared": compared, "agree": compared - len(wrong), "differ": wrong[:10]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    settings = get_settings()
    up(settings)
    ensure_bootstrap(settings)
    topology = load_topology(settings.topology)
    batch = topology.tiers[0].batch_size
    datasets = settings.datasets.resolve()
    paths = sorted((datasets / "dsb2018" / "images").glob("*.png"))[: args.images]
    if len(paths) < args.images:
        raise SystemExit(f"only {len(paths)} DSB images under {datasets}, not {args.images}")
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    parallelism = {
        "cores": cores,
        "in_process_torch_threads": torch.get_num_threads(),
        "pipeline_workers": {
            t.name: {"replicas": t.replicas, "torch_threads": t.threads or cores}
            for t in topology.tiers
        },
    }

    in_process(paths[:batch], batch)  # warm-up: first-call allocations
    this = psutil.Process()
    runs: dict[str, list[float]] = {"in_process": [], "pipeline": []}
    cpu: dict[str, list[Any]] = {"in_process": [], "pipeline": []}
    latencies: list[float] = []
    agreement: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cascade = Cascade(settings, Path(tmp))
        cascade.start()
        infra_pids = {name: s.pid for name, s in status(settings).items() if s.pid}
        sampler = MemorySampler({**{n: p.pid for n, p in cascade.procs.items()}, **infra_pids})
        sampler.start()
        try:
            # warm-up batch so that model loading is not counted
            warm = cascade.submit(paths[:batch], prefix="warm-")
            cascade.wait_until_done(warm, timeout_s=600)
            for rep in range(args.repeats):
                cpu_start = sum(this.cpu_times()[:2])
                rate, ours = in_process(paths, batch)
                runs["in_process"].append(rate)
                cpu["in_process"].append(round(sum(this.cpu_times()[:2]) - cpu_start, 1))
                rate, lat, theirs, used = _pipeline(cascade, sampler.pids, paths, f"bench{rep}-")
                runs["pipeline"].append(rate)
                cpu["pipeline"].append(used)
                latencies += lat
                agreement.append(_compare(ours, theirs))
                print(
                    f"repetition {rep + 1}: in-process {runs['in_process'][-1]:.2f} img/s, "
                    f"pipeline {rate:.2f} img/s",
                    flush=True,
                )
        finally:
            sampler.stop.set()
            cascade.stop()
    medians = {side: statistics.median(values) for side, values in runs.items()}
    result = {
        "in_process_img_s": round(medians["in_process"], 2),
        "pipeline_img_s": round(medians["pipeline"], 2),
        "ratio": round(medians["pipeline"] / medians["in_process"], 3),
        "repetitions": {side: [round(v, 2) for v in values] for side, values in runs.items()},
        "spread": {side: _spread(values) for side, values in runs.items()},
        "p50_ms": float(np.percentile(latencies, 50)),
        "p95_ms": float(np.percentile(latencies, 95)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "images": len(paths),
        "repeats": args.repeats,
        "parallelism": parallelism,
        "routes": {
            "compared": sum(a["compared"] for a in agreement),
            "agree": sum(a["agree"] for a in agreement),
            "differ": [d for a in agreement for d in a["differ"]][:10],
        },
        "peak_rss_mb": {k: round(v, 1) for k, v in sampler.peak.items()},
        "peak_pss_mb": {k: round(v, 1) for k, v in sampler.peak_pss.items()},
        "stack_peak_rss_mb": round(sampler.stack["rss"], 1),
        "stack_peak_pss_mb": round(sampler.stack["pss"], 1),
        # CPU seconds per repetition: the pipeline's from its first submission until the
        # harness saw the last output, so each includes up to one 2 s poll of idle time.
        "cpu_s": cpu,
    } | bench.provenance("python benchmarks/throughput.py " + shlex.join(sys.argv[1:]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def _pipeline(
    cascade: Cascade, pids: dict[str, int], paths: list[Path], prefix: str
) -> tuple[float, list[float], Routes, dict[str, float]]:
    """Stream ``paths`` through the running cascade as one burst.

    Returns img/s (first submission to last output, by the records' own clocks: the
    harness polls the results topic every 2 s, which would otherwise add up to 2 s), the
    latencies in ms, each image's routes, and the CPU seconds of each process.
    """
    cpu_before = cpu_seconds(pids)
    ids = cascade.submit(paths, prefix=prefix)
    cascade.wait_until_done(ids, timeout_s=1800)
    cpu_after = cpu_seconds(pids)
    wanted = set(ids)
    outputs = {o["image_id"]: o for o in cascade.outputs() if o["image_id"] in wanted}
    submitted = {
        r["image_id"]: to_epoch_ms(r["submitted_at"])
        for r in cascade.read(cascade.topology.submitted_topic, "ImageSubmitted")
        if r["image_id"] in wanted
    }
    produced = {i: to_epoch_ms(o["produced_at"]) for i, o in outputs.items()}
    span_s = (max(produced.values()) - min(submitted.values())) / 1000
    stems = {i: p.stem for i, p in zip(ids, paths, strict=True)}
    routes = {stems[i]: dict(o["routes"]) for i, o in outputs.items()}
    used = {k: round(cpu_after[k] - cpu_before[k], 1) for k in cpu_after if k in cpu_before}
    return len(outputs) / span_s, [produced[i] - submitted[i] for i in outputs], routes, used


if __name__ == "__main__":
    main()
