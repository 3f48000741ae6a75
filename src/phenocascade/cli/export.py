"""Sub-command ``export``: a study's outputs as COCO JSON, CSV or Parquet."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.console import Console

from phenocascade.config import get_settings
from phenocascade.data.exports import (
    Per,
    box_rows,
    coco_document,
    image_rows,
    summary,
    write_csv,
    write_parquet,
)
from phenocascade.errors import NotFoundError, ValidationError
from phenocascade.store.cassandra import connect, latest_outputs_of_study

console = Console(stderr=True)


def cmd_export(args: argparse.Namespace) -> int:
    """Export the newest output of every image of a study."""
    settings = get_settings()
    outputs = latest_outputs_of_study(session=connect(settings.cassandra), study=args.study)
    if not outputs:
        raise NotFoundError(f"no outputs for study {args.study!r}")
    dest = Path(args.output)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "coco":
        if args.per is not None:
            raise ValidationError("--per is for csv and parquet; COCO holds images and boxes")
        root = Path(args.images_root).resolve() if args.images_root else None
        doc = coco_document(outputs, study=args.study, images_root=root, roots=settings.roots())
        dest.write_text(json.dumps(doc, indent=1))
        facts = doc["info"]
        if facts["left_out"]:
            console.print(f"[yellow]{len(facts['left_out'])} images left out (see info.left_out)")
    else:
        per: Per = "box" if args.per == "box" else "image"
        rows = image_rows(outputs) if per == "image" else box_rows(outputs)
        facts = summary(outputs)
        if args.format == "csv":
            write_csv(rows, dest, per=per)
        else:
            write_parquet(rows, dest, per=per, metadata={"study": args.study, **facts})
    versions = ", ".join(f"{k} ({n})" for k, n in facts["model_versions"].items())
    console.print(
        f"wrote {facts['images']} images, {facts['boxes']} boxes of study {args.study!r} to "
        f"{dest}; model versions: {versions}"
    )
    return 0


def register(sub: Any) -> None:
    """Register the ``export`` sub-command."""
    p = sub.add_parser("export", help="export a study's outputs as COCO JSON, CSV or Parquet")
    p.add_argument("--study", required=True)
    p.add_argument("--format", required=True, choices=("coco", "csv", "parquet"))
    p.add_argument(
        "--per",
        choices=("image", "box"),
        help="csv and parquet: one row per image (default) or per box",
    )
    p.add_argument(
        "--images-root",
        help="coco: folder the file names are relative to (default: the deepest that holds all)",
    )
    p.add_argument("-o", "--output", required=True, help="file to write")
    p.set_defaults(func=cmd_export)
