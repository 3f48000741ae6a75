"""``phenocascade retrainer``, ``phenocascade retrain`` and ``phenocascade lineage``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from phenocascade.cli.metrics import add_metrics_port, start_metrics
from phenocascade.config import Topology, get_settings, load_topology

log = logging.getLogger(__name__)


def _topology(args: argparse.Namespace) -> Topology:
    path = args.topology or get_settings().topology
    return load_topology(Path(path) if path else None)


def _add_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY or packaged)"
    )
    parser.add_argument("--size", choices=("bootstrap", "full"), default="bootstrap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument(
        "--max-train", type=int, default=None, help="cap on base training samples (recipe's)"
    )
    parser.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (recipe's)")
    parser.add_argument(
        "--config",
        type=json.loads,
        default={},
        help="backend arguments replacing the recipe's, as JSON, e.g. '{\"input_size\": 96}'",
    )
    parser.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="seeded subset of the val split used as the fixed holdout (default: all of it)",
    )
    parser.add_argument(
        "--keep-rejected",
        action="store_true",
        help="keep the artifact folders of challengers that are not promoted (default: "
        "deleted; their lineage records keep their metrics)",
    )


def _retrainer(args: argparse.Namespace, every: int | None) -> Any:
    from phenocascade.consumers.retrainer import Retrainer
    from phenocascade.learning import Budget, RecipeTrainer

    settings = get_settings()
    budget = Budget(
        size=args.size,
        seed=args.seed,
        max_train=args.max_train,
        max_epochs=args.max_epochs,
        config=dict(args.config),
        max_holdout=args.holdout,
    )
    topology = _topology(args)
    return Retrainer(
        settings=settings,
        topology=topology,
        trainer=RecipeTrainer(settings, budget=budget, device=args.device, topology=topology),
        every=every,
        tiers=args.tiers,
        keep_rejected=args.keep_rejected,
    )


def cmd_retrainer(args: argparse.Namespace) -> int:
    """Run the retraining consumer until SIGTERM/SIGINT."""
    retrainer = _retrainer(args, args.every)
    start_metrics(
        args, retrainer.settings, {retrainer.group: [retrainer.topology.annotations_topic]}
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stats = retrainer.run(stop, until_caught_up=args.until_caught_up)
    log.info(
        "retrainer stopped: %d messages, %d new annotations, %d dead letters, attempts %s",
        stats.messages,
        stats.stored,
        stats.dead_letters,
        [(o.tier, o.version, o.decision) for o in stats.outcomes],
    )
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """Retrain one tier now; exit 0 if promoted, 1 if rejected or failed."""
    args.tiers = [args.tier]
    retrainer = _retrainer(args, None)
    if not args.no_sync:
        read = retrainer.sync()
        log.info("stored the %d annotations of the annotations topic (idempotent)", read)
    outcome = retrainer.retrain(args.tier, trigger="manual")
    print(json.dumps(outcome.record(), indent=2, default=str))
    return 0 if outcome.decision == "promoted" else 1


def cmd_lineage(args: argparse.Namespace) -> int:
    """Print lineage records of a tier (newest first) or of one version."""
    from phenocascade.store.cassandra import connect
    from phenocascade.store.lineage import get_lineage, lineage_by_tier

    session = connect(get_settings().cassandra)
    if args.version:
        found = get_lineage(session=session, version=args.version)
        records = [found] if found else []
    else:
        records = lineage_by_tier(session=session, tier=args.tier, limit=args.limit)
    if args.json:
        print(json.dumps(records, indent=2, default=str))
        return 0 if records else 1
    for r in records:
        metric = r["metric"]
        print(
            f"{r['finished_at']:%Y-%m-%d %H:%M:%S} {r['tier']} {r['version']} <- "
            f"{r['parent_version'] or '-'} {r['decision']}: {metric} "
            f"{r['metrics'].get(metric, float('nan')):.4f} vs "
            f"{r['parent_metrics'].get(metric, float('nan')):.4f}, "
            f"{len(r['annotation_ids'])} annotations, {len(r['excluded'])} left out"
        )
    return 0 if records else 1


def register(sub: Any) -> None:
    """Register the active-learning sub-commands."""
    p = sub.add_parser(
        "retrainer",
        help="run the retraining consumer (annotations -> challengers -> promotions)",
        description="Store every Annotation event in Cassandra; when a tier has EVERY new "
        "annotations, train a challenger on the tier's training data plus all its "
        "annotations, score it and the champion on the fixed holdout (the val split) and "
        "promote it (CHAMPION + ModelPromoted on the models topic) if strictly better. "
        "On start, a champion the models topic does not announce is announced again.",
    )
    _add_budget(p)
    p.add_argument(
        "--every",
        type=int,
        default=None,
        help="retrain a tier after this many new annotations (default: only on demand)",
    )
    p.add_argument("--tiers", nargs="+", default=None, help="tiers to retrain (default: all)")
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="stop once the topic is read to its end and no retraining is running or due",
    )
    add_metrics_port(p, "retrainer")
    p.set_defaults(func=cmd_retrainer)

    p = sub.add_parser(
        "retrain",
        help="retrain one tier now on all its annotations; promote if better",
        description="Store the annotations topic in Cassandra (idempotent), train a "
        "challenger, compare it with the champion on the fixed holdout and promote it if "
        "strictly better. Prints the lineage record; exit status 0 if promoted, 1 if not.",
    )
    p.add_argument("tier")
    _add_budget(p)
    p.add_argument(
        "--no-sync", action="store_true", help="use only the annotations already in Cassandra"
    )
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("lineage", help="show where trained versions came from")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--tier", help="records of this tier, newest first")
    group.add_argument("--version", help="the record of one version")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_lineage)
