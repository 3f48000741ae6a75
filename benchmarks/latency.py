"""End-to-end latency of the Kafka cascade under a fixed offered load.

One invocation starts the whole cascade (three tier workers and the joiner, as processes,
on the running local Kafka and Cassandra), then:

1. **Capacity:** a burst of ``--capacity-images`` DSB 2018 images; the capacity is the
   images over the span from the first submission to the last output, by the records'
   own clocks (as ``benchmarks/throughput.py`` measures the pipeline).
2. **Fixed loads:** for each fraction of that capacity (``--loads``, default 0.5 and 0.8),
   one image is submitted every ``1 / (fraction x capacity)`` seconds for ``--seconds``
   (default 120), on a fixed schedule (a late submission does not shift the later ones),
   from the DSB images in turn, each under a new id. Every image's latency is its
   output's ``produced_at`` minus its submission's ``submitted_at``. The offered rate is
   what was achieved: the images over the span of their submissions. Per tier, the same
   figures for its results (its ``TierResult``'s ``produced_at`` minus the submission's
   ``submitted_at``: the image's wait and work up to and through that tier), and for the
   joiner (the output's ``produced_at`` minus the image's last tier result's).

Usage::

    .venv/bin/python benchmarks/latency.py [--seconds 120] [--loads 0.5,0.8] [--runtime bf16|onnx]

Writes ``benchmarks/results/latency.json``: ``capacity_img_s``, and per load ``offered_img_s``,
``p50_ms``, ``p95_ms``, ``p99_ms``, ``max_ms``, ``images``, and ``tiers`` (per tier and
``joiner``: ``p50_ms``, ``p95_ms``, ``p99_ms``); with the command, commit and host.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from harness import Cascade

import models as bench
from phenocascade.cli.cascade import image_id_for
from phenocascade.config import get_settings, load_topology
from phenocascade.domain import ImageMeta
from phenocascade.errors import ConfigError
from phenocascade.infra.local import up
from phenocascade.recipes import check_runtime, ensure_bootstrap
from phenocascade.streams import events
from phenocascade.streams.events import to_epoch_ms
from phenocascade.streams.kafka import plain_producer
from phenocascade.streams.serde import EventCodec

RESULTS = Path(__file__).parent / "results"


def paced_submit(
    cascade: Cascade, paths: Sequence[Path], rate: float, seconds: float, tag: str
) -> list[str]:
    """Submit ``paths`` in turn at ``rate`` per second for ``seconds``; return the ids."""
    producer = plain_producer(cascade.settings.kafka)
    codec = EventCodec()
    meta = ImageMeta(study=cascade.prefix + "latency")
    ids: list[str] = []
    start = time.perf_counter()
    for k in range(int(rate * seconds)):
        delay = start + k / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        path = paths[k % len(paths)]
        image_id = image_id_for(path, f"{cascade.prefix}{tag}-{k}-")
        record = events.image_submitted(
            image_id, uri=str(path), fmt=events.format_of(path.name), meta=meta
        )
        producer.produce(
            cascade.topology.submitted_topic,
            key=image_id.encode(),
            value=codec.encode("ImageSubmitted", record),
        )
        producer.poll(0)
        ids.append(image_id)
    producer.flush(60)
    return ids


def latencies(cascade: Cascade, ids: Sequence[str]) -> tuple[np.ndarray, float, float]:
    """Return each image's submit-to-output ms, the submissions' span and the outputs' span (s)."""
    wanted = set(ids)
    produced = {
        o["image_id"]: to_epoch_ms(o["produced_at"])
        for o in cascade.outputs()
        if o["image_id"] in wanted
    }
    submitted = {
        r["image_id"]: to_epoch_ms(r["submitted_at"])
        for r in cascade.read(cascade.topology.submitted_topic, "ImageSubmitted")
        if r["image_id"] in wanted
    }
    ms = np.array([produced[i] - submitted[i] for i in ids if i in produced], dtype=float)
    submit_span = (max(submitted.values()) - min(submitted.values())) / 1000
    total_span = (max(produced.values()) - min(submitted.values())) / 1000
    return ms, submit_span, total_span


def _quantiles(ms: Sequence[float]) -> dict[str, float]:
    return {
        f"p{q}_ms": round(float(np.percentile(np.asarray(ms, dtype=float), q)), 1)
        for q in (50, 95, 99)
    }


def per_tier(cascade: Cascade, ids: Sequence[str]) -> dict[str, dict[str, float]]:
    """Return, per tier and for the joiner, the quantiles of its share of the latency."""
    wanted = set(ids)
    submitted = {
        r["image_id"]: to_epoch_ms(r["submitted_at"])
        for r in cascade.read(cascade.topology.submitted_topic, "ImageSubmitted")
        if r["image_id"] in wanted
    }
    last: dict[str, int] = {}
    found: dict[str, dict[str, float]] = {}
    for tier in cascade.topology.tiers:
        done = {
            r["image_id"]: to_epoch_ms(r["produced_at"])
            for r in cascade.read(tier.result_topic, "TierResult")
            if r["image_id"] in submitted
        }
        for image_id, at in done.items():
            last[image_id] = max(at, last.get(image_id, at))
        if done:
            found[tier.name] = _quantiles([at - submitted[i] for i, at in done.items()])
    joined = [
        to_epoch_ms(o["produced_at"]) - last[o["image_id"]]
        for o in cascade.outputs()
        if o["image_id"] in last and not o["annotators"]
    ]
    if joined:
        found["joiner"] = _quantiles(joined)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--capacity-images", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--loads", default="0.5,0.8", help="fractions of capacity")
    parser.add_argument("--out", type=Path, default=RESULTS / "latency.json")
    parser.add_argument(
        "--runtime",
        choices=("eager", "bf16", "onnx"),
        default="eager",
        help="every tier's runtime: it is first checked against eager on each tier's test "
        "split (phenocascade check-runtime), and a tier it fails, or does not apply to "
        "(onnx: the tiers that segment nuclei), runs eager",
    )
    args = parser.parse_args()
    command = "python benchmarks/latency.py " + shlex.join(sys.argv[1:])
    settings = get_settings()
    up(settings)
    ensure_bootstrap(settings)
    datasets = settings.datasets.resolve()
    paths = sorted((datasets / "dsb2018" / "images").glob("*.png"))
    result: dict[str, Any] = {"loads": {}, "runtime": args.runtime}
    topology = load_topology()
    if args.runtime != "eager":
        result["runtime_checks"] = {}
        checked = set()
        for tier in topology.tiers:
            try:
                _, check = check_runtime(tier.name, args.runtime, settings=settings)
            except ConfigError as exc:
                result["runtime_checks"][tier.name] = {"applies": False, "why": str(exc)}
                print(f"{tier.name}: eager ({exc})", flush=True)
                continue
            checked.add(tier.name)
            result["runtime_checks"][tier.name] = {
                "metric": check.metric,
                "eager": check.eager,
                "value": check.value,
                "accepted": check.accepted,
            }
            print(f"{tier.name}: {check.describe()}", flush=True)
        topology = topology.model_copy(
            update={
                "tiers": [
                    t.model_copy(update={"runtime": args.runtime}) if t.name in checked else t
                    for t in topology.tiers
                ]
            }
        )
    with tempfile.TemporaryDirectory() as tmp:
        cascade = Cascade(settings, Path(tmp), topology=topology)
        cascade.start()
        try:
            warm = cascade.submit(paths[:16], prefix="warm-")
            cascade.wait_until_done(warm, timeout_s=600)
            burst = cascade.submit(paths[: args.capacity_images], prefix="burst-")
            counts = cascade.wait_until_done(burst, timeout_s=1800)
            _, _, span = latencies(cascade, burst)
            capacity = len(counts) / span
            result["capacity_img_s"] = round(capacity, 2)
            for fraction in (float(f) for f in args.loads.split(",")):
                ids = paced_submit(
                    cascade, paths, fraction * capacity, args.seconds, f"load{fraction}"
                )
                done = cascade.wait_until_done(ids, timeout_s=args.seconds * 10 + 600)
                ms, submit_span, _ = latencies(cascade, ids)
                result["loads"][str(fraction)] = {
                    "offered_img_s": round(len(ids) / submit_span, 2),
                    "target_img_s": round(fraction * capacity, 2),
                    "images": len(ids),
                    "outputs": len(done),
                    "p50_ms": round(float(np.percentile(ms, 50)), 1),
                    "p95_ms": round(float(np.percentile(ms, 95)), 1),
                    "p99_ms": round(float(np.percentile(ms, 99)), 1),
                    "max_ms": round(float(ms.max()), 1),
                    "tiers": per_tier(cascade, ids),
                }
                print(json.dumps({fraction: result["loads"][str(fraction)]}), flush=True)
        finally:
            cascade.stop()
    result |= bench.provenance(command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
