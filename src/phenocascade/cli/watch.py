"""Sub-command ``watch``: publish every image a scanner finishes writing in a folder.

Slides are published as their tiles, cut as ``submit`` cuts them (``--tile-size``,
``--tile-overlap``, ``--level``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from phenocascade.cli.cascade import add_tiling_options, tiling_of
from phenocascade.config import Settings, get_settings, load_topology
from phenocascade.consumers.watcher import FolderWatcher, WatchConfig
from phenocascade.consumers.watching import DEFAULT_PATTERNS, Ledger, read_status
from phenocascade.domain import ImageMeta
from phenocascade.errors import NotFoundError, PathNotAllowedError, ValidationError
from phenocascade.imaging import resolve_under_roots
from phenocascade.store.images import configured_store
from phenocascade.streams.ingest import TransactionalPublisher


def state_dir(settings: Settings, folder: Path, topic: str, name: str | None) -> Path:
    """Return the watcher's state folder, ``<home>/watch/<name>``.

    The default name is the folder's name plus a hash of its path and the topic, so each
    folder and topic pair keeps its own state.
    """
    if name is None:
        digest = hashlib.sha1(f"{folder}|{topic}".encode()).hexdigest()[:8]
        name = f"{folder.name}-{digest}"
    if not name or "/" in name or name.startswith("."):
        raise ValidationError(f"--name {name!r} must be a plain folder name")
    return settings.home / "watch" / name


def _folder(settings: Settings, raw: str) -> Path:
    roots = settings.roots()
    try:
        folder = resolve_under_roots(raw, roots)
    except PathNotAllowedError:
        raise PathNotAllowedError(
            f"{raw} is outside the allowed roots {[str(r) for r in roots]}; add it (or a "
            "folder above it) to PHENOCASCADE_ALLOWED_ROOTS to watch it"
        ) from None
    if not folder.is_dir():
        raise ValidationError(f"{raw} is not a folder; watch a scanner's output folder")
    return folder


def _print_status(state: Path) -> int:
    status = read_status(state / "status.json")
    if status is None:
        raise NotFoundError(f"no watcher has run with the state in {state}")
    age = time.time() - status["updated_at"]
    alive = status["running"] and age < 10
    print(json.dumps({**status, "alive": alive, "age_s": round(age, 1)}, indent=2))
    return 0 if alive else 1


def cmd_watch(args: argparse.Namespace) -> int:
    """Watch a folder until SIGTERM/SIGINT, or print a running watcher's status."""
    settings = get_settings()
    topology = load_topology(Path(args.topology) if args.topology else settings.topology)
    folder = _folder(settings, args.folder)
    topic = topology.submitted_topic
    state = state_dir(settings, folder, topic, args.name)
    if args.status:
        return _print_status(state)
    config = WatchConfig(
        folder=folder,
        meta=ImageMeta(study=args.study, scanner=args.scanner, stain=args.stain),
        patterns=tuple(args.pattern) if args.pattern else DEFAULT_PATTERNS,
        settle_s=args.settle_s,
        marker=args.marker,
        poll=args.poll,
        queue_max=args.queue_max,
        inline=args.inline,
        max_inline_bytes=settings.max_inline_bytes,
        prefix=args.prefix,
        report_s=args.report_s,
        tiling=tiling_of(args),
        max_image_pixels=settings.max_image_pixels,
    )
    store = configured_store(settings.home)
    ledger = Ledger(state, topic)
    publisher = TransactionalPublisher(
        settings.kafka, topic, f"phenocascade-watch-{state.name}", timeout_s=args.kafka_timeout_s
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        FolderWatcher(config, publisher, ledger, state / "status.json", store).run(stop)
    finally:
        ledger.close()
    return 0


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
        return value

    return parse


def register(sub: Any) -> None:
    """Register the ``watch`` sub-command."""
    p = sub.add_parser(
        "watch",
        help="publish every image a scanner finishes writing in a folder (once per content)",
    )
    p.add_argument("folder", help="folder to watch (recursively), under an allowed root")
    p.add_argument("--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)")
    p.add_argument("--study", default="default")
    p.add_argument("--scanner", default="", help="scanner name recorded with every image")
    p.add_argument("--stain", default="")
    p.add_argument(
        "--pattern",
        action="append",
        help=f"file name glob of images (and of OME-Zarr folders); repeatable (default: "
        f"{' '.join(DEFAULT_PATTERNS)})",
    )
    p.add_argument(
        "--settle-s",
        type=_positive(float),
        default=2.0,
        help="a file is complete once its size and mtime are unchanged this long (default: 2)",
    )
    p.add_argument(
        "--marker",
        help="a file is complete when FILE+SUFFIX or STEM+SUFFIX exists (e.g. .done), "
        "and only then",
    )
    p.add_argument("--poll", action="store_true", help="poll the folder (network shares)")
    p.add_argument(
        "--queue-max",
        type=_positive(int),
        default=1000,
        help="most images held while Kafka is away; then new files wait on disk (default: 1000)",
    )
    p.add_argument(
        "--inline",
        action="store_true",
        help="send the bytes instead of the path (files up to PHENOCASCADE_MAX_INLINE_BYTES; "
        "larger ones, and slides, go by path)",
    )
    add_tiling_options(p)
    p.add_argument("--prefix", default="", help="prefix of the image ids (content hashes)")
    p.add_argument("--name", help="name of the watcher's state (default: from folder and topic)")
    p.add_argument(
        "--report-s",
        type=_positive(float),
        default=30.0,
        help="seconds between backlog log lines (default: 30)",
    )
    p.add_argument(
        "--kafka-timeout-s",
        type=_positive(float),
        default=10.0,
        help="how long one attempt to reach Kafka may take (default: 10)",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="print the status of the watcher of this folder and exit (1 if it is not running)",
    )
    p.set_defaults(func=cmd_watch)
