"""``phenocascade data import|fetch|tiers``: annotations in, public originals, tier rule."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from phenocascade.config import get_settings
from phenocascade.data import fetch as fetch_module
from phenocascade.data import importers
from phenocascade.data.datasets import assign_tiers, shared_label_frequencies
from phenocascade.data.labelled import LabelledSet
from phenocascade.errors import ValidationError


def register(subparsers: Any) -> None:
    """Add ``data`` and its sub-commands to the top-level parser's subparsers."""
    data = subparsers.add_parser(
        "data",
        help="import annotations, fetch public datasets, show the tier assignment",
        description=(
            "Strict annotation importers (a malformed file is an error naming file and line), "
            "the checksum-verifying fetcher of the public originals, and the label-frequency "
            "rule that assigns labels to the majority or minority tier."
        ),
    )
    sub = data.add_subparsers(dest="data_command", required=True)

    imp = sub.add_parser("import", help="import annotations and print a summary")
    formats = imp.add_subparsers(dest="format", required=True)

    voc = formats.add_parser("voc", help="Pascal VOC XML folder")
    voc.add_argument("ann_dir", type=Path, help="folder of <id>.xml files")
    voc.add_argument("img_dir", type=Path, help="folder of the images")
    voc.add_argument("--ids-file", type=Path, help="text file of ids to import, one a line")
    voc.add_argument("--classes", help="comma-separated known classes (default: any found)")
    voc.add_argument("--keep", help="comma-separated classes to keep (default: all)")
    voc.add_argument(
        "--zero-based", action="store_true", help="boxes are 0-based half-open, not VOC 1-based"
    )
    _add_common(voc, degenerate=True)

    coco = formats.add_parser("coco", help="COCO detection JSON")
    coco.add_argument("json_path", type=Path, help="the COCO JSON file")
    coco.add_argument("img_dir", type=Path, help="folder that file_name is relative to")
    coco.add_argument("--classes", help="comma-separated known classes (default: the file's)")
    coco.add_argument("--keep", help="comma-separated classes to keep (default: all)")
    _add_common(coco, degenerate=True)

    yolo = formats.add_parser("yolo", help="YOLO txt labels")
    yolo.add_argument("labels_dir", type=Path, help="folder of <stem>.txt label files")
    yolo.add_argument("img_dir", type=Path, help="folder of the images")
    yolo.add_argument("--classes", required=True, help="comma-separated class names by index")
    _add_common(yolo, degenerate=True)

    masks = formats.add_parser("masks", help="instance label images (0 = background)")
    masks.add_argument("mask_dir", type=Path, help="folder of label images")
    masks.add_argument("img_dir", type=Path, help="folder of the images (same stems)")
    masks.add_argument("--label", default="nucleus", help="class of every instance")
    _add_common(masks, degenerate=False)

    table = formats.add_parser(
        "csv", help="boxes (image_id,x_min,y_min,x_max,y_max) or, with --column, image labels"
    )
    table.add_argument("csv_path", type=Path, help="the CSV file, with a header")
    table.add_argument("img_dir", type=Path, help="folder of <image_id> images")
    table.add_argument("--label", default="nucleus", help="class of every box")
    table.add_argument(
        "--column",
        action="append",
        metavar="NAME=V1,V2,...",
        help="import image labels NAME:V from this column instead of boxes (repeatable)",
    )
    _add_common(table, degenerate=True)

    folders = formats.add_parser("folders", help="one sub-folder of images per class")
    folders.add_argument("root", type=Path, help="folder of class folders")
    _add_common(folders, degenerate=False)

    get = sub.add_parser("fetch", help="download a public dataset, verifying its checksum")
    get.add_argument("name", help="dataset name in the manifest (dsb2018, bccd, bbbc006)")
    get.add_argument("--dest", type=Path, required=True, help="target folder")
    get.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept files whose SHA-256 is not pinned in the manifest",
    )
    get.set_defaults(func=_fetch)

    tiers = sub.add_parser(
        "tiers", help="assign the shared datasets' labels to the majority or minority tier"
    )
    tiers.add_argument(
        "--split", default="train", choices=("train", "val", "test"), help="split to count"
    )
    tiers.add_argument(
        "--minority-max-fraction",
        type=float,
        default=0.15,
        help="a label in at most this fraction of images is minority (default: %(default)s)",
    )
    tiers.add_argument("--json", action="store_true", help="print JSON")
    tiers.set_defaults(func=_tiers)


def _add_common(parser: argparse.ArgumentParser, *, degenerate: bool) -> None:
    parser.add_argument("--out", type=Path, help="also write the summary as JSON here")
    if degenerate:
        parser.add_argument(
            "--drop-degenerate",
            action="store_true",
            help="drop zero-area boxes and list them, instead of failing",
        )
    parser.set_defaults(func=_import)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _columns(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        if not sep or not name or not _names(values):
            raise ValidationError(f"--column {spec!r}: expected NAME=V1,V2,...")
        out[name] = _names(values) or []
    return out


def _load(args: argparse.Namespace) -> LabelledSet:
    fmt = args.format
    if fmt == "voc":
        ids = None
        if args.ids_file is not None:
            ids = [line.strip() for line in args.ids_file.read_text().splitlines() if line.strip()]
        return importers.import_voc(
            args.ann_dir,
            args.img_dir,
            ids=ids,
            classes=_names(args.classes),
            drop_degenerate=args.drop_degenerate,
            keep=_names(args.keep),
            one_based=not args.zero_based,
        )
    if fmt == "coco":
        return importers.import_coco(
            args.json_path,
            args.img_dir,
            classes=_names(args.classes),
            keep=_names(args.keep),
            drop_degenerate=args.drop_degenerate,
        )
    if fmt == "yolo":
        return importers.import_yolo(
            args.labels_dir,
            args.img_dir,
            _names(args.classes) or [],
            drop_degenerate=args.drop_degenerate,
        )
    if fmt == "masks":
        return importers.import_instance_masks(args.mask_dir, args.img_dir, args.label)
    if fmt == "csv":
        if args.column:
            return importers.import_csv_labels(args.csv_path, args.img_dir, _columns(args.column))
        return importers.import_csv_boxes(
            args.csv_path, args.img_dir, label=args.label, drop_degenerate=args.drop_degenerate
        )
    return importers.import_class_folders(args.root)


def _import(args: argparse.Namespace) -> int:
    summary = _load(args).summary()
    print(f"{summary['images']} images, {summary['unlabelled_images']} without labels or boxes")
    for cls in summary["classes"]:
        print(
            f"  {cls}: {summary['boxes_per_class'][cls]} boxes, "
            f"present in {summary['images_per_label'][cls]} images"
        )
    for d in summary["dropped"]:
        print(f"  dropped {d['reason']} {d['box']} of {d['label']!r} at {d['file']}:{d['line']}")
    if args.out is not None:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _fetch(args: argparse.Namespace) -> int:
    for path in fetch_module.fetch(args.name, args.dest, allow_unverified=args.allow_unverified):
        print(path)
    return 0


def _tiers(args: argparse.Namespace) -> int:
    report = {}
    for dataset, (counts, n_images, dropped) in shared_label_frequencies(
        get_settings().datasets, args.split
    ).items():
        report[dataset] = {
            "split": args.split,
            "images": n_images,
            "fractions": {label: round(c / n_images, 4) for label, c in counts.items()},
            "tiers": assign_tiers(
                counts, n_images, minority_max_fraction=args.minority_max_fraction
            ),
            "dropped_boxes": [f"{d.file}:{d.line} {d.label} {d.reason}" for d in dropped],
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for dataset, entry in report.items():
        print(f"{dataset} ({entry['split']}, {entry['images']} images):")
        for tier in ("majority", "minority"):
            labels = ", ".join(
                f"{label} {entry['fractions'][label]:.1%}" for label in entry["tiers"][tier]
            )
            print(f"  {tier}: {labels or '-'}")
        for line in entry["dropped_boxes"]:
            print(f"  (dropped {line})")
    return 0
