"""``phenocascade demo``: the main job, end to end on one machine.

Start the local brokers, submit real sample images from the shared datasets, train the
bootstrap models if missing (each tier's workers start as soon as its model is ready, so
the first results come while the later tiers still train), print the results and write
overlays.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any, Self

from rich.progress import Progress

from phenocascade.cli.cascade import (
    build_report,
    console,
    render_output,
    results_table,
    start_cascade,
    stop_cascade,
    submit_paths,
)
from phenocascade.config import Settings, get_settings, load_topology
from phenocascade.domain import ImageMeta
from phenocascade.errors import InfraError
from phenocascade.infra.local import up
from phenocascade.store.cassandra import connect, get_latest_output, outputs_by_study
from phenocascade.streams.kafka import create_topics


def sample_images(
    settings: Settings, *, dsb: int, bccd: int, bbbc006_unclear: int, bbbc006_clear: int
) -> list[Path]:
    """Pick real sample images from the test splits of the bundled datasets (never train data).

    The bundled sets are imported into the dataset store as a lab's own are (once per
    process; :mod:`phenocascade.recipes.bundled_data`).
    """
    # Imported here: the recipes import torch, and the joiner and sink share this CLI.
    from phenocascade.recipes.bundled_data import bbbc006_set, split_samples

    picks = [s.path for s in split_samples(settings, "dsb2018", "test")[:dsb]]
    picks += [s.path for s in split_samples(settings, "bccd", "test")[:bccd]]
    focus = bbbc006_set(settings).samples
    picks += [s.path for s in focus if not s.labels][:bbbc006_unclear]
    picks += [s.path for s in focus if s.labels][:bbbc006_clear]
    return [p for p in picks if p is not None]


def wait_for_outputs(
    settings: Settings, study: str, image_ids: list[str], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Poll Cassandra until every image has an output (or timeout); return the outputs.

    One query of ``study``'s outputs a second; an image's output is read once, when it
    first appears there.
    """
    session = connect(settings.cassandra)
    wanted = set(image_ids)
    outputs: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("streaming through the cascade", total=len(wanted))
        while True:
            for row in outputs_by_study(session=session, study=study):
                image_id = row["image_id"]
                if image_id in wanted and image_id not in outputs:
                    found = get_latest_output(session=session, image_id=image_id)
                    if found is not None:
                        outputs[image_id] = found
            bar.update(task, completed=len(outputs))
            if len(outputs) >= len(wanted) or time.monotonic() >= deadline:
                return outputs
            time.sleep(1.0)


class FirstResult:
    """Watch Cassandra, in a thread, for the first output of ``study``; say when it came.

    The demo's images wait in Kafka while the bootstrap models train, and the gate's
    worker starts as soon as its model is ready: its unusable images are answered while
    the branch tiers still train. ``seconds`` is the time from ``since`` (monotonic; the
    brokers being up) to the first output seen (one query a second).
    """

    def __init__(self, settings: Settings, study: str, since: float) -> None:
        self.settings = settings
        self.study = study
        self.since = since
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="first-result", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _watch(self) -> None:
        session = connect(self.settings.cassandra)
        while not self._stop.wait(1.0):
            rows = outputs_by_study(session=session, study=self.study)
            if rows:
                first = min(rows, key=lambda r: r["produced_at"])
                self.seconds = time.monotonic() - self.since
                console.print(
                    f"first result {self.seconds:.0f} s after the brokers were up: "
                    f"{first['image_id']} {first['status']}"
                )
                return


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo."""
    settings = get_settings()
    topology = load_topology(settings.topology)
    logs = settings.home / "logs"
    console.rule("1/5 local Kafka and Cassandra")
    up(settings, progress=console.print)
    create_topics(settings.kafka, topology)
    brokers_up = time.monotonic()
    console.rule("2/5 sample images")
    images = sample_images(
        settings,
        dsb=args.dsb,
        bccd=args.bccd,
        bbbc006_unclear=args.bbbc006_unclear,
        bbbc006_clear=args.bbbc006_clear,
    )
    run_id = time.strftime("demo-%Y%m%dT%H%M%S")
    ids = submit_paths(
        settings, topology, images, meta=ImageMeta(study=run_id), prefix=f"{run_id}-"
    )
    console.print(
        f"submitted {len(ids)} real images as study {run_id}: they wait in Kafka until "
        "each tier's model is ready"
    )
    console.rule("3/5 bootstrap models and cascade: each tier starts once its model is ready")
    # Imported here: torch is heavy, and the joiner and sink processes share this CLI.
    from phenocascade.recipes import ensure_bootstrap

    procs = start_cascade(topology, logs, only=["joiner"])
    started: set[str] = set()

    def start(tiers: list[str]) -> None:
        if tiers:
            console.print(f"starting the {', '.join(tiers)} worker(s)")
            procs.update(start_cascade(topology, logs, only=tiers))
            started.update(tiers)

    def ready(artifact: str, version: str) -> None:
        console.print(f"{artifact}: champion {version}")
        start([t.name for t in topology.tiers if t.artifact == artifact])

    try:
        with FirstResult(settings, run_id, brokers_up) as first:
            ensure_bootstrap(settings, progress=True, ready=ready)
            start([t.name for t in topology.tiers if t.name not in started])
            outputs = wait_for_outputs(settings, run_id, ids, args.timeout)
        for name, proc in procs.items():
            if proc.poll() is not None:
                raise InfraError(f"{name} exited with {proc.returncode}; see {logs}/{name}.log")
    finally:
        stop_cascade(procs)
    done_s = time.monotonic() - brokers_up
    console.rule("4/5 results")
    ordered = [outputs[i] for i in ids if i in outputs]
    console.print(results_table(ordered))
    out_dir = Path(args.out) / run_id
    for output in ordered:
        render_output(settings, output, out_dir / f"{output['image_id']}.png")
    console.print(f"wrote {len(ordered)} overlays to {out_dir}")
    if first.seconds is not None:
        console.print(
            f"first result {first.seconds:.0f} s and {len(ordered)} results {done_s:.0f} s "
            "after the brokers were up"
        )
    console.rule("5/5 report")
    report = build_report(settings, topology, prefix=f"{run_id}-")
    console.print_json(json.dumps(report))
    missing = len(ids) - len(ordered)
    if missing:
        console.print(f"[red]{missing} images have no output yet")
        return 1
    return 0 if report["balanced"] else 1


def register(sub: Any) -> None:
    """Register ``phenocascade demo``."""
    p = sub.add_parser(
        "demo", help="the main job: brokers, bootstrap models, stream samples, results, overlays"
    )
    # The whole DSB test split: the bootstrap models decide every label of few images
    # at their certified precision, so the first 30 alone showed none analyzed.
    p.add_argument("--dsb", type=int, default=132, help="DSB2018 test images (132: all)")
    p.add_argument("--bccd", type=int, default=12, help="BCCD test images")
    p.add_argument("--bbbc006-unclear", type=int, default=8, help="real defocused BBBC006 fields")
    p.add_argument("--bbbc006-clear", type=int, default=4, help="sharp BBBC006 fields")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for all outputs")
    p.add_argument("--out", default="out/overlays")
    p.set_defaults(func=cmd_demo)
