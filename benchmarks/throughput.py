"""Throughput of the same trained models on the same images, in-process vs pipeline.

The pipeline is the whole Kafka cascade (three tier workers + joiner as processes); both
run in one invocation, side by side.

Usage::

    .venv/bin/python benchmarks/throughput.py [--images 120]

Writes ``benchmarks/results/throughput.json`` with ``in_process_img_s``, ``pipeline_img_s``,
``ratio``, ``p50_ms``, ``p99_ms`` (submit-to-output latency in the pipeline), ``images``,
``peak_rss_mb`` per process, ``cpu_s`` (CPU seconds of the in-process run and of each
pipeline process over the measured images), and the command, commit and host.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from harness import Cascade

import models as bench
from phenocascade.config import get_settings, load_topology
from phenocascade.domain import DecodedImage, Route, route
from phenocascade.imaging import read_image
from phenocascade.infra.local import status, up
from phenocascade.models.base import load_stage
from phenocascade.recipes import ensure_bootstrap
from phenocascade.streams.events import to_epoch_ms

RESULTS = Path(__file__).parent / "results"


def in_process(paths: list[Path], batch: int) -> float:
    """Run decode + gate + both branches in this process, batch by batch; return img/s."""
    settings = get_settings()
    topology = load_topology(settings.topology)
    stages = {t.name: load_stage(settings.artifacts, t.artifact) for t in topology.tiers}
    gate = stages[topology.gate_tiers[0].name]
    branches = [stages[t.name] for t in topology.branch_tiers]
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        images = [
            DecodedImage(
                p.stem, read_image(p, roots=settings.roots(), max_pixels=settings.max_image_pixels)
            )
            for p in paths[i : i + batch]
        ]
        usable = [
            img
            for img, out in zip(images, gate.predict(images), strict=True)
            if route(gate.kind, out, gate.thresholds, gate.gate_label) is Route.PASS
        ]
        for stage in branches:
            if usable:
                stage.predict(usable)
    return len(paths) / (time.perf_counter() - start)


class RssSampler(threading.Thread):
    """Sample the resident memory of named processes (and their children) every 0.25 s."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak: dict[str, float] = dict.fromkeys(pids, 0.0)
        self.stop = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stop.wait(0.25):
            for name, pid in self.pids.items():
                try:
                    proc = psutil.Process(pid)
                    rss = proc.memory_info().rss + sum(
                        c.memory_info().rss for c in proc.children(recursive=True)
                    )
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], rss / 2**20)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=120)
    args = parser.parse_args()
    settings = get_settings()
    up(settings)
    ensure_bootstrap(settings)
    topology = load_topology(settings.topology)
    batch = topology.tiers[0].batch_size
    datasets = settings.datasets.resolve()
    paths = sorted((datasets / "dsb2018" / "images").glob("*.png"))[: args.images]

    in_process(paths[:batch], batch)  # warm-up: first-call allocations
    this = psutil.Process()
    cpu_start = sum(this.cpu_times()[:2])
    in_proc = in_process(paths, batch)
    in_proc_cpu = sum(this.cpu_times()[:2]) - cpu_start

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cascade = Cascade(settings, Path(tmp))
        cascade.start()
        infra_pids = {name: s.pid for name, s in status(settings).items() if s.pid}
        sampler = RssSampler({**{n: p.pid for n, p in cascade.procs.items()}, **infra_pids})
        sampler.start()
        try:
            # warm-up batch so that model loading is not counted
            warm = cascade.submit(paths[:batch], prefix="warm-")
            cascade.wait_until_done(warm, timeout_s=600)
            cpu_before = cpu_seconds(sampler.pids)
            start = time.perf_counter()
            ids = cascade.submit(paths, prefix="bench-")
            cascade.wait_until_done(ids, timeout_s=1800)
            elapsed = time.perf_counter() - start
            cpu_after = cpu_seconds(sampler.pids)
            outputs = {o["image_id"]: o for o in cascade.outputs() if o["image_id"] in set(ids)}
            submitted = {
                r["image_id"]: to_epoch_ms(r["submitted_at"])
                for r in cascade.read(cascade.topology.submitted_topic, "ImageSubmitted")
                if r["image_id"] in set(ids)
            }
        finally:
            sampler.stop.set()
            cascade.stop()
    produced = {i: to_epoch_ms(o["produced_at"]) for i, o in outputs.items()}
    latencies = np.array([produced[i] - submitted[i] for i in outputs])
    # From the first submission to the last output, by the records' own clocks: the test
    # harness polls the results topic every 2 s, which would otherwise add up to 2 s.
    span_s = (max(produced.values()) - min(submitted.values())) / 1000
    pipeline = len(outputs) / span_s
    result = {
        "in_process_img_s": round(in_proc, 2),
        "pipeline_img_s": round(pipeline, 2),
        "ratio": round(pipeline / in_proc, 3),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "images": len(outputs),
        "pipeline_wall_s": round(elapsed, 1),
        "peak_rss_mb": {k: round(v, 1) for k, v in sampler.peak.items()},
        "stack_peak_rss_mb": round(sum(sampler.peak.values()), 1),
        # CPU seconds spent on the measured images (the pipeline's from its first
        # submission until the harness saw the last output, so it includes up to one 2 s
        # poll of idle time).
        "cpu_s": {
            "in_process": round(in_proc_cpu, 1),
            "pipeline": {
                k: round(cpu_after[k] - cpu_before[k], 1) for k in cpu_after if k in cpu_before
            },
        },
    } | bench.provenance("python benchmarks/throughput.py " + shlex.join(sys.argv[1:]))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
