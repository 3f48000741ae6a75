"""Decode once: what tiers 2 and 3 pay to get pixels, per alternative (issue 13).

The quality gate decodes each submitted image, then forwards the submission itself to
``images.usable``, where every branch tier (majority and minority: the branch tiers of
the topology that read the gate's ``pass`` topic, their number being the *fan-out*)
decodes the same file again. This benchmark measures, side by side in one run and per
image, what each way of handing the pixels to the branch tiers costs:

- ``decode_uri``: today's path for a submission by URI, the worker's own call
  (:func:`phenocascade.imaging.read_image`: root check, size check, read, decode);
  ``decode_inline``: today's path for inline bytes already in memory
  (:func:`phenocascade.imaging.decode_bytes`);
- ``raw``: the decoded array as the payload (a 13-byte header of height, width,
  channels and bytes per sample, then ``ndarray.tobytes``): ``raw_serialise``, and
  ``raw_deserialise`` (``numpy.frombuffer`` and ``reshape``, no copy);
- one per codec of ``--codecs``, lossless, on the raw payload: ``zlib1`` (the standard
  library's zlib at level 1), ``lz4`` (LZ4 frames) and ``zstd1`` (Zstandard at level 1),
  both from ``imagecodecs``, a dependency of the package: ``<codec>_compress`` and
  ``<codec>_decompress``;
- ``cache``: a shared cache on the host, keyed by content: ``sha256`` (of the encoded
  bytes, in memory), ``cache_write`` (``numpy.save`` to a temporary name, then an atomic
  rename to ``<digest>.npy``, so that a reader never sees half a file) and
  ``cache_read`` (``numpy.load`` of the whole array: a stage reads every pixel, so a
  memory map would only defer the same reads). The file was just written, so it is read
  from the page cache, as a tier reading it moments after the gate would.

Each operation runs ``--repeats`` times per image and counts its median. Every
alternative is checked to give back the decoded array exactly.

Each payload kind also crosses the real local Kafka broker (started or reused by
:func:`phenocascade.infra.local.up`), as it would on ``images.usable``: the images'
payloads are produced once by :func:`phenocascade.streams.kafka.plain_producer` (until
flushed), then read by as many consumers as the fan-out, each a consumer of its own
group (:func:`phenocascade.streams.kafka.group_consumer`, assigned the partitions from
where the produce began). The topic is a throwaway copy of ``images.usable`` (same
partitions and message limit) under a namespace made for the run, deleted at the end.
The payload kinds are ``uri`` (the file URI: what is forwarded today for a submission by
URI), ``inline`` (the encoded bytes: forwarded today for an inline submission),
``cache`` (the URI and the 32-byte digest), ``raw`` and each codec. A round's cost per
image is the produce time plus every consumer's time, over the images; there are
``--repeats`` rounds per kind, the kinds in turn, and the median round counts.

For scale, each branch tier's model: its champion from ``settings.artifacts``
(:func:`phenocascade.models.base.load_stage`, on the tier's device with the tier's
``threads`` from the topology, as its worker runs it), one warm-up call, then
``stage.predict([image])`` once per image.

Images: ``--images`` DSB 2018 fields (PNG, 256 px to 1388 px), taken in turn from each
field size, largest first, so that every size is represented; and ``--bccd`` BCCD
JPEGs (640 x 480 RGB), the first in name order.

Usage::

    PHENOCASCADE_DATASETS=/work/shared/datasets .venv/bin/python benchmarks/decode.py \
        [--images 60] [--bccd 0] [--repeats 5] [--codecs zlib1 lz4 zstd1] \
        [--out benchmarks/results/decode.json]

Writes ``--out``: the command, commit, host, cores and torch threads; ``images`` (counts
per dataset and per size); ``summary`` per dataset and for ``all`` images: per operation
``median_ms`` and ``total_ms`` (the sum of the per-image medians), and per payload kind
``median_bytes`` and ``total_bytes``; ``kafka`` per payload kind: messages, bytes,
``ms_per_image`` (the median round's), and every round's produce and consume seconds;
``models`` per branch tier: threads, median and total ms, and ``decode_share``
(``decode_uri`` over ``decode_uri`` plus the model, totals);
``per_image``; and last ``choice``, computed from the figures: per alternative the
per-image mean cost for the branch tiers together, ``gate_ms`` (what the gate does once
more) + ``kafka_ms`` (the payload in once, out fan-out times) + fan-out x ``tier_ms``
(what each branch tier does to get the pixels), with the bytes each image moves through
the broker; then, for submissions by URI and for inline ones, today's cost, the cheapest
alternative (today's included) and the saving per image.

What the costs leave out: the alternatives' message replaces a submission's inline
bytes; a cache serves only tiers on the gate's host (elsewhere a tier decodes again),
and its eviction and disk are not counted; a gate that decodes from a URI would read
the file once more to hash it (``sha256`` hashes bytes in memory); larger payloads cost
the broker disk for the topic's retention, shown only as ``broker_bytes``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import statistics
import struct
import sys
import tempfile
import time
import uuid
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import imagecodecs
import numpy as np
import torch
from confluent_kafka import KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from PIL import Image

from phenocascade.config import KafkaSettings, Settings, TierSpec, get_settings, load_topology
from phenocascade.domain import DecodedImage
from phenocascade.imaging import Pixels, decode_bytes, read_image
from phenocascade.infra.local import up
from phenocascade.models.base import load_stage, set_compute_threads
from phenocascade.streams.kafka import (
    consumer_error,
    create_topics,
    group_consumer,
    partition_end,
    plain_producer,
)
from provenance import provenance

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")
Codec = tuple[Callable[[bytes], bytes | bytearray], Callable[[bytes], bytes | bytearray]]
CODECS: dict[str, Codec] = {
    "zlib1": (functools.partial(zlib.compress, level=1), zlib.decompress),
    "lz4": (imagecodecs.lz4f_encode, imagecodecs.lz4f_decode),
    "zstd1": (functools.partial(imagecodecs.zstd_encode, level=1), imagecodecs.zstd_decode),
}
# Height, width, channels (uint32 each), then bytes per sample (1: uint8, 2: uint16).
HEADER = struct.Struct("<IIIB")
SAMPLE_DTYPES = {1: "u1", 2: "<u2"}
# Seconds the produce, or one consumer's read, of one run's payloads may take.
KAFKA_TIMEOUT_S = 120.0


def to_payload(pixels: Pixels) -> bytes:
    """Return ``pixels`` (``(H, W, C)``, uint8 or uint16) as a header and its raw samples."""
    height, width, channels = pixels.shape
    return (
        HEADER.pack(height, width, channels, pixels.dtype.itemsize)
        + pixels.astype(SAMPLE_DTYPES[pixels.dtype.itemsize], copy=False).tobytes()
    )


def from_payload(payload: bytes | bytearray) -> Pixels:
    """Return the read-only ``(H, W, C)`` array of a :func:`to_payload` payload, uncopied."""
    height, width, channels, itemsize = HEADER.unpack_from(payload)
    flat = np.frombuffer(payload, dtype=SAMPLE_DTYPES[itemsize], offset=HEADER.size)
    pixels: Pixels = flat.reshape(height, width, channels)
    return pixels


def cache_write(folder: Path, digest: str, pixels: Pixels) -> Path:
    """Save ``pixels`` as ``<digest>.npy`` under ``folder``, atomically."""
    final = folder / f"{digest}.npy"
    partial = folder / f"{digest}.{uuid.uuid4().hex}.part"
    with partial.open("wb") as handle:
        np.save(handle, pixels, allow_pickle=False)
    os.replace(partial, final)
    return final


def cache_read(path: Path) -> Pixels:
    """Load a cached array whole."""
    pixels: Pixels = np.load(path, allow_pickle=False)
    return pixels


def timed(run: Callable[[], T], repeats: int) -> tuple[T, float]:
    """Call ``run`` ``repeats`` times; return its last result and the median milliseconds."""
    times: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        times.append((time.perf_counter() - started) * 1000)
    return result, statistics.median(times)


def pick_dsb(folder: Path, n: int) -> list[Path]:
    """Return ``n`` PNGs of ``folder``, taken in turn from each field size, largest first."""
    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as img:
            by_size[img.size].append(path)
    queues = [deque(by_size[s]) for s in sorted(by_size, key=lambda s: -s[0] * s[1])]
    picked: list[Path] = []
    while len(picked) < n and any(queues):
        for queue in queues:
            if queue and len(picked) < n:
                picked.append(queue.popleft())
    return picked


@dataclass
class Measured:
    """One image: what it decodes to, its payloads by kind, and its times by operation."""

    dataset: str
    path: Path
    pixels: Pixels
    payloads: dict[str, bytes]
    ms: dict[str, float] = field(default_factory=dict)


def measure_image(
    dataset: str,
    path: Path,
    *,
    settings: Settings,
    codecs: Sequence[str],
    cache_dir: Path,
    repeats: int,
) -> Measured:
    """Time every way of getting ``path``'s pixels, and check each gives them back exactly."""
    data = path.read_bytes()
    uri = f"file://{path.resolve()}"
    ms: dict[str, float] = {}
    pixels, ms["decode_uri"] = timed(
        lambda: read_image(
            uri,
            roots=settings.roots(),
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_file_bytes,
        ),
        repeats,
    )
    inline, ms["decode_inline"] = timed(
        lambda: decode_bytes(data, max_pixels=settings.max_image_pixels, what=path.name),
        repeats,
    )
    raw, ms["raw_serialise"] = timed(lambda: to_payload(pixels), repeats)
    restored, ms["raw_deserialise"] = timed(lambda: from_payload(raw), repeats)
    payloads = {"uri": uri.encode(), "inline": data, "raw": raw}
    same = [inline, restored]
    for name in codecs:
        compress, decompress = CODECS[name]
        packed, ms[f"{name}_compress"] = timed(functools.partial(compress, raw), repeats)
        payloads[name] = bytes(packed)  # imagecodecs gives bytes: no copy
        unpacked, ms[f"{name}_decompress"] = timed(
            functools.partial(decompress, payloads[name]), repeats
        )
        same.append(from_payload(unpacked))
    digest, ms["sha256"] = timed(lambda: hashlib.sha256(data).digest(), repeats)
    cached, ms["cache_write"] = timed(lambda: cache_write(cache_dir, digest.hex(), pixels), repeats)
    loaded, ms["cache_read"] = timed(lambda: cache_read(cached), repeats)
    payloads["cache"] = uri.encode() + digest
    same.append(loaded)
    for other in same:
        if other.dtype != pixels.dtype or not np.array_equal(other, pixels):
            raise AssertionError(f"{path}: an alternative did not give back the decoded array")
    return Measured(dataset=dataset, path=path, pixels=pixels, payloads=payloads, ms=ms)


def kafka_round(
    kafka: KafkaSettings,
    topic: str,
    partitions: int,
    groups: Sequence[str],
    messages: Sequence[tuple[bytes, bytes]],
) -> dict[str, Any]:
    """Produce ``messages`` (key, value) once, then read them all once per group; time both.

    A warm-up message, produced before the partitions' ends are taken, gets the producer
    its connection, metadata and idempotent producer id outside the clock; a worker's
    producer has them already.
    """
    failures: list[str] = []

    def delivered(error: Any, _msg: Any) -> None:
        if error is not None:
            failures.append(str(error))

    producer = plain_producer(kafka)
    producer.produce(topic, key=b"warm-up", value=b"", on_delivery=delivered)
    producer.flush(KAFKA_TIMEOUT_S)
    probe = group_consumer(kafka, f"{groups[0]}-probe")
    starts = [partition_end(probe, TopicPartition(topic, p)) for p in range(partitions)]
    probe.close()
    started = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.05)
        producer.poll(0)
    unsent = producer.flush(KAFKA_TIMEOUT_S)
    produce_s = time.perf_counter() - started
    if unsent or failures:
        raise RuntimeError(f"{unsent} messages unsent, delivery failures: {failures[:3]}")
    expected = sum(len(value) for _, value in messages)
    consume_s: list[float] = []
    for group in groups:
        consumer = group_consumer(kafka, group)
        consumer.list_topics(topic, timeout=10)  # connect before the clock starts
        consumer.assign(starts)
        got = read = 0
        started = time.perf_counter()
        while got < len(messages):
            if time.perf_counter() - started > KAFKA_TIMEOUT_S:
                raise RuntimeError(f"{group} read {got} of {len(messages)} messages in time")
            # Asks for no more than are left: consume waits for all it asks for.
            for msg in consumer.consume(len(messages) - got, 1.0):
                if not consumer_error(msg):
                    got += 1
                    read += len(msg.value() or b"")
        consume_s.append(time.perf_counter() - started)
        consumer.close()
        if read != expected:
            raise RuntimeError(f"{group} read {read} bytes, {expected} were produced")
    return {
        "produce_s": round(produce_s, 4),
        "consume_s": [round(s, 4) for s in consume_s],
        "ms_per_image": (produce_s + sum(consume_s)) * 1000 / len(messages),
    }


def delete_topic(kafka: KafkaSettings, topic: str) -> None:
    """Delete the run's throwaway topic."""
    admin = AdminClient(kafka.config())
    for future in admin.delete_topics([topic], operation_timeout=30).values():
        future.result()


def time_models(
    settings: Settings, tiers: Sequence[TierSpec], images: Sequence[Measured]
) -> dict[str, int]:
    """Time each tier's ``predict([image])`` per image into ``ms``; return each tier's threads."""
    default_threads = torch.get_num_threads()
    threads: dict[str, int] = {}
    for tier in tiers:
        set_compute_threads(tier.threads or default_threads)
        threads[tier.name] = torch.get_num_threads()
        stage = load_stage(settings.artifacts, tier.artifact, device=tier.device)
        stage.predict([DecodedImage(image_id="warm-up", pixels=images[0].pixels)])
        for image in images:
            batch = [DecodedImage(image_id=image.path.stem, pixels=image.pixels)]
            _, image.ms[f"model_{tier.name}"] = timed(functools.partial(stage.predict, batch), 1)
    set_compute_threads(default_threads)
    return threads


def summarise(images: Sequence[Measured]) -> dict[str, Any]:
    """Median and total per operation (ms) and per payload kind (bytes) over ``images``."""
    ops = {
        op: {
            "median_ms": round(statistics.median(m.ms[op] for m in images), 4),
            "total_ms": round(sum(m.ms[op] for m in images), 3),
        }
        for op in images[0].ms
    }
    sizes = {
        kind: {
            "median_bytes": statistics.median(len(m.payloads[kind]) for m in images),
            "total_bytes": sum(len(m.payloads[kind]) for m in images),
        }
        for kind in images[0].payloads
    }
    return {"images": len(images), "ms": ops, "bytes": sizes}


def choose(
    images: Sequence[Measured], kafka: dict[str, dict[str, Any]], codecs: Sequence[str], fanout: int
) -> dict[str, Any]:
    """Cost per image of each alternative for the branch tiers together, and the cheapest.

    Per alternative: ``(gate ops, payload kind, per-tier ops)``; the gate's ops run once,
    the per-tier ops once per branch tier.
    """
    plans: dict[str, tuple[list[str], str, list[str]]] = {
        "decode_again_uri": ([], "uri", ["decode_uri"]),
        "decode_again_inline": ([], "inline", ["decode_inline"]),
        "raw": (["raw_serialise"], "raw", ["raw_deserialise"]),
        **{
            name: (
                ["raw_serialise", f"{name}_compress"],
                name,
                [f"{name}_decompress", "raw_deserialise"],
            )
            for name in codecs
        },
        "cache": (["sha256", "cache_write"], "cache", ["cache_read"]),
    }

    def mean(ops: Sequence[str]) -> float:
        return sum(m.ms[op] for m in images for op in ops) / len(images)

    costs: dict[str, dict[str, float]] = {}
    for name, (gate_ops, kind, tier_ops) in plans.items():
        parts = {
            "gate_ms": mean(gate_ops),
            "kafka_ms": kafka[kind]["ms_per_image"],
            "tier_ms": mean(tier_ops),
        }
        costs[name] = {
            **{k: round(v, 4) for k, v in parts.items()},
            "total_ms": round(parts["gate_ms"] + parts["kafka_ms"] + fanout * parts["tier_ms"], 4),
            "broker_bytes": round((1 + fanout) * kafka[kind]["total_bytes"] / len(images)),
        }
    alternatives = [n for n in plans if not n.startswith("decode_again")]

    def verdict(today: str) -> dict[str, Any]:
        best = min([today, *alternatives], key=lambda n: costs[n]["total_ms"])
        return {
            "today": today,
            "today_ms": costs[today]["total_ms"],
            "best": best,
            "best_ms": costs[best]["total_ms"],
            "saving_ms_per_image": round(costs[today]["total_ms"] - costs[best]["total_ms"], 4),
        }

    return {
        "fanout": fanout,
        "cost_per_image": costs,
        "uri_submissions": verdict("decode_again_uri"),
        "inline_submissions": verdict("decode_again_inline"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the measurement and write ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--images", type=int, default=60, help="DSB 2018 images")
    parser.add_argument("--bccd", type=int, default=0, help="BCCD JPEGs")
    parser.add_argument("--repeats", type=int, default=5, help="runs per operation and image")
    parser.add_argument("--codecs", nargs="+", default=list(CODECS), choices=list(CODECS))
    parser.add_argument("--out", type=Path, default=RESULTS / "decode.json")
    args = parser.parse_args(argv)
    command = " ".join(
        [".venv/bin/python", "benchmarks/decode.py", *map(shlex.quote, sys.argv[1:])]
    )
    settings = get_settings()
    topology = load_topology(settings.topology)
    gate = topology.gate_tiers[0]
    branches = [t for t in topology.branch_tiers if t.input == gate.routes["pass"]]
    sources = [
        ("dsb2018", p) for p in pick_dsb(settings.datasets / "dsb2018" / "images", args.images)
    ]
    bccd = sorted((settings.datasets / "bccd" / "BCCD" / "JPEGImages").glob("*.jpg"))
    sources += [("bccd", p) for p in bccd[: args.bccd]]

    cache_dir = Path(tempfile.mkdtemp(prefix="phenocascade-decode-"))
    try:
        images = [
            measure_image(
                dataset,
                path,
                settings=settings,
                codecs=args.codecs,
                cache_dir=cache_dir,
                repeats=args.repeats,
            )
            for dataset, path in sources
        ]
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    print(f"measured {len(images)} images", flush=True)

    up(settings, services=("kafka",))
    run = topology.namespaced(f"decode{uuid.uuid4().hex[:6]}-")
    usable = run.tier(gate.name).routes["pass"]
    spec = next(t for t in run.topics if t.name == usable)
    # Only the topic this run uses, with the settings of the real images.usable.
    create_topics(settings.kafka, run.model_copy(update={"topics": [spec]}))
    groups = [run.tier(t.name).group for t in branches]
    try:
        rounds: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for _ in range(args.repeats):
            for kind in images[0].payloads:  # in turn, so that a busy moment hits them all
                rounds[kind].append(
                    kafka_round(
                        settings.kafka,
                        usable,
                        spec.partitions,
                        [f"{g}-{kind}" for g in groups],
                        [(m.path.stem.encode(), m.payloads[kind]) for m in images],
                    )
                )
    finally:
        try:
            delete_topic(settings.kafka, usable)
        except KafkaException as exc:
            print(f"could not delete the topic {usable}: {exc}", file=sys.stderr)
    kafka = {
        kind: {
            "messages": len(images),
            "total_bytes": sum(len(m.payloads[kind]) for m in images),
            "ms_per_image": statistics.median(r["ms_per_image"] for r in runs),
            "rounds": runs,
        }
        for kind, runs in rounds.items()
    }
    print("kafka", json.dumps({k: round(v["ms_per_image"], 3) for k, v in kafka.items()}))

    threads = time_models(settings, branches, images)
    datasets = sorted({m.dataset for m in images})
    summary = {d: summarise([m for m in images if m.dataset == d]) for d in datasets}
    summary["all"] = summarise(images)
    ops = summary["all"]["ms"]
    models = {
        t.name: {
            "artifact": t.artifact,
            "device": t.device,
            "threads": threads[t.name],
            **ops[f"model_{t.name}"],
            "decode_share": round(
                ops["decode_uri"]["total_ms"]
                / (ops["decode_uri"]["total_ms"] + ops[f"model_{t.name}"]["total_ms"]),
                4,
            ),
        }
        for t in branches
    }
    sizes = Counter("x".join(map(str, m.pixels.shape)) for m in images)
    report = {
        **provenance(command),
        "images": {"per_dataset": {d: summary[d]["images"] for d in datasets}, "sizes": sizes},
        "repeats": args.repeats,
        "summary": summary,
        "kafka": kafka,
        "models": models,
        "per_image": [
            {
                "dataset": m.dataset,
                "file": m.path.name,
                "shape": list(m.pixels.shape),
                "dtype": str(m.pixels.dtype),
                "bytes": {k: len(v) for k, v in m.payloads.items()},
                "ms": {k: round(v, 4) for k, v in m.ms.items()},
            }
            for m in images
        ],
        "choice": choose(images, kafka, args.codecs, len(branches)),
    }
    for name, cost in report["choice"]["cost_per_image"].items():
        print(
            f"{name:>20} {cost['total_ms']:9.3f} ms/image {cost['broker_bytes']:>10} B", flush=True
        )
    print("models", json.dumps(models))
    for submissions in ("uri_submissions", "inline_submissions"):
        print(submissions, json.dumps(report["choice"][submissions]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
