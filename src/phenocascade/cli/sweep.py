"""``phenocascade sweep TIER`` (model selection) and ``phenocascade sweep show TIER``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phenocascade.config import Settings, TierSpec, Topology, get_settings, load_topology
from phenocascade.errors import ConfigError, InfraError, NotFoundError

if TYPE_CHECKING:
    from phenocascade.consumers.retrainer import Announcer, Outcome
    from phenocascade.data.registry import StoredDataset
    from phenocascade.recipes.sweep import SweepResult, TrialRecord

USAGE = """
  phenocascade sweep TIER --trials N --budget-minutes M [--dataset NAME] [--topology PATH]
                          [--storage URL] [--seed S] [--size {bootstrap,full}] [--device D]
                          [--max-train N] [--max-epochs E] [--no-publish]
  phenocascade sweep show TIER [--topology PATH] [--storage URL] [--json]"""

DESCRIPTION = """\
`sweep TIER` trains up to N models of a topology tier on its stored dataset (the tier's
`dataset:`, or --dataset), chosen by Optuna (TPE sampling, median pruning on the
validation curves) over the backends of the tier's kind, their backbones, input sizes,
learning rates, epochs and augmentation strength, and stops starting trials after M
minutes. Each trial is scored on the val split (gate: AUROC, classifier: mean AP,
detector: AP50). The best becomes a challenger: with no champion it becomes champion,
otherwise it is promoted only if its metric on the val split is strictly above the
champion's, as in retraining. The decision is recorded in the lineage tables and a
promotion announced on the models topic (Cassandra and Kafka must answer), or, with
--no-publish, only CHAMPION is set and workers load it when they start. Trials are stored in an
Optuna study named after the tier's artifact (default storage sqlite:///<home>/sweeps.db);
a second sweep continues it.

`sweep show TIER` lists every trial of that study: number, state (complete, pruned,
failed), parameters, validation metric and seconds, and marks the best. To list the
trials of a tier named "show", write `sweep show show`."""


def _topology(args: argparse.Namespace) -> Topology:
    path = args.topology or get_settings().topology
    return load_topology(Path(path) if path else None)


def register(subparsers: Any) -> None:
    """Add the ``sweep`` sub-command (``sweep TIER`` and ``sweep show TIER``)."""
    parser = subparsers.add_parser(
        "sweep",
        help="select a tier's model with Optuna and promote the best; `sweep show` lists trials",
        usage=USAGE,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("words", nargs="+", metavar="TIER | show TIER", help="what to do")
    parser.add_argument(
        "--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY, else the packaged one)"
    )
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default sqlite:///<home>/sweeps.db)"
    )
    run = parser.add_argument_group("sweep TIER")
    run.add_argument("--trials", type=int, default=None, help="most trials of this run")
    run.add_argument(
        "--budget-minutes",
        type=float,
        default=None,
        help="start no trial after this many minutes; one still training then stops at its "
        "next epoch",
    )
    run.add_argument(
        "--dataset", default=None, help="stored dataset (default: the tier's `dataset:`)"
    )
    run.add_argument("--seed", type=int, default=0, help="seeds the sampler and every trial")
    run.add_argument("--size", choices=("bootstrap", "full"), default="bootstrap")
    run.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    run.add_argument("--max-train", type=int, default=None, help="cap on training samples")
    run.add_argument("--max-epochs", type=int, default=None, help="cap on every trial's epochs")
    run.add_argument(
        "--no-publish",
        action="store_true",
        help="offline: set CHAMPION only; no lineage record, no ModelPromoted event",
    )
    show = parser.add_argument_group("sweep show TIER")
    show.add_argument("--json", action="store_true", help="print the trials as JSON")
    parser.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    words = list(args.words)
    if len(words) == 2 and words[0] == "show":
        run_only = {
            "--trials": args.trials,
            "--budget-minutes": args.budget_minutes,
            "--dataset": args.dataset,
            "--max-train": args.max_train,
            "--no-publish": args.no_publish or None,
        }
        given = [flag for flag, value in run_only.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)}: options of `sweep TIER`, not `sweep show`")
        return _show(args, words[1])
    if len(words) != 1:
        raise ConfigError(
            f"`phenocascade sweep {' '.join(words)}`: give one tier (`sweep TIER --trials N "
            "--budget-minutes M`) or `sweep show TIER`"
        )
    if args.json:
        raise ConfigError("--json is an option of `sweep show TIER`")
    if args.trials is None or args.budget_minutes is None:
        raise ConfigError(
            f"`phenocascade sweep {words[0]}` needs --trials N and --budget-minutes M"
        )
    return _run(args, words[0])


def _run(args: argparse.Namespace, tier: str) -> int:
    import optuna
    from rich.console import Console

    from phenocascade.recipes import own_tier
    from phenocascade.recipes.sweep import sweep_tier

    settings = get_settings()
    topology = _topology(args)
    topology.tier(tier)  # an unknown tier is refused before anything else
    own = own_tier(tier, settings=settings, topology=topology, dataset=args.dataset)
    if own is None:
        raise ConfigError(
            f"tier {tier!r} has no stored dataset to sweep on: give it one (`dataset:` in the "
            "topology, or --dataset NAME of `phenocascade data list`)"
        )
    spec, stored = own
    announcer = None if args.no_publish else _announcer(settings, topology)
    console = Console(highlight=False, soft_wrap=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours
    result = sweep_tier(
        spec,
        stored,
        settings=settings,
        trials=args.trials,
        budget_minutes=args.budget_minutes,
        storage=args.storage,
        seed=args.seed,
        size=args.size,
        device=args.device,
        max_train=args.max_train,
        max_epochs=args.max_epochs,
        on_trial=lambda trial, best: console.print(_trial_line(trial, best)),
    )
    if result.best is None:
        console.print(f"no trial completed; nothing to promote (`phenocascade sweep show {tier}`)")
        return 1
    outcome = promote_best(
        result, spec, stored, settings=settings, device=args.device, announcer=announcer
    )
    console.print(_outcome_line(outcome, result, announcer is not None, topology))
    return 0


def _announcer(settings: Settings, topology: Topology) -> Announcer:
    """Connect to Cassandra and Kafka before any training, so a sweep never ends unable to."""
    from phenocascade.consumers.retrainer import Announcer
    from phenocascade.store.cassandra import connect
    from phenocascade.streams.kafka import create_topics, plain_producer
    from phenocascade.streams.serde import EventCodec

    hint = "start them (`phenocascade infra up`) or sweep offline with --no-publish"
    try:
        session = connect(settings.cassandra)
    except InfraError as exc:
        raise InfraError(f"{exc}; {hint}") from exc
    try:
        # The promotion goes to the topology's models topic: a sweep before the first
        # `phenocascade run` creates the topics as `run` does.
        create_topics(settings.kafka, topology, timeout_s=10)
    except InfraError as exc:
        raise InfraError(f"{exc}; {hint}") from exc
    return Announcer(session, plain_producer(settings.kafka), topology.models_topic, EventCodec())


def promote_best(
    result: SweepResult,
    spec: TierSpec,
    stored: StoredDataset,
    *,
    settings: Settings,
    device: str,
    announcer: Announcer | None,
) -> Outcome:
    """Put a sweep's best trial through the champion/challenger promotion of retraining.

    See :func:`promote_version` (trigger ``"sweep"``, the sweep's metric). A rejected
    trial's artifact is kept.

    Returns
    -------
    Outcome
        The decision, as a lineage record.
    """
    if result.best is None or result.best.version is None:
        raise ValueError("promote_best needs a sweep whose best trial saved an artifact")
    return promote_version(
        result.best.version,
        spec,
        stored,
        metric=result.metric,
        trigger="sweep",
        settings=settings,
        device=device,
        announcer=announcer,
    )


def promote_version(
    version: str,
    spec: TierSpec,
    stored: StoredDataset,
    *,
    metric: str,
    trigger: str,
    settings: Settings,
    device: str,
    announcer: Announcer | None,
) -> Outcome:
    """Put a saved version through the champion/challenger promotion of retraining.

    The version and the tier's champion (if any) are both evaluated on the dataset's val
    split, and :func:`~phenocascade.consumers.retrainer.decide` decides with ``metric``;
    :func:`~phenocascade.consumers.retrainer.apply_decision` sets ``CHAMPION`` and, with
    an ``announcer``, records the lineage (``trigger``) and publishes ``ModelPromoted``.

    Returns
    -------
    Outcome
        The decision, as a lineage record.
    """
    from phenocascade.consumers.retrainer import Outcome, apply_decision, decide
    from phenocascade.models.base import champion_version

    started = datetime.now(tz=UTC)
    parent = champion_version(settings.artifacts, spec.artifact) or ""
    metrics = _val_metrics(spec, stored, settings, version, device)
    parent_metrics = _val_metrics(spec, stored, settings, parent, device) if parent else {}
    decision, reason = decide(
        metric=metric, metrics=metrics, parent_metrics=parent_metrics, parent_version=parent
    )
    outcome = Outcome(
        tier=spec.name,
        version=version,
        parent_version=parent,
        decision=decision,
        reason=reason,
        trigger=trigger,
        metric=metric,
        metrics=metrics,
        parent_metrics=parent_metrics,
        annotation_ids=[],
        excluded={},
        started_at=started,
        finished_at=datetime.now(tz=UTC),
    )
    apply_decision(
        outcome, artifacts=settings.artifacts, artifact=spec.artifact, announcer=announcer
    )
    return outcome


def _val_metrics(
    spec: TierSpec, stored: StoredDataset, settings: Settings, version: str, device: str
) -> dict[str, float]:
    """Summary metrics of a saved version on the val split (report under ``<home>/sweeps``)."""
    from phenocascade.models.evaluate import summary_metrics
    from phenocascade.recipes.own import evaluate_own_tier

    out = settings.home / "sweeps" / spec.artifact / version / "val"
    report = evaluate_own_tier(
        spec, stored, settings=settings, out_dir=out, version=version, device=device, split="val"
    )
    return summary_metrics(report)


def _params(params: dict[str, Any]) -> str:
    """``backend=... lr=...``: parameter names without their ``<backend>.`` prefix."""
    shown = []
    for name, value in params.items():
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
        shown.append(f"{name.rsplit('.', 1)[-1]}={text}")
    return " ".join(shown)


def _trial_line(trial: TrialRecord, best: TrialRecord | None) -> str:
    seconds = f"{trial.seconds:.1f} s" if trial.seconds is not None else "-"
    if trial.state == "complete" and trial.metric is not None:
        status = f"complete  {trial.metric:.4f}"
        if best is trial:
            status += " (best so far)"
    elif trial.state == "pruned":
        status = f"pruned after {trial.epochs} epochs"
    else:
        status = f"{trial.state}: {trial.error or 'no reason recorded'}"
    return f"trial {trial.number:>3}  {status}  {seconds}  {_params(trial.params)}"


def _outcome_line(
    outcome: Outcome, result: SweepResult, published: bool, topology: Topology
) -> str:
    tier, version = outcome.tier, outcome.version
    if outcome.decision != "promoted":
        return (
            f"{tier}: champion {outcome.parent_version} kept ({outcome.reason}); the best "
            f"trial's artifact stays at {result.folder}"
        )
    if published:
        return (
            f"{tier}: {version} is champion ({outcome.reason}); ModelPromoted went to "
            f"{topology.models_topic}, workers switch to it"
        )
    return (
        f"{tier}: {version} is champion ({outcome.reason}); nothing was published "
        "(--no-publish): workers load it when they (re)start"
    )


def _show(args: argparse.Namespace, tier: str) -> int:
    from rich.console import Console
    from rich.table import Table

    from phenocascade.models.base import champion_version
    from phenocascade.recipes.sweep import SWEEPS_DB, default_storage, study_trials

    settings = get_settings()
    spec = _topology(args).tier(tier)
    if args.storage is None and not (settings.home / SWEEPS_DB).is_file():
        raise NotFoundError(
            f"no sweeps under {settings.home}: run `phenocascade sweep {tier} --trials N "
            "--budget-minutes M` first"
        )
    storage = args.storage or default_storage(settings)
    trials, best, metric = study_trials(storage, spec.artifact)
    champion = champion_version(settings.artifacts, spec.artifact)
    marks = {t.number: _marks(t, best, champion) for t in trials}
    if args.json:
        rows = [
            {**dataclasses.asdict(t), **{m: m in marks[t.number] for m in ("best", "champion")}}
            for t in trials
        ]
        print(json.dumps({"study": spec.artifact, "metric": metric, "trials": rows}, indent=2))
        return 0
    table = Table(title=f"sweep {spec.artifact} ({metric} on the val split)")
    for column in ("#", "state", metric, "seconds", "epochs", "parameters", ""):
        table.add_column(column)
    for t in trials:
        table.add_row(
            str(t.number),
            t.state,
            f"{t.metric:.4f}" if t.metric is not None else "-",
            f"{t.seconds:.1f}" if t.seconds is not None else "-",
            str(t.epochs),
            _params(t.params) + (f"  ({t.error})" if t.error else ""),
            ", ".join(marks[t.number]),
        )
    Console().print(table)
    return 0


def _marks(trial: TrialRecord, best: int | None, champion: str | None) -> list[str]:
    """Return ``"best"`` (of the study) and ``"champion"`` (its artifact is) where they apply."""
    marks = ["best"] if trial.number == best else []
    if champion is not None and trial.version == champion:
        marks.append("champion")
    return marks
