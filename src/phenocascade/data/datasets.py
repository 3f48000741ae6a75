"""Loaders of the shared real datasets (the bundled recipes' data).

``root`` is the datasets folder (``Settings().datasets``); each loader reads its own
sub-folder (``dsb2018/``, ``bccd/``, ``bbbc006_focus/``, see that folder's README). All
loaders are strict: malformed files raise :class:`~phenocascade.errors.AnnotationError`
naming the file and line.

Box convention: ``[x_min, y_min, x_max, y_max]`` in pixels, half-open.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from phenocascade.data.degrade import SEVERE
from phenocascade.data.importers import (
    find_image,
    image_files,
    import_csv_boxes,
    import_csv_labels,
    import_voc,
    read_csv_rows,
)
from phenocascade.data.labelled import (
    QUALITY_LABEL,
    DroppedAnnotation,
    LabelledSet,
    load_pixels,
    quality_examples,
)
from phenocascade.domain import Sample
from phenocascade.errors import AnnotationError, ValidationError

__all__ = [
    "BCCD_CLASSES",
    "DSB_MAJORITY_CLASSES",
    "DSB_NUCLEUS_CLASS",
    "DSB_RARE_CLASS",
    "QUALITY_CLASS",
    "SPLITS",
    "DroppedAnnotation",
    "LabelledSet",
    "Split",
    "bbbc006",
    "bccd",
    "dsb2018_majority",
    "dsb2018_nuclei",
    "dsb2018_rare",
    "load_pixels",
    "quality_set",
    "split_ids",
]

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")

_DSB_MAJORITY_COLUMNS: dict[str, tuple[str, ...]] = {
    "nucleus_size": ("small", "medium", "large"),
    "density": ("sparse", "medium", "dense"),
}
DSB_MAJORITY_CLASSES: tuple[str, ...] = tuple(
    f"{col}:{v}" for col, values in _DSB_MAJORITY_COLUMNS.items() for v in values
)
DSB_RARE_CLASS = "large_nucleus"
DSB_NUCLEUS_CLASS = "nucleus"
BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")
QUALITY_CLASS = QUALITY_LABEL

# BBBC006 field names carry well and site, e.g. "..._a01_s1_w1..." and "...__a01__s1__w1_10".
_BBBC006_FIELD = re.compile(r"_+([a-p]\d\d)_+(s\d)_+w1")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValidationError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def split_ids(root: Path, dataset: Literal["dsb2018", "bccd"], split: Split) -> list[str]:
    """Return the image ids of a fixed split, in file order.

    DSB 2018 reads ``dsb2018/split.csv``; BCCD reads the official
    ``bccd/BCCD/ImageSets/Main/<split>.txt``.

    Raises
    ------
    ValidationError
        If ``split`` is not ``train``/``val``/``test``.
    AnnotationError
        If the split file is missing or malformed (a bad split name, a duplicate id).
    """
    _check_split(split)
    if dataset == "dsb2018":
        path = root / "dsb2018" / "split.csv"
        ids = []
        seen: set[str] = set()
        for line, row in read_csv_rows(path, ("image_id", "split")):
            image_id, name = row["image_id"].strip(), row["split"].strip()
            if name not in SPLITS:
                raise AnnotationError(f"unknown split {name!r}", file=str(path), line=line)
            if image_id in seen:
                raise AnnotationError(f"duplicate image {image_id!r}", file=str(path), line=line)
            seen.add(image_id)
            if name == split:
                ids.append(image_id)
        return ids
    path = root / "bccd" / "BCCD" / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise AnnotationError("split file does not exist", file=str(path))
    ids = []
    for line_no, raw in enumerate(path.read_text().splitlines(), start=1):
        image_id = raw.strip()
        if not image_id:
            continue
        if image_id in ids or len(image_id.split()) != 1:
            raise AnnotationError(f"bad or duplicate id {raw!r}", file=str(path), line=line_no)
        ids.append(image_id)
    return ids


def dsb2018_majority(root: Path, split: Split) -> LabelledSet:
    """Load DSB 2018 with image-level phenotype labels for the majority classifier.

    Six labels in two groups, exactly one per group present per image:
    ``nucleus_size:small|medium|large`` and ``density:sparse|medium|dense``, from
    ``dsb2018/derived_stage2_labels.csv`` (heuristic labels computed from expert masks).

    Parameters
    ----------
    root : pathlib.Path
        The datasets folder.
    split : {"train", "val", "test"}
        The fixed split of ``dsb2018/split.csv`` (399/133/132 images).

    Returns
    -------
    LabelledSet
        ``classes`` = :data:`DSB_MAJORITY_CLASSES`; no boxes; each image's instance label
        image as ``Sample.mask`` (the morphometric classifier learns its nuclei from them).
    """
    ids = split_ids(root, "dsb2018", split)
    labelled = import_csv_labels(
        root / "dsb2018" / "derived_stage2_labels.csv",
        root / "dsb2018" / "images",
        _DSB_MAJORITY_COLUMNS,
        image_ids=ids,
        name=f"dsb2018_majority/{split}",
    )
    return _with_masks(labelled, root)


def dsb2018_rare(root: Path, split: Split) -> LabelledSet:
    """Load DSB 2018 with boxes of the rare large-nucleus phenotype for the detector.

    Boxes are nuclei larger than 3x their image's median area (images with at least 5
    nuclei), from ``dsb2018/derived_stage3_rare_large_nuclei.csv``: 319 boxes in 104
    images over all splits. Every image of the split is returned; those without a rare
    box are negatives (``boxes == ()``).

    Returns
    -------
    LabelledSet
        ``classes == ("large_nucleus",)``.
    """
    ids = split_ids(root, "dsb2018", split)
    return import_csv_boxes(
        root / "dsb2018" / "derived_stage3_rare_large_nuclei.csv",
        root / "dsb2018" / "images",
        label=DSB_RARE_CLASS,
        image_ids=ids,
        name=f"dsb2018_rare/{split}",
    )


def dsb2018_nuclei(root: Path, split: Split) -> LabelledSet:
    """Load DSB 2018 with a box around every nucleus (``dsb2018/boxes.csv``).

    28,986 expert-mask boxes over the 664 images (about 40 per image, up to 375), and
    each image's instance label image as ``Sample.mask``; they train the object detector
    of the ``nucleus_outlier_detector`` backend and the segmenter of
    ``nucleus_mask_outlier_detector``.

    Returns
    -------
    LabelledSet
        ``classes == ("nucleus",)``.
    """
    ids = split_ids(root, "dsb2018", split)
    boxes = import_csv_boxes(
        root / "dsb2018" / "boxes.csv",
        root / "dsb2018" / "images",
        label=DSB_NUCLEUS_CLASS,
        image_ids=ids,
        name=f"dsb2018_nuclei/{split}",
    )
    return _with_masks(boxes, root)


def _with_masks(labelled: LabelledSet, root: Path) -> LabelledSet:
    """Give each DSB 2018 sample its instance label image (``dsb2018/labels/<id>.png``)."""
    labels = root / "dsb2018" / "labels"
    return dataclasses.replace(
        labelled,
        samples=tuple(
            dataclasses.replace(s, mask=labels / f"{s.image_id}.png") for s in labelled.samples
        ),
    )


def bccd(
    root: Path,
    split: Split,
    classes: Sequence[str] = ("WBC", "Platelets"),
    drop_degenerate: bool = False,
) -> LabelledSet:
    """Load a BCCD blood-smear split (official ``ImageSets/Main``: 205/87/72 images).

    Parameters
    ----------
    root : pathlib.Path
        The datasets folder.
    split : {"train", "val", "test"}
        The official split.
    classes : sequence of str, default ("WBC", "Platelets")
        Classes to keep, in model order, among ``RBC``, ``WBC``, ``Platelets``; boxes
        of the others are validated, then left out.
    drop_degenerate : bool, default False
        BCCD holds two zero-area RBC boxes (``BloodImage_00343.xml`` in train,
        ``BloodImage_00338.xml`` in val). Strict loading raises on them whatever
        ``classes`` is; ``True`` drops them and lists them in ``dropped``.

    Raises
    ------
    AnnotationError
        On a malformed annotation, naming the XML file and line.
    """
    ids = split_ids(root, "bccd", split)
    base = root / "bccd" / "BCCD"
    return import_voc(
        base / "Annotations",
        base / "JPEGImages",
        ids=ids,
        classes=BCCD_CLASSES,
        drop_degenerate=drop_degenerate,
        keep=tuple(classes),
        name=f"bccd/{split}",
    )


def quality_set(
    root: Path,
    split: Split,
    *,
    seed: int = 0,
    per_image: int = 2,
    max_sources: int | None = None,
) -> LabelledSet:
    """Build the quality-gate set: clear originals plus severely degraded copies.

    Sources are the DSB 2018 images of ``split`` (``split.csv``) and the BCCD images of
    the same official split. Each source gives one sample labelled ``{"clear"}`` and
    ``per_image`` unclear copies (labels empty), each with a different kind drawn from
    :data:`phenocascade.data.degrade.SEVERE`, applied by :func:`load_pixels`. Source and
    copies share ``group`` = the source id, so a split never separates them. Image ids
    are ``"dsb2018:<id>"``/``"bccd:<id>"`` and ``"<source id>~<degradation>"`` for copies.

    Parameters
    ----------
    root : pathlib.Path
        The datasets folder.
    split : {"train", "val", "test"}
        Which split of both datasets to use.
    seed : int, default 0
        Seed of the source subset, the kinds drawn and each copy's degradation seed.
    per_image : int, default 2
        Degraded copies per source, ``0..len(SEVERE)``.
    max_sources : int or None, default None
        Keep a seeded random subset of this many sources (file order kept); ``None``
        keeps all.

    Returns
    -------
    LabelledSet
        ``classes == ("clear",)``.

    Raises
    ------
    ValidationError
        If ``per_image`` or ``max_sources`` is out of range.
    """
    if not 0 <= per_image <= len(SEVERE):
        raise ValidationError(f"per_image must be in 0..{len(SEVERE)}, got {per_image}")
    if max_sources is not None and max_sources < 1:
        raise ValidationError(f"max_sources must be at least 1, got {max_sources}")
    dsb_images = root / "dsb2018" / "images"
    bccd_images = root / "bccd" / "BCCD" / "JPEGImages"
    split_csv = str(root / "dsb2018" / "split.csv")
    bccd_split = str(root / "bccd" / "BCCD" / "ImageSets" / "Main" / f"{split}.txt")
    sources = [
        (f"dsb2018:{i}", find_image(dsb_images, i, file=split_csv, line=None))
        for i in split_ids(root, "dsb2018", split)
    ] + [
        (f"bccd:{i}", find_image(bccd_images, i, file=bccd_split, line=None))
        for i in split_ids(root, "bccd", split)
    ]
    if max_sources is not None and max_sources < len(sources):
        chosen = np.random.default_rng(seed).choice(len(sources), max_sources, replace=False)
        sources = [sources[i] for i in sorted(chosen)]
    clear = [Sample(source_id, path, group=source_id) for source_id, path in sources]
    return quality_examples(clear, name=f"quality/{split}", seed=seed, per_image=per_image)


def bbbc006(root: Path) -> LabelledSet:
    """Load the real-defocus check set from BBBC006 (16-bit U2OS Hoechst, 696x520).

    ``bbbc006_focus/clear_zaligned10/*.png`` (9 sharp fields) are labelled
    ``{"clear"}``; ``bbbc006_focus/unclear_z00/*.tif`` (25 fields about 32 um off focus,
    LZW TIFF read through imagecodecs) have no label. ``group`` is the field's well and
    site (e.g. ``"a01_s1"``), the image id if the name holds none.

    Returns
    -------
    LabelledSet
        ``classes == ("clear",)``; use only for testing the gate, never for training.
    """
    base = root / "bbbc006_focus"
    samples = []
    for folder, labels in (
        ("clear_zaligned10", frozenset({QUALITY_CLASS})),
        ("unclear_z00", frozenset[str]()),
    ):
        for path in image_files(base / folder):
            match = _BBBC006_FIELD.search(path.stem)
            group = f"{match[1]}_{match[2]}" if match else path.stem
            samples.append(Sample(path.stem, path, labels=labels, group=group))
    return LabelledSet("bbbc006_focus", (QUALITY_CLASS,), tuple(samples))
