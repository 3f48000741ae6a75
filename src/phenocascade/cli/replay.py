"""Sub-commands ``replay``, ``diff``, ``images prune`` and ``rescorer``: re-score stored images.

``replay`` publishes images kept in the image store (:mod:`phenocascade.store.images`) to
the submitted topic again, under their own ids, so the tiers score them with the models
they serve now; the joiner adds an output under the new versions and keeps the old ones.
``diff`` reports what changed between the outputs of two sets of model versions.
``rescorer`` does this by itself after each promotion for the images still waiting for an
expert (:mod:`phenocascade.consumers.rescorer`).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from phenocascade.cli.cascade import console
from phenocascade.cli.metrics import add_metrics_port, start_metrics
from phenocascade.config import Settings, Topology, get_settings, load_topology
from phenocascade.consumers.rescorer import RESCORE_ENV, Rescorer, RescoreSettings
from phenocascade.consumers.resubmit import plan_replay, publish
from phenocascade.errors import ConfigError, NotFoundError, ValidationError
from phenocascade.models.base import champion_version
from phenocascade.store.cassandra import all_outputs, connect, get_outputs
from phenocascade.store.images import (
    INLINE_DAYS_ENV,
    STORE_ENV,
    ImageStore,
    StoredImage,
    configured_store,
)
from phenocascade.store.output_diff import ImageChange, diff_outputs, parse_versions
from phenocascade.streams import events
from phenocascade.ui.validation import IMAGE_ID_MAX_LEN, check_image_id


def _topology(args: argparse.Namespace, settings: Settings) -> Topology:
    path = args.topology or settings.topology
    return load_topology(Path(path) if path else None)


def _store(settings: Settings) -> ImageStore:
    store = configured_store(settings.home)
    if store is None:
        raise ConfigError(
            f"the image store is off ({STORE_ENV}=off), so no image can be replayed; set it "
            "to the folder or URL submissions were kept in"
        )
    return store


# -- selection -----------------------------------------------------------------------------
def parse_time(text: str, option: str) -> int:
    """Return epoch milliseconds of an ISO 8601 date or time; without a zone, UTC.

    Raises
    ------
    ValidationError
        If ``text`` is not one.
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValidationError(
            f"{option} {text!r} is not an ISO 8601 date or time, such as 2026-11-30 or "
            "2026-11-30T14:00:00+01:00 (UTC when no zone is given)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return events.to_epoch_ms(when)


def read_image_ids(path: Path) -> list[str]:
    """Return the image ids listed in a file: one a line, blank lines and ``#`` lines skipped.

    Raises
    ------
    ValidationError
        If the file cannot be read as UTF-8 text, lists no id, or a line is no image id.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValidationError(f"--images {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValidationError(f"--images {path}: cannot be read ({reason})") from None
    ids: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        image_id = line.strip()
        if not image_id or image_id.startswith("#"):
            continue
        try:
            check_image_id(image_id)
        except ValidationError:
            raise ValidationError(
                f"--images {path}, line {number}: {image_id[:40]!r} is not an image id "
                f"(1 to {IMAGE_ID_MAX_LEN} characters, none a control one)"
            ) from None
        ids.append(image_id)
    if not ids:
        raise ValidationError(f"--images {path} lists no image id (one a line)")
    return list(dict.fromkeys(ids))


def select_images(store: ImageStore, args: argparse.Namespace) -> tuple[list[StoredImage], str]:
    """Return the stored images ``--study``, ``--since``/``--until`` or ``--images`` names.

    Also returns a phrase naming the selection, for messages.

    Raises
    ------
    ValidationError
        If an option's value is invalid, or ``--images`` lists ids the store lacks.
    NotFoundError
        If the selection is empty.
    """
    if args.images is not None:
        wanted = read_image_ids(Path(args.images))
        found = {i: store.get(i) for i in wanted}
        missing = [i for i, image in found.items() if image is None]
        if missing:
            listed = ", ".join(missing[:5]) + (
                f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            )
            raise ValidationError(
                f"--images {args.images}: {len(missing)} of {len(wanted)} ids are not in the "
                f"image store {store.url}: {listed}"
            )
        return [image for image in found.values() if image is not None], f"listed in {args.images}"
    if args.study is not None:
        if not args.study.strip():
            raise ValidationError("--study is empty; name the study to replay")
        chosen = [i for i in store.images() if i.study == args.study]
        what = f"of study {args.study!r}"
    else:
        since = parse_time(args.since, "--since")
        until = parse_time(args.until, "--until") if args.until else events.now_ms()
        if since >= until:
            raise ValidationError(
                f"--since {args.since} is not before --until {args.until or 'now'}"
            )
        chosen = [i for i in store.images() if since <= i.submitted_at < until]
        what = f"submitted from {args.since} until {args.until or 'now'}"
    if not chosen:
        raise NotFoundError(
            f"no image {what} in the image store {store.url} (only images submitted while "
            "it was on can be replayed)"
        )
    return sorted(chosen, key=lambda i: (i.submitted_at, i.image_id)), what


def needs_rescoring(
    outputs: Sequence[Mapping[str, Any]], champions: Mapping[str, str]
) -> bool | None:
    """Whether an image's newest output came from a model other than a tier's champion.

    Parameters
    ----------
    outputs : Sequence of Mapping
        The image's stored outputs, any order.
    champions : Mapping of str to str
        ``{tier: champion version}`` of the tiers asked about.

    Returns
    -------
    bool or None
        ``None`` if it has no output; ``True`` if its newest output names one of those
        tiers with another version (a tier that did not see the image, such as a branch
        behind a gate that skipped it, counts as current).
    """
    if not outputs:
        return None
    newest = max(outputs, key=lambda o: o["produced_at"])
    versions = newest["model_versions"]
    return any(t in versions and versions[t] != v for t, v in champions.items())


def stale_only(
    settings: Settings, topology: Topology, images: Sequence[StoredImage], tiers: Sequence[str]
) -> tuple[list[StoredImage], int, int]:
    """Keep the images that one of ``tiers`` scored with another model than its champion.

    Returns the images kept, how many are current and how many have no output yet.

    Raises
    ------
    ConfigError
        If a tier is not in the topology or has no champion.
    """
    champions: dict[str, str] = {}
    for name in dict.fromkeys(tiers):
        version = champion_version(settings.artifacts, topology.tier(name).artifact)
        if version is None:
            raise ConfigError(
                f"tier {name!r} has no champion under {settings.artifacts}: nothing to "
                "re-score its images with"
            )
        champions[name] = version
    session = connect(settings.cassandra)
    kept: list[StoredImage] = []
    current = unscored = 0
    for image in images:
        verdict = needs_rescoring(get_outputs(session=session, image_id=image.image_id), champions)
        if verdict is None:
            unscored += 1
        elif verdict:
            kept.append(image)
        else:
            current += 1
    return kept, current, unscored


def cmd_replay(args: argparse.Namespace) -> int:
    """Publish stored images again so that the current champions score them."""
    if args.until is not None and args.since is None:
        raise ValidationError("--until needs --since")
    settings = get_settings()
    topology = _topology(args, settings)
    store = _store(settings)
    images, what = select_images(store, args)
    note = ""
    if args.tiers:
        images, current, unscored = stale_only(settings, topology, images, args.tiers)
        note = (
            f"; {current} already scored by the champions of {', '.join(args.tiers)} and "
            f"{unscored} without an output left as they are"
        )
    plan = plan_replay(settings, store, images)
    if not args.dry_run:
        publish(settings, topology.submitted_topic, plan.records)
    ways = ", ".join(f"{n} {how}" for how, n in sorted(plan.carried.items())) or "none"
    console.print(
        f"{'would replay' if args.dry_run else 'replayed'} {plan.images} images {what} "
        f"to {topology.submitted_topic} ({ways}){note}"
    )
    for image_id, reason in plan.left_out.items():
        console.print(f"[yellow]left out {image_id}: {reason}")
    return 1 if plan.left_out and not plan.records else 0


# -- diff ----------------------------------------------------------------------------------
def _changes_table(changes: Sequence[ImageChange]) -> Table:
    table = Table(title=f"{len(changes)} images changed")
    for col in ("image", "study", "changed", "routes", "labels", "boxes"):
        table.add_column(col)
    for c in changes:
        routes = [f"{t}: {a or '-'}->{b or '-'}" for t, (a, b) in c.routes.items()]
        if c.status:
            routes.insert(0, f"{c.status[0]}->{c.status[1]}")
        labels = [f"+{x}" for x in c.labels_added] + [f"-{x}" for x in c.labels_removed]
        boxes = _count_boxes("+", c.boxes_added) + _count_boxes("-", c.boxes_removed)
        table.add_row(
            c.image_id,
            c.study,
            ", ".join(c.what),
            " ".join(routes) or "-",
            " ".join(labels) or "-",
            " ".join(boxes) or "-",
        )
    return table


def _count_boxes(sign: str, boxes: Sequence[Mapping[str, Any]]) -> list[str]:
    counts: dict[str, int] = {}
    for box in boxes:
        counts[box["label"]] = counts.get(box["label"], 0) + 1
    return [f"{sign}{n} {label}" for label, n in sorted(counts.items())]


def cmd_diff(args: argparse.Namespace) -> int:
    """Report what changed between the outputs of two sets of model versions."""
    before = parse_versions(args.from_versions, option="--from")
    after = parse_versions(args.to_versions, option="--to")
    if before == after:
        raise ValidationError("--from and --to name the same versions; nothing to compare")
    settings = get_settings()
    session = connect(settings.cassandra)
    diff = diff_outputs(all_outputs(session=session, study=args.study), before, after)
    where = f" of study {args.study!r}" if args.study else ""
    if not (diff.compared or diff.only_from or diff.only_to):
        raise NotFoundError(
            f"no output{where} was made with --from {args.from_versions} or --to "
            f"{args.to_versions}; `phenocascade results --json` shows each output's "
            "model_versions"
        )
    if args.json:
        print(
            json.dumps(
                {"from": before, "to": after, "study": args.study, **diff.as_dict()}, indent=2
            )
        )
        return 0
    if diff.changed:
        console.print(_changes_table(diff.changed))
    console.print(
        f"{diff.compared} images{where} have outputs under both: {len(diff.changed)} changed, "
        f"{diff.compared - len(diff.changed)} unchanged; {len(diff.only_from)} only under "
        f"--from (not re-scored yet), {len(diff.only_to)} only under --to"
    )
    return 0


# -- images prune --------------------------------------------------------------------------
def cmd_images_prune(args: argparse.Namespace) -> int:
    """Drop expired inline images and unreferenced blobs from the image store."""
    settings = get_settings()
    store = _store(settings)
    report = store.prune(events.now_ms(), dry_run=args.dry_run)
    kept = "for good" if store.inline_days is None else f"{store.inline_days:g} days"
    verb = "would remove" if args.dry_run else "removed"
    console.print(
        f"{verb} {len(report.expired_images)} expired inline images and {report.blobs} "
        f"blobs ({report.bytes} bytes) from {store.url} (inline images are kept {kept}, "
        f"{INLINE_DAYS_ENV})"
    )
    return 0


# -- rescorer ------------------------------------------------------------------------------
def cmd_rescorer(args: argparse.Namespace) -> int:
    """Re-score the unanswered annotation images after each promotion, until SIGTERM/SIGINT."""
    rescore = RescoreSettings.from_env()
    if not rescore.on_promotion:
        raise ConfigError(
            f"{RESCORE_ENV} is off, so promotions re-score nothing; set it to 1 to run the rescorer"
        )
    settings = get_settings()
    rescorer = Rescorer(
        settings=settings,
        topology=_topology(args, settings),
        store=_store(settings),
        wait_s=rescore.wait_s,
    )
    start_metrics(args, settings, {rescorer.group: [rescorer.topology.models_topic]})
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    done = rescorer.run(stop)
    logging.getLogger(__name__).info(
        "rescorer stopped after %d promotions: %d images re-scored, %d tasks superseded",
        len(done),
        sum(len(job.sent) for job in done),
        sum(len(job.superseded) for job in done),
    )
    return 0


def register(sub: Any) -> None:
    """Register ``replay``, ``diff``, ``images`` and ``rescorer``."""
    p = sub.add_parser(
        "replay", help="re-score stored images with the current champions (same ids, same topics)"
    )
    p.add_argument("--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="every stored image of this study")
    which.add_argument(
        "--since", help="images submitted at or after this ISO 8601 time (UTC without a zone)"
    )
    which.add_argument("--images", metavar="FILE", help="a file of image ids, one a line")
    p.add_argument("--until", help="with --since: submitted before this time (default: now)")
    p.add_argument(
        "--tiers",
        nargs="+",
        metavar="TIER",
        help="only images whose output one of these tiers made with a model other than its "
        "current champion (images without an output are left out)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="say what would be replayed; send nothing"
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("diff", help="what changed between the outputs of two model versions sets")
    p.add_argument(
        "--from", dest="from_versions", required=True, metavar="VERSIONS", help="e.g. minority=v1"
    )
    p.add_argument(
        "--to", dest="to_versions", required=True, metavar="VERSIONS", help="e.g. minority=v2"
    )
    p.add_argument("--study", help="only this study's images (default: every image)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("images", help="the image store that replay reads")
    isub = p.add_subparsers(dest="images_command", required=True)
    prune = isub.add_parser(
        "prune", help="drop inline images past their retention and bytes no image uses"
    )
    prune.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    prune.set_defaults(func=cmd_images_prune)

    p = sub.add_parser(
        "rescorer",
        help=f"after each promotion, re-score the images no expert has answered ({RESCORE_ENV})",
        description="Read ModelPromoted events; re-publish from the image store the images "
        "of the tier's unanswered annotation tasks, follow them until the new model's "
        "output is in, and withdraw the tasks of those it decides on its own.",
    )
    p.add_argument("--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)")
    add_metrics_port(p, "rescorer")
    p.set_defaults(func=cmd_rescorer)
