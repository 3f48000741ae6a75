"""A downstream consumer: read the results topic and write its outputs to Parquet in batches.

    python examples/results_to_parquet.py --out results/parquet

Each ``ImageOutput`` on the results topic (Avro, decoded with
:class:`phenocascade.streams.serde.EventCodec`) becomes one row, with the columns of
``phenocascade export --format parquet --per image``. Rows are buffered per partition
and written as ``p<partition>-<first offset>.parquet`` once a partition has ``--batch``
rows or its oldest row is ``--max-wait-s`` old; the partition's offset is committed only
after its file is in place. A crash between the two rewrites the same file name from the
same first offset, so the folder never holds a message twice. The joiner itself may emit an
output twice after a crash of its own (see docs/architecture.md); readers deduplicate on
``(image_id, versions_key)``. Read the folder with ``pyarrow.dataset.dataset(out)`` (files
may differ in their label and tier columns; pyarrow fills the missing ones with nulls).

Kafka settings come from the ``PHENOCASCADE_*`` environment, as for every phenocascade
command.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from confluent_kafka import Consumer, Message, TopicPartition

from phenocascade.config import get_settings, load_topology
from phenocascade.data.exports import arrow_table, image_rows
from phenocascade.streams.kafka import group_consumer
from phenocascade.streams.serde import EventCodec

log = logging.getLogger("results_to_parquet")


@dataclass
class _Buffer:
    first_offset: int
    started: float
    outputs: list[dict[str, Any]] = field(default_factory=list)
    next_offset: int = 0


def write_batch(out: Path, partition: int, buffer: _Buffer) -> Path:
    """Write one partition's buffered outputs to ``p<partition>-<first offset>.parquet``."""
    dest = out / f"p{partition}-{buffer.first_offset:020d}.parquet"
    tmp = dest.with_suffix(".tmp")
    pq.write_table(arrow_table(image_rows(buffer.outputs), per="image"), tmp)
    os.replace(tmp, dest)  # a reader never sees half a file
    return dest


def flush_due(
    consumer: Consumer,
    buffers: dict[int, _Buffer],
    args: argparse.Namespace,
    *,
    force: bool = False,
) -> int:
    """Write and commit every partition whose batch is full or old; return rows written."""
    written = 0
    now = time.monotonic()
    for partition, buffer in list(buffers.items()):
        full = len(buffer.outputs) >= args.batch
        if not (force or full or now - buffer.started >= args.max_wait_s):
            continue
        dest = write_batch(args.out, partition, buffer)
        consumer.commit(
            offsets=[TopicPartition(args.topic, partition, buffer.next_offset)], asynchronous=False
        )
        log.info("wrote %d outputs to %s", len(buffer.outputs), dest)
        written += len(buffer.outputs)
        del buffers[partition]
    return written


def add(buffers: dict[int, _Buffer], msg: Message, codec: EventCodec) -> None:
    """Decode one results message into its partition's buffer."""
    partition, offset = msg.partition(), msg.offset()
    assert partition is not None and offset is not None
    _, output = codec.decode(msg.value() or b"", expected="ImageOutput")
    buffer = buffers.setdefault(partition, _Buffer(offset, time.monotonic()))
    buffer.outputs.append(output)
    buffer.next_offset = offset + 1


def run(args: argparse.Namespace) -> int:
    """Consume until SIGTERM/SIGINT (or ``--idle-exit-s`` without messages); return rows written."""
    args.out.mkdir(parents=True, exist_ok=True)
    consumer = group_consumer(get_settings().kafka, args.group)
    buffers: dict[int, _Buffer] = {}

    def revoked(_: Consumer, parts: list[TopicPartition]) -> None:
        # Their next owner reads them again from the committed offset, into the same names.
        for part in parts:
            buffers.pop(part.partition, None)

    consumer.subscribe([args.topic], on_revoke=revoked)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    codec = EventCodec()
    written, last_message = 0, time.monotonic()
    try:
        while not stop.is_set():
            msgs = [m for m in consumer.consume(args.batch, 1.0) if m.error() is None]
            for msg in msgs:
                add(buffers, msg, codec)
            if msgs:
                last_message = time.monotonic()
            elif args.idle_exit_s and time.monotonic() - last_message >= args.idle_exit_s:
                break
            written += flush_due(consumer, buffers, args)
        written += flush_due(consumer, buffers, args, force=True)
    finally:
        consumer.close()
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; the topic defaults to the topology's results topic."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the Parquet files")
    parser.add_argument("--topic", help="results topic (default: the topology's)")
    parser.add_argument("--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY)")
    parser.add_argument("--group", default="results-to-parquet", help="consumer group id")
    parser.add_argument("--batch", type=int, default=500, help="rows per file (default: 500)")
    parser.add_argument(
        "--max-wait-s",
        type=float,
        default=30.0,
        help="write a batch once its oldest row is this old (default: 30)",
    )
    parser.add_argument(
        "--idle-exit-s",
        type=float,
        default=0.0,
        help="exit after this many seconds without a message (default: run until stopped)",
    )
    args = parser.parse_args(argv)
    if args.topic is None:
        path = args.topology or get_settings().topology
        args.topic = load_topology(Path(path) if path else None).joiner.results_topic
    return args


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    rows = run(parse_args())
    log.info("stopped after writing %d outputs", rows)
