"""Sub-commands that run and query the cascade.

``topics create``, ``worker``, ``joiner``, ``run``, ``submit``, ``results``, ``render``, ``report``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from phenocascade.cli.metrics import (
    add_metrics_port,
    child_metrics_ports,
    metrics_port,
    start_metrics,
    with_metrics_ports,
)
from phenocascade.cli.supervise import Supervisor
from phenocascade.config import Settings, Topology, get_settings, load_topology
from phenocascade.consumers.drift import study_drift
from phenocascade.consumers.joiner import run_joiner
from phenocascade.consumers.rescorer import RescoreSettings
from phenocascade.consumers.worker import TierWorker
from phenocascade.domain import ImageMeta
from phenocascade.errors import NotFoundError, ValidationError
from phenocascade.imaging import read_image, resolve_under_roots
from phenocascade.models.base import ArtifactMeta, champion_version
from phenocascade.overlay import render_overlay
from phenocascade.store.cassandra import (
    connect,
    get_latest_output,
    latest_outputs_of_study,
    latest_status_by_image,
)
from phenocascade.store.images import ImageStore, configured_store, content_digest
from phenocascade.store.slides import is_slide, is_zarr, open_slide, pyramid
from phenocascade.streams import events
from phenocascade.streams.kafka import create_topics, default_instance_id, plain_producer
from phenocascade.streams.lag import LagReader, PartitionLag, watch_stalls
from phenocascade.streams.scan import scan_topic
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import Tiling, routing_key, submission_tile, tile_submissions

log = logging.getLogger(__name__)
STALLED_EXIT = 75
"""The joiner's exit status when it found itself stalled (``--stall-exit-s``)."""
# The joiner's default --stall-exit-s: how long a partition may hold records uncommitted.
JOINER_STALL_EXIT_S = 120.0
# Wide enough for the results table when output is not a terminal (CI logs, pipes).
console = Console(width=max(140, shutil.get_terminal_size().columns))

IMAGE_SUFFIXES = {".tif", ".tiff", ".png", ".jpg", ".jpeg"}


def _topology(args: argparse.Namespace) -> Topology:
    path = getattr(args, "topology", None) or get_settings().topology
    return load_topology(Path(path) if path else None)


# -- topics, worker, joiner, run ----------------------------------------------------------
def cmd_topics_create(args: argparse.Namespace) -> int:
    """Create the topology's topics."""
    created = create_topics(get_settings().kafka, _topology(args))
    console.print(f"created {len(created)} topics: {', '.join(created) or '(all existed)'}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run one tier worker until SIGTERM/SIGINT."""
    settings = get_settings()
    topology = _topology(args)
    tier = topology.tier(args.tier)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    start_metrics(args, settings, {tier.group: [tier.input]})
    worker = TierWorker(
        settings=settings,
        topology=topology,
        tier=tier,
        instance=args.instance or default_instance_id(),
        slowdown=args.slowdown,
    )
    stats = worker.run(stop, max_images=args.max_images)
    log.info("worker %s stopped: %s", args.tier, stats)
    return 0


def cmd_joiner(args: argparse.Namespace) -> int:
    """Run the joiner until SIGTERM/SIGINT."""
    settings = get_settings()
    topology = _topology(args)
    inputs = [t.result_topic for t in topology.tiers]
    start_metrics(args, settings, {topology.joiner.app_id: inputs})
    if args.stall_exit_s > 0:
        watch_stalls(
            LagReader(settings.kafka),
            topology.joiner.app_id,
            [*inputs, topology.annotations_topic],
            stall_s=args.stall_exit_s,
            on_stall=_exit_stalled,
        )
    run_joiner(settings, topology, instance=args.instance)
    return 0


def _exit_stalled(partition: PartitionLag, seconds: float) -> None:
    """End a stalled joiner at once, so that its supervisor starts a fresh one.

    Safe as a kill -9 is: the open transaction is aborted and the restart resumes from
    the committed offsets and the join state in Cassandra.
    """
    log.error(
        "joiner stalled: %s[%d] has kept committed offset %s for %.0f s while %d records "
        "wait; exiting with status %d so that its supervisor starts a fresh one",
        partition.topic,
        partition.partition,
        partition.committed,
        seconds,
        partition.lag,
        STALLED_EXIT,
    )
    logging.shutdown()
    os._exit(STALLED_EXIT)


def start_cascade(
    topology: Topology,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    metrics_port: int = 0,
    only: Collection[str] | None = None,
) -> dict[str, subprocess.Popen[bytes]]:
    """Start every tier worker (``replicas`` per tier) and the joiner as processes here.

    ``env`` replaces the child processes' environment (default: this process's). The
    processes are named as in :func:`cascade_commands`, and serve their metrics on the
    ports above ``metrics_port`` as ``phenocascade run``'s do (0: none). ``only`` starts
    just the workers of those tiers, and the joiner if it names ``"joiner"``.
    """
    commands = with_metrics_ports(cascade_commands(topology), metrics_port)
    if only is not None:
        chosen = cascade_commands(topology, only=only)
        commands = {name: cmd for name, cmd in commands.items() if name in chosen}
    return {name: start_process(name, cmd, log_dir, env) for name, cmd in commands.items()}


def cascade_commands(
    topology: Topology, *, only: Collection[str] | None = None
) -> dict[str, list[str]]:
    """Return ``{process name: phenocascade arguments}`` of every process of the cascade.

    A tier with ``replicas: n`` runs ``n`` workers named ``<tier>``, ``<tier>-2``, ...;
    each has its own stable instance id (``<host>``, ``<host>-2``, ...), so a restarted
    replica fences its own crashed predecessor's transactions. ``only``: the workers of
    those tiers, and the joiner if it names ``"joiner"``.
    """
    commands: dict[str, list[str]] = {}
    for tier in topology.tiers:
        if only is not None and tier.name not in only:
            continue
        for i in range(1, tier.replicas + 1):
            suffix = f"-{i}" if i > 1 else ""
            commands[f"{tier.name}{suffix}"] = [
                "worker",
                tier.name,
                "--instance",
                f"{default_instance_id()}{suffix}",
            ]
    if only is None or "joiner" in only:
        commands["joiner"] = ["joiner"]
    return commands


def start_process(
    name: str, args: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``phenocascade ARGS`` in the background, appending its output to ``<name>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # The child keeps its own copy of the descriptor; ours is closed at once.
    with (log_dir / f"{name}.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "phenocascade", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
        )


def stop_cascade(procs: dict[str, subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    """SIGTERM every process, then SIGKILL what is still alive after ``timeout_s``."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in procs.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def learning_commands(every: int, *, rescore: bool = False) -> dict[str, list[str]]:
    """Return the processes of the annotation loop: the task sink, the app, the retrainer.

    With ``rescore`` (``PHENOCASCADE_RESCORE_ON_PROMOTION``), also the rescorer.
    """
    commands = {"sink": ["sink"], "ui": ["ui"], "retrainer": ["retrainer", "--every", str(every)]}
    if rescore:
        commands["rescorer"] = ["rescorer"]
    return commands


def cmd_run(args: argparse.Namespace) -> int:
    """Run the whole cascade on this machine until SIGTERM/SIGINT, restarting the dead.

    A process that exits is restarted with backoff (see
    :class:`~phenocascade.cli.supervise.Supervisor`) while the others keep running.
    """
    settings = get_settings()
    topology = _topology(args)
    create_topics(settings.kafka, topology)
    env = dict(os.environ)
    if args.topology:
        # The children read the same topology as this command.
        env["PHENOCASCADE_TOPOLOGY"] = str(Path(args.topology).resolve())
    commands = cascade_commands(topology)
    if args.learning:
        rescore = RescoreSettings.from_env().on_promotion
        commands.update(learning_commands(args.every, rescore=rescore))
    base = metrics_port(args, settings)
    commands = with_metrics_ports(commands, base)
    log_dir = settings.home / "logs"
    supervisor = Supervisor(commands, lambda name, cmd: start_process(name, cmd, log_dir, env))
    supervisor.start(time.monotonic())
    running = ", ".join(f"{n} (pid {p.pid})" for n, p in supervisor.processes.items())
    console.print(f"cascade running: {running}; logs in {log_dir}")
    if start_metrics(args, settings) is not None:
        ports = child_metrics_ports(list(commands), base)
        listed = ", ".join(f"{n} :{port}" for n, port in {"run": base, **ports}.items())
        console.print(f"metrics (http://{settings.metrics_host}:PORT/metrics): {listed}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            for name in supervisor.poll(time.monotonic()):
                console.print(
                    f"[yellow]restarted {name} (restart {supervisor.restarts[name]}); "
                    f"see {log_dir / (name + '.log')}"
                )
    finally:
        stop_cascade(supervisor.processes)
    return 0


# -- submit --------------------------------------------------------------------------------
def iter_images(paths: Iterable[Path]) -> list[Path]:
    """Expand files and folders into image files, sorted, deduplicated.

    A Zarr folder (an OME-Zarr slide) is an image, not a folder to look into.
    """
    found: set[Path] = set()
    for path in paths:
        if is_zarr(path):
            found.add(path)
        elif path.is_dir():
            found |= {
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            }
            found |= {p for p in path.rglob("*.zarr") if is_zarr(p)}
        elif path.is_file():
            found.add(path)
        else:
            raise ValidationError(f"{path} is neither a file nor a folder")
    return sorted(p.resolve() for p in found)


def image_id_for(path: Path, prefix: str = "") -> str:
    """Return a stable image id: the file stem plus a short hash of its absolute path."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{prefix}{path.stem}-{digest}"


def submit_paths(
    settings: Settings,
    topology: Topology,
    paths: Sequence[Path],
    *,
    meta: ImageMeta,
    inline: bool = False,
    prefix: str = "",
    progress: bool = True,
    store: ImageStore | None = None,
    tiling: Tiling | None = None,
) -> list[str]:
    """Publish one ``ImageSubmitted`` per file, or per tile of a slide; return the image ids.

    A slide (:func:`~phenocascade.store.slides.is_slide`: a pyramidal TIFF, or one over
    ``settings.max_image_pixels``) is published as its tiles (``tiling``, default
    :class:`~phenocascade.streams.tiling.Tiling`), each keyed by the slide's id; its id is
    returned once, and the joiner emits one output for it. Every slide is opened (its
    header only) before anything is published, so a slide that cannot be tiled submits
    nothing. With ``store``, each file's bytes are kept there first (for ``replay``); a
    slide is copied in chunks (an OME-Zarr folder file by file), with its tiling, and its
    tiles are still read from its path.

    Raises
    ------
    ValidationError
        If a slide is submitted inline, or its tiling asks for a level it lacks.
    BadInputError
        If a slide's file cannot be read as a slide (with the reason and what to do).
    """
    tiling = tiling or Tiling()
    slides = _slide_tiles(settings, paths, meta=meta, inline=inline, prefix=prefix, tiling=tiling)
    codec = EventCodec()
    producer = plain_producer(settings.kafka)
    ids: list[str] = []
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("submitting", total=len(paths))
        for path in paths:
            image_id = image_id_for(path, prefix)
            fmt = events.format_of(path.name)
            if path in slides:
                slide, records = slides[path]
                if store is not None:
                    digest = content_digest(path)
                    store.put_file(slide, path, sha256=digest, tiling=asdict(tiling))
            else:
                data = path.read_bytes() if inline or store is not None else None
                if inline:
                    record = events.image_submitted(image_id, inline=data, fmt=fmt, meta=meta)
                else:
                    record = events.image_submitted(image_id, uri=str(path), fmt=fmt, meta=meta)
                if store is not None and data is not None:
                    store.put(record, data)
                records = [record]
            for r in records:
                producer.produce(
                    topology.submitted_topic,
                    key=routing_key(r),
                    value=codec.encode("ImageSubmitted", r),
                )
                producer.poll(0)
            ids.append(image_id)
            bar.advance(task)
    remaining = producer.flush(60)
    if remaining:
        raise ValidationError(f"{remaining} submissions were not acknowledged by Kafka in 60 s")
    return ids


def _slide_tiles(
    settings: Settings,
    paths: Sequence[Path],
    *,
    meta: ImageMeta,
    inline: bool,
    prefix: str,
    tiling: Tiling,
) -> dict[Path, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Return the slide's and its tiles' ``ImageSubmitted`` of each slide among ``paths``.

    Reads the slides' headers only.
    """
    slides = [path for path in paths if is_slide(path, max_pixels=settings.max_image_pixels)]
    if slides and inline:
        raise ValidationError(
            f"{slides[0]} is a slide; slides are tiled from their files: submit them without "
            "--inline"
        )
    levels = {path: pyramid(path) for path in slides}  # every slide opens, or none is tiled
    tiles = {}
    for path in slides:
        record = events.image_submitted(
            image_id_for(path, prefix), uri=str(path), fmt=events.format_of(path.name), meta=meta
        )
        cut = tile_submissions(
            record, levels=levels[path], tiling=tiling, max_pixels=settings.max_image_pixels
        )
        tiles[path] = record, cut
    return tiles


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit files or folders."""
    settings = get_settings()
    paths = iter_images(Path(p) for p in args.paths)
    meta = ImageMeta(
        study=args.study, specimen=args.specimen, modality=args.modality, stain=args.stain
    )
    ids = submit_paths(
        settings,
        _topology(args),
        paths,
        meta=meta,
        inline=args.inline,
        prefix=args.prefix,
        store=configured_store(settings.home),
        tiling=tiling_of(args),
    )
    console.print(f"submitted {len(ids)} images to study {args.study!r}")
    return 0


# -- results, render, report ---------------------------------------------------------------
def results_table(outputs: Sequence[dict[str, Any]]) -> Table:
    """Return a rich table of outputs: id, status, labels, boxes, pending labels, routes, experts.

    Labels are those of every classifier tier (p >= 0.5), boxes those of every detector;
    ``pending`` lists the labels still left to experts (all others are final); ``experts``
    the tiers whose open labels an expert decided, and who.
    """
    table = Table(title=f"{len(outputs)} image outputs")
    for col in ("image", "status", "labels (p>=0.5)", "boxes", "pending", "routes", "experts"):
        table.add_column(col)
    for o in outputs:
        labels = ", ".join(
            f"{k} {v:.2f}"
            for k, v in sorted(o["labels"].items(), key=lambda kv: -kv[1])
            if v >= 0.5
        )
        boxes = ", ".join(f"{b['label']} {b['score']:.2f}" for b in o["boxes"][:4])
        if len(o["boxes"]) > 4:
            boxes += f" (+{len(o['boxes']) - 4})"
        routes = " ".join(f"{t}:{r}" for t, r in o["routes"].items())
        image_id = o["image_id"]
        short = image_id if len(image_id) <= 36 else f"{image_id[:18]}…{image_id[-17:]}"
        pending = ", ".join(o.get("pending") or []) or "-"
        experts = " ".join(f"{t}:{who}" for t, who in (o.get("annotators") or {}).items())
        table.add_row(short, o["status"], labels, boxes or "-", pending, routes, experts or "-")
    return table


def cmd_results(args: argparse.Namespace) -> int:
    """Print outputs of one image or one study."""
    session = connect(get_settings().cassandra)
    if args.image:
        found = get_latest_output(session=session, image_id=args.image)
        outputs = [found] if found else []
    else:
        outputs = latest_outputs_of_study(session=session, study=args.study)
    if not outputs:
        raise NotFoundError(
            f"no outputs for {'image ' + args.image if args.image else 'study ' + args.study}"
        )
    if args.json:
        print(json.dumps(outputs, default=str, indent=2))
    else:
        console.print(results_table(outputs))
    return 0


def render_output(
    settings: Settings, output: dict[str, Any], dest: Path, *, slide_side: int = 2048
) -> Path:
    """Write the overlay PNG of one output to ``dest``.

    A slide is drawn downsampled, its longer side about ``slide_side`` pixels, read from
    the smallest pyramid level that large (never the whole slide at full resolution).
    """
    if not output["uri"]:
        raise NotFoundError(
            f"image {output['image_id']} was submitted inline; its pixels are not stored"
        )
    path = resolve_under_roots(output["uri"], settings.roots())
    scale = 1.0
    if is_slide(path, max_pixels=settings.max_image_pixels):
        with open_slide(path, roots=settings.roots(), max_bytes=settings.max_file_bytes) as slide:
            pixels, scale = slide.thumbnail(slide_side)
    else:
        pixels = read_image(
            path,
            roots=settings.roots(),
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_file_bytes,
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    render_overlay(
        pixels, output["labels"], output["boxes"], status=output["status"], scale=scale
    ).save(dest)
    return dest


def cmd_render(args: argparse.Namespace) -> int:
    """Render the overlay of one image."""
    settings = get_settings()
    output = get_latest_output(session=connect(settings.cassandra), image_id=args.image_id)
    if output is None:
        raise NotFoundError(f"no output for image {args.image_id}")
    console.print(f"wrote {render_output(settings, output, Path(args.output))}")
    return 0


def build_report(settings: Settings, topology: Topology, prefix: str = "") -> dict[str, Any]:
    """Count submissions, outputs by status, annotation requests and dead letters.

    ``submitted`` counts distinct image ids on the submitted topic (its keys: a slide's
    tiles are keyed by the slide's id); outputs come from Cassandra (the newest output of
    each image); ``dead_lettered`` counts distinct dead-lettered messages of the submitted
    topic, the only ones that end an image, and a slide's dead tiles once. With
    ``prefix``, only image ids that start with it count (one run of ``submit --prefix``).
    """
    codec = EventCodec()
    mine = prefix.encode()
    submitted = {
        k
        for k, _ in scan_topic(settings.kafka, topology.submitted_topic)
        if k and k.startswith(mine)
    }
    session = connect(settings.cassandra)
    statuses = latest_status_by_image(session=session)
    by_status = {s: 0 for s in ("analyzed", "unusable", "awaiting_annotation")}
    by_expert = 0
    awaiting: list[dict[str, Any]] = []
    for image_id, (status, expert) in statuses.items():
        if image_id.encode() in submitted:
            by_status[status] += 1
            by_expert += expert and status != "awaiting_annotation"
            if status == "awaiting_annotation":
                found = get_latest_output(session=session, image_id=image_id)
                awaiting += [found] if found is not None else []
    dead: set[tuple[int, int] | str] = set()
    dead_kinds: dict[str, int] = {}
    for _, value in scan_topic(settings.kafka, topology.dead_letter_topic):
        _, record = codec.decode(value, expected="DeadLetter")
        if record["origin_topic"] == topology.submitted_topic and (
            record["image_id"] or ""
        ).startswith(prefix):
            dead.add(_dead_image(codec, record))
            dead_kinds[record["error_kind"]] = dead_kinds.get(record["error_kind"], 0) + 1
    requests = {
        (k, codec.decode(v)[1]["tier"])
        for k, v in scan_topic(settings.kafka, topology.annotate_topic)
        if k and k.startswith(mine)
    }
    report: dict[str, Any] = {
        "submitted": len(submitted),
        **by_status,
        "dead_lettered": len(dead),
        "dead_letter_kinds": dead_kinds,
        "annotation_requests": len(requests),
    }
    report["accounted"] = sum(by_status.values()) + len(dead)
    report["balanced"] = report["accounted"] == report["submitted"]
    report["automatic"] = automation(by_status, awaiting, by_expert=by_expert)
    results = (
        codec.decode(v, expected="TierResult")[1]
        for tier in topology.tiers
        for k, v in scan_topic(settings.kafka, tier.result_topic)
        if k and k.startswith(mine)
    )
    drifts = study_drift(results, novelty_alphas(settings, topology))
    report["drift"] = {
        "tested": len(drifts),
        "flagged": [d.as_dict() for d in drifts if d.flagged],
    }
    return report


def _dead_image(codec: EventCodec, record: Mapping[str, Any]) -> tuple[int, int] | str:
    """Return the image a dead letter of the submitted topic ends.

    A tile's ends its slide (by id), so a slide whose several tiles failed counts once;
    any other ends its message, by ``(partition, offset)``.
    """
    tile = submission_tile(codec, record["payload"])
    return str(tile["parent_id"]) if tile else (record["origin_partition"], record["origin_offset"])


def novelty_alphas(settings: Settings, topology: Topology) -> dict[str, float]:
    """Each tier's shift-detector false-alarm rate, from its champion's metadata.

    Tiers without a champion, or whose champion has no shift detector, are left out.
    """
    alphas: dict[str, float] = {}
    for tier in topology.tiers:
        version = champion_version(settings.artifacts, tier.artifact)
        if version is None:
            continue
        meta = ArtifactMeta.read(settings.artifacts / tier.artifact / version)
        novelty = meta.calibration.get("novelty")
        if novelty:
            alphas[tier.name] = float(novelty["alpha"])
    return alphas


def automation(
    by_status: Mapping[str, int], awaiting: Sequence[Mapping[str, Any]], *, by_expert: int = 0
) -> dict[str, Any]:
    """Return how much of the work the cascade did alone.

    Parameters
    ----------
    by_status : Mapping[str, int]
        Outputs per status.
    awaiting : Sequence of Mapping
        The ``awaiting_annotation`` outputs.
    by_expert : int, default 0
        How many of the ``analyzed`` and ``unusable`` outputs an expert completed.

    Returns
    -------
    dict
        ``images``: outputs decided with no expert (``analyzed`` + ``unusable``, less those
        an expert completed) and their ``fraction`` of all outputs; ``completed_by_experts``;
        ``partial``: awaiting outputs some of whose labels or box classes are final all the
        same (per-label routing); ``expert_questions``: the labels still left to experts, in
        all and ``per_100_images``.
    """
    total = sum(by_status.values())
    decided = by_status.get("analyzed", 0) + by_status.get("unusable", 0) - by_expert
    questions = 0
    partial = 0
    for output in awaiting:
        pending = set(output.get("pending") or [])
        questions += len(pending) or 1
        final = {*output["labels"], *(b["label"] for b in output["boxes"])} - pending
        partial += bool(pending and final)
    return {
        "images": decided,
        "fraction": round(decided / total, 4) if total else 0.0,
        "completed_by_experts": by_expert,
        "partial": partial,
        "expert_questions": questions,
        "per_100_images": round(100 * questions / total, 1) if total else 0.0,
    }


def cmd_report(args: argparse.Namespace) -> int:
    """Print the report."""
    report = build_report(get_settings(), _topology(args), prefix=args.prefix)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            console.print(f"{k:>22}: {v}")
    return 0 if report["balanced"] else 1


def register(sub: Any) -> None:
    """Register the cascade sub-commands."""

    def add(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.add_argument(
            "--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)"
        )
        p.set_defaults(func=func)
        return p

    topics = sub.add_parser("topics", help="manage Kafka topics")
    tsub = topics.add_subparsers(dest="topics_command", required=True)
    create = tsub.add_parser("create", help="create the topology's topics")
    create.add_argument("--topology")
    create.set_defaults(func=cmd_topics_create)

    p = add("worker", cmd_worker, "run one tier worker")
    p.add_argument("tier")
    p.add_argument("--instance", help="stable instance id (default: host name)")
    p.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    p.add_argument(
        "--slowdown",
        type=float,
        default=1.0,
        help="drill: take this many times as long per batch as the model needs, to watch "
        "backpressure (phenocascade status shows the group's lag growing; nothing is dropped)",
    )
    add_metrics_port(p)

    p = add("joiner", cmd_joiner, "run the joiner (faust)")
    p.add_argument(
        "--instance",
        help="stable instance id (default: host name); give each joiner of one host its own",
    )
    p.add_argument(
        "--stall-exit-s",
        type=float,
        default=JOINER_STALL_EXIT_S,
        help="exit (status 75, for the supervisor to restart it) when a partition has had "
        "records waiting this long without a commit; 0: never (default: %(default)s)",
    )
    add_metrics_port(p)
    p = add("run", cmd_run, "run the whole cascade on this machine (restarts what dies)")
    add_metrics_port(p)
    p.add_argument(
        "--learning",
        action="store_true",
        help="also run the annotation loop: task sink, annotation app and retrainer",
    )
    p.add_argument(
        "--every",
        type=int,
        default=20,
        help="with --learning: retrain a tier per this many new annotations (default: 20)",
    )

    p = add("submit", cmd_submit, "submit image files or folders")
    p.add_argument("paths", nargs="+")
    p.add_argument("--study", default="default")
    p.add_argument("--specimen", default="")
    p.add_argument("--modality", default="")
    p.add_argument("--stain", default="")
    p.add_argument("--prefix", default="", help="prefix of the generated image ids")
    p.add_argument("--inline", action="store_true", help="send the bytes instead of the path")
    add_tiling_options(p)

    p = add("results", cmd_results, "show outputs")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--image")
    group.add_argument("--study")
    p.add_argument("--json", action="store_true")

    p = add("render", cmd_render, "render an output overlay")
    p.add_argument("image_id")
    p.add_argument("-o", "--output", required=True)

    p = add("report", cmd_report, "count submissions, outputs and dead letters")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--prefix", default="", help="only images whose id starts with this (one submission run)"
    )


def add_tiling_options(p: argparse.ArgumentParser) -> None:
    """Add ``--tile-size``, ``--tile-overlap`` and ``--level`` (how slides are tiled)."""
    defaults = Tiling()
    p.add_argument(
        "--tile-size",
        type=int,
        default=defaults.size,
        help="slides (pyramidal TIFFs, or TIFFs over PHENOCASCADE_MAX_IMAGE_PIXELS) are "
        "scored as tiles of this many pixels a side, of the level read (default: %(default)s)",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=defaults.overlap,
        help="least overlap of neighbouring tiles, in pixels: objects up to this size cut by "
        "a tile border are whole in a neighbour (default: %(default)s)",
    )
    p.add_argument(
        "--level",
        type=int,
        default=defaults.level,
        help="pyramid level of slides to score: 0 is full resolution, each level up is "
        "usually half as large (default: %(default)s)",
    )


def tiling_of(args: argparse.Namespace) -> Tiling:
    """Return the tiling that ``--tile-size``, ``--tile-overlap`` and ``--level`` ask for.

    Raises
    ------
    ValidationError
        If they are out of range (:class:`~phenocascade.streams.tiling.Tiling`).
    """
    return Tiling(size=args.tile_size, overlap=args.tile_overlap, level=args.level)
