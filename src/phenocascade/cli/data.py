"""``phenocascade data import|list|show|fetch|tiers``: stored datasets, originals, tier rule.

``data import FORMAT ... --name NAME`` stores a versioned dataset under
``<home>/datasets/NAME/`` (see :mod:`phenocascade.data.registry`); ``data list`` and
``data show`` describe what is stored.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from phenocascade.config import get_settings
from phenocascade.data import fetch as fetch_module
from phenocascade.data import importers, registry
from phenocascade.data.labelled import LabelledSet
from phenocascade.errors import ValidationError

# As import_class_masks: every object of at least one pixel counts.
_MIN_SIZE_DEFAULT = 1
console = Console(width=max(120, shutil.get_terminal_size().columns))
# Arguments of `data import` that configure the store rather than describe the source.
_STORE_ARGS = frozenset(
    {
        "func",
        "command",
        "data_command",
        "verbose",
        "format",
        "name",
        "seed",
        "split",
        "group",
        "out",
    }
)


def register(subparsers: Any) -> None:
    """Add ``data`` and its sub-commands to the top-level parser's subparsers."""
    data = subparsers.add_parser(
        "data",
        help="store annotated datasets, list and show them, fetch public datasets",
        description=(
            "Strict annotation importers (a malformed file is an error naming file and line) "
            "that store versioned datasets, and the checksum-verifying fetcher of the public "
            "originals. `phenocascade plan NAME` turns a stored dataset into tiers."
        ),
    )
    sub = data.add_subparsers(dest="data_command", required=True)

    imp = sub.add_parser(
        "import",
        help="import annotations and store them as a versioned dataset",
        description=(
            "Read annotations strictly, split them (seeded, grouped, stratified, or as a "
            "--split-file fixes) and store them as the next version of dataset NAME under "
            "<home>/datasets; an unchanged re-import keeps the current version. --labels "
            "adds image labels from a table to any format's objects."
        ),
    )
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
    _add_common(table, degenerate=True, labels=False)

    folders = formats.add_parser(
        "folders", help="one sub-folder of images per class (labels exclude each other)"
    )
    folders.add_argument("root", type=Path, help="folder of class folders")
    _add_common(folders, degenerate=False)

    class_masks = formats.add_parser(
        "class-masks", help="one folder of binary masks per class; objects = connected parts"
    )
    class_masks.add_argument("mask_root", type=Path, help="folder of <class>/ mask folders")
    class_masks.add_argument("img_dir", type=Path, help="folder of the images (same stems)")
    class_masks.add_argument("--classes", help="comma-separated classes (default: every folder)")
    class_masks.add_argument(
        "--min-size",
        type=int,
        default=_MIN_SIZE_DEFAULT,
        help="drop objects smaller than this many pixels (default: %(default)s)",
    )
    _add_common(class_masks, degenerate=False)

    listing = sub.add_parser("list", help="list the stored datasets")
    listing.set_defaults(func=_list)

    show = sub.add_parser("show", help="describe a stored dataset: labels, splits, images")
    show.add_argument("name", help="the dataset's name")
    show.add_argument("--version", type=int, help="a version (default: the current one)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_show)

    get = sub.add_parser("fetch", help="download a public dataset, verifying its checksum")
    get.add_argument("name", help="dataset name in the manifest (dsb2018, bccd, bbbc006)")
    get.add_argument("--dest", type=Path, required=True, help="target folder")
    get.add_argument(
        "--allow-unverified",
        action="store_true",
        help="accept files whose SHA-256 is not pinned in the manifest",
    )
    get.set_defaults(func=_fetch)


def _add_common(parser: argparse.ArgumentParser, *, degenerate: bool, labels: bool = True) -> None:
    parser.add_argument("--name", required=True, help="dataset name (a-z 0-9 _ . -)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    parser.add_argument(
        "--split",
        default="0.6,0.2,0.2",
        metavar="TRAIN,VAL,TEST",
        help="image fractions of the splits (default: %(default)s)",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="NAME=L1,L2,...",
        help="image labels that exclude each other (repeatable)",
    )
    parser.add_argument(
        "--split-file",
        type=Path,
        metavar="PATH",
        help="a split the lab fixed, instead of --split and --seed: a CSV with image_id and "
        "split (train, val or test) columns, or a folder of train.txt, val.txt and test.txt "
        "id lists (VOC's ImageSets/Main); a page of a TIFF stack takes its stack's split",
    )
    if labels:
        parser.add_argument(
            "--labels",
            type=Path,
            metavar="CSV",
            help="also import image labels from this CSV (an image_id column and the "
            "--column columns), e.g. a phenotype per image beside its objects",
        )
        parser.add_argument(
            "--column",
            action="append",
            metavar="NAME=V1,V2,...",
            help="with --labels: column NAME gives one label NAME:V per image, the values "
            "excluding each other (repeatable)",
        )
        parser.add_argument(
            "--boxes",
            action="append",
            default=[],
            metavar="LABEL=CSV",
            help="also import boxes of class LABEL from this CSV (image_id,x_min,y_min,x_max,"
            "y_max, half-open pixels), e.g. a rare phenotype among the objects (repeatable)",
        )
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
    """Import the files, then add the ``--boxes`` and ``--labels`` tables when given."""
    labelled = _load_format(args)
    if args.format == "csv":
        return labelled
    for label, path in _box_tables(args).items():
        labelled = importers.add_boxes(
            labelled, path, label, drop_degenerate=getattr(args, "drop_degenerate", False)
        )
    if args.labels is None:
        if args.column:
            raise ValidationError("--column needs --labels CSV, the table it reads")
        return labelled
    if not args.column:
        raise ValidationError(
            f"--labels {args.labels}: name its label columns with --column NAME=V1,V2,..."
        )
    return importers.add_image_labels(labelled, args.labels, _columns(args.column))


def _box_tables(args: argparse.Namespace) -> dict[str, Path]:
    """Return the ``--boxes LABEL=CSV`` tables by class."""
    tables: dict[str, Path] = {}
    for spec in getattr(args, "boxes", []):
        label, sep, path = spec.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise ValidationError(f"--boxes {spec!r}: expected LABEL=CSV, e.g. rare=rare.csv")
        if label.strip() in tables:
            raise ValidationError(f"--boxes {spec!r}: class {label.strip()!r} is given twice")
        tables[label.strip()] = Path(path.strip())
    return tables


def _load_format(args: argparse.Namespace) -> LabelledSet:
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
    if fmt == "class-masks":
        return importers.import_class_masks(
            args.mask_root, args.img_dir, classes=_names(args.classes), min_size=args.min_size
        )
    return importers.import_class_folders(args.root)


def _implied_kinds(
    args: argparse.Namespace, labelled: LabelledSet
) -> dict[str, registry.LabelKind]:
    """Return the kind of every class: image labels for folders and CSV columns, else objects.

    A class of a box or mask format is an object class even where no box of it was found;
    the labels of a ``--labels`` table are image labels, the classes of ``--boxes`` tables
    objects.
    """
    kind: registry.LabelKind = (
        "image" if args.format == "folders" or (args.format == "csv" and args.column) else "object"
    )
    table = {label for labels in _column_groups(args).values() for label in labels}
    boxes = set(_box_tables(args))
    return {
        label: "image" if label in table else "object" if label in boxes else kind
        for label in labelled.classes
    }


def _implied_groups(args: argparse.Namespace, labelled: LabelledSet) -> dict[str, list[str]]:
    """Return the groups a format implies: one class per folder, one value per column."""
    groups = _column_groups(args)
    if args.format == "folders":
        return {"class": list(labelled.classes), **groups}
    return groups


def _column_groups(args: argparse.Namespace) -> dict[str, list[str]]:
    """Return the groups of the ``--column`` labels, of a CSV of labels or a ``--labels`` table.

    The importers name the label of value V in column C "C:V".
    """
    if not args.column:
        return {}
    return importers.column_groups(_columns(args.column))


def _groups(specs: Sequence[str], implied: Mapping[str, list[str]]) -> dict[str, list[str]]:
    out = dict(implied)
    for spec in specs:
        name, sep, labels = spec.partition("=")
        if not sep or not name or not _names(labels):
            raise ValidationError(f"--group {spec!r}: expected NAME=L1,L2,...")
        if name in out:
            raise ValidationError(f"--group {spec!r}: a group {name!r} is already declared")
        out[name] = _names(labels) or []
    return out


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        train, val, test = (float(part) for part in text.split(","))
    except ValueError as exc:
        raise ValidationError(
            f"--split {text!r}: expected three fractions TRAIN,VAL,TEST summing to 1, "
            "e.g. 0.6,0.2,0.2"
        ) from exc
    return train, val, test


def _source(args: argparse.Namespace) -> dict[str, object]:
    """Return the format and its arguments, paths resolved, for the dataset's record."""
    source: dict[str, object] = {"format": args.format}
    for key, value in sorted(vars(args).items()):
        if key not in _STORE_ARGS:
            source[key] = str(value.resolve()) if isinstance(value, Path) else value
    return source


def _datasets_root() -> Path:
    return get_settings().dataset_store


def _import(args: argparse.Namespace) -> int:
    registry.check_name(args.name)
    fractions = _fractions(args.split)
    labelled = _load(args)
    split = None
    if args.split_file is not None:
        split = registry.fixed_split(
            labelled.samples,
            importers.read_split_file(args.split_file),
            file=str(args.split_file),
        )
    stored = registry.save_dataset(
        _datasets_root(),
        args.name,
        labelled,
        kinds=_implied_kinds(args, labelled),
        groups=_groups(args.group, _implied_groups(args, labelled)),
        seed=args.seed,
        fractions=fractions,
        split=split,
        source=_source(args),
    )
    summary = stored.summary()
    counts = "/".join(str(summary["splits"][split]) for split in registry.SPLITS)
    print(
        f"stored dataset {stored.name} version {stored.version} "
        f"(fingerprint {stored.fingerprint[:12]}\u2026): {summary['images']} images, "
        f"train/val/test {counts}"
    )
    console.print(_label_table(summary["labels"], summary["images"]))
    dropped = labelled.summary()["dropped"]
    for d in dropped:
        where = d["file"] if d["line"] is None else f"{d['file']}:{d['line']}"
        print(f"  dropped {d['reason']} {d['box']} of {d['label']!r} at {where}")
    if args.out is not None:
        args.out.write_text(json.dumps({**summary, "dropped": dropped}, indent=2) + "\n")
    return 0


def _label_table(rows: Sequence[Mapping[str, Any]], images: int) -> Table:
    """Return the per-label table; the fractions are of ``images`` and of all objects.

    They are computed from the counts, not from the summary's fractions (rounded to four
    digits), so that they read as ``phenocascade plan`` prints them.
    """
    objects = sum(row["objects"] for row in rows)
    table = Table(title="labels (images with the label per split)")
    for column in ("label", "kind", "group", "images", "objects", "% images", "% objects"):
        table.add_column(
            column, justify="left" if column in ("label", "kind", "group") else "right"
        )
    for split in registry.SPLITS:
        table.add_column(split, justify="right")
    for row in rows:
        table.add_row(
            row["label"],
            row["kind"],
            row["group"] or "-",
            str(row["images"]),
            str(row["objects"]),
            f"{row['images'] / max(images, 1):.1%}",
            f"{row['objects'] / objects:.1%}" if objects else f"{0:.1%}",
            *(str(row[split]) for split in registry.SPLITS),
        )
    return table


def _list(args: argparse.Namespace) -> int:
    root = _datasets_root()
    stored = registry.list_datasets(root)
    if not stored:
        print(f"no datasets in {root}; store one with `phenocascade data import ... --name NAME`")
        return 0
    table = Table(title=f"datasets in {root}")
    for column in ("name", "version", "images", "classes", "created"):
        table.add_column(column)
    for ds in stored:
        table.add_row(
            ds.name, str(ds.version), str(len(ds.samples)), ", ".join(ds.classes), ds.created
        )
    console.print(table)
    return 0


def _show(args: argparse.Namespace) -> int:
    summary = registry.load_dataset(_datasets_root(), args.name, args.version).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    splits, sizes = summary["splits"], summary["image_sizes"]
    print(
        f"dataset {summary['name']} version {summary['version']} "
        f"(fingerprint {summary['fingerprint'][:12]}\u2026), created {summary['created']}"
    )
    print(
        f"images: {summary['images']} (train {splits['train']}, val {splits['val']}, "
        f"test {splits['test']}; seed {summary['seed']})"
    )
    for axis in ("width", "height"):
        spread = sizes[axis]
        print(f"{axis}: min {spread['min']}, median {spread['median']:g}, max {spread['max']} px")
    for key in ("bit_depths", "modalities"):
        print(f"{key.replace('_', ' ')}: " + ", ".join(f"{k} {n}" for k, n in summary[key].items()))
    for group, labels in summary["groups"].items():
        print(f"group {group}: {', '.join(labels)} (exclude each other)")
    print("source: " + ", ".join(f"{k}={v}" for k, v in summary["source"].items()))
    console.print(_label_table(summary["labels"], summary["images"]))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    for path in fetch_module.fetch(args.name, args.dest, allow_unverified=args.allow_unverified):
        print(path)
    return 0
