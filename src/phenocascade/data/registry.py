"""Stored, versioned datasets: what ``phenocascade data import ... --name NAME`` keeps.

A stored dataset is a manifest (JSON) under ``<home>/datasets/<name>/``: every sample with
its image URI and content hash, image-level labels, boxes and instance-mask path; the kind
of every label (an image label, or an object class with boxes); label groups whose labels
exclude each other; a fixed, seeded, stratified train/val/test split; and a fingerprint.
Images stay where they are and are read by path.

Box convention: ``[x_min, y_min, x_max, y_max]`` in pixels, ``x_max``/``y_max`` exclusive.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import tifffile
from PIL import Image

from phenocascade.data.labelled import LabelledSet
from phenocascade.domain import Box, Sample
from phenocascade.errors import (
    ConfigError,
    CorruptImageError,
    UnsupportedImageError,
    ValidationError,
)
from phenocascade.imaging import sniff_format

logger = logging.getLogger(__name__)

LabelKind = Literal["image", "object"]
SplitName = Literal["train", "val", "test"]
SPLITS: tuple[SplitName, ...] = ("train", "val", "test")

_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_MANIFEST = re.compile(r"^v([1-9][0-9]*)\.json$")
# Bumped when the manifest layout changes incompatibly; a reader refuses other formats.
_FORMAT = 1
# A label needs this many group units before the split promises it a place in every split.
_MIN_UNITS_EVERYWHERE = 3
# PIL mode -> (channels, dtype) as :func:`phenocascade.imaging.decode_bytes` returns them.
_PIL_MODES: dict[str, tuple[int, str]] = {
    "1": (1, "uint8"),
    "L": (1, "uint8"),
    "LA": (1, "uint8"),
    "P": (3, "uint8"),
    "RGB": (3, "uint8"),
    "RGBA": (3, "uint8"),
    "CMYK": (3, "uint8"),
    "YCbCr": (3, "uint8"),
    "I": (1, "uint16"),
    "I;16": (1, "uint16"),
    "I;16B": (1, "uint16"),
    "I;16L": (1, "uint16"),
}


@dataclass(frozen=True)
class ImageInfo:
    """Facts about one stored image, read at import.

    Attributes
    ----------
    width, height : int
        Pixels.
    channels : int
        1 (grey) or 3 (RGB).
    dtype : str
        ``"uint8"`` or ``"uint16"``.
    sha256 : str
        Hex digest of the file's bytes.
    """

    width: int
    height: int
    channels: int
    dtype: str
    sha256: str


@dataclass(frozen=True)
class StoredDataset:
    """One version of a stored dataset.

    Attributes
    ----------
    name : str
        The dataset's name (``[a-z0-9][a-z0-9_.-]*``).
    version : int
        1 for the first import under this name, +1 for each import whose fingerprint
        differs from the newest.
    fingerprint : str
        SHA-256 hex digest over classes, kinds, groups, samples (resolved paths and image
        hashes included) and split; not over ``seed``, ``source`` or ``created``.
    classes : tuple of str
        Every label, image labels and object classes alike, in a fixed order.
    kinds : dict of str to {"image", "object"}
        ``"object"`` for classes given as boxes (or masks), ``"image"`` for image labels.
    groups : dict of str to tuple of str
        Named groups of image labels that exclude each other (at most one per image).
    samples : tuple of Sample
        Every sample, ``path`` absolute.
    split : dict of str to {"train", "val", "test"}
        The split of every sample, by ``image_id``.
    images : dict of str to ImageInfo
        Per ``image_id``.
    seed : int
        Seed of the split.
    source : dict
        How it was imported: the format and its arguments, for the record.
    created : str
        ISO 8601 UTC time of the import.
    """

    name: str
    version: int
    fingerprint: str
    classes: tuple[str, ...]
    kinds: dict[str, LabelKind]
    groups: dict[str, tuple[str, ...]]
    samples: tuple[Sample, ...]
    split: dict[str, SplitName]
    images: dict[str, ImageInfo]
    seed: int = 0
    source: dict[str, object] = field(default_factory=dict)
    created: str = ""

    def split_set(self, split: str, labels: Sequence[str] | None = None) -> LabelledSet:
        """Return the samples of one split as a labelled set, optionally fewer labels.

        Parameters
        ----------
        split : {"train", "val", "test"}
            The split.
        labels : sequence of str or None, default None
            Labels to keep, in the order the returned ``classes`` take; image labels and
            boxes of every other class are dropped (their images stay, as negatives).
            ``None`` keeps every class.

        Returns
        -------
        LabelledSet
            Named ``"<name>/<split>"``, samples in stored order.

        Raises
        ------
        ValidationError
            If ``split`` is not a split or a label is not a class of the dataset.
        """
        if split not in SPLITS:
            raise ValidationError(f"unknown split {split!r}; use one of {list(SPLITS)}")
        keep = self.classes if labels is None else tuple(labels)
        unknown = [label for label in keep if label not in self.classes]
        if unknown:
            raise ValidationError(
                f"dataset {self.name!r} v{self.version} has no labels {unknown}; "
                f"its labels are {list(self.classes)}"
            )
        wanted = set(keep)
        samples = tuple(
            dataclasses.replace(
                s,
                labels=s.labels & wanted,
                boxes=tuple(b for b in s.boxes if b.label in wanted),
            )
            for s in self.samples
            if self.split[s.image_id] == split
        )
        return LabelledSet(f"{self.name}/{split}", keep, samples)

    def label_table(self) -> list[dict[str, Any]]:
        """Return one row per class, in class order.

        Returns
        -------
        list of dict
            ``label``, ``kind``, ``group`` (its group's name or ``None``), ``images``
            (images with the label or a box of it), ``objects`` (boxes of it),
            ``image_fraction`` (``images`` / all images), ``object_fraction``
            (``objects`` / all boxes; 0 without boxes), and per split (``train``, ``val``,
            ``test``) the images with it.
        """
        group_of = {label: g for g, labels in self.groups.items() for label in labels}
        images: collections.Counter[tuple[str, str]] = collections.Counter()
        objects: collections.Counter[str] = collections.Counter()
        for s in self.samples:
            for label in _labels_of(s):
                images[label, "all"] += 1
                images[label, self.split[s.image_id]] += 1
            objects.update(b.label for b in s.boxes)
        n_images = max(len(self.samples), 1)
        n_objects = sum(objects.values())
        return [
            {
                "label": label,
                "kind": self.kinds[label],
                "group": group_of.get(label),
                "images": images[label, "all"],
                "objects": objects[label],
                "image_fraction": round(images[label, "all"] / n_images, 4),
                "object_fraction": round(objects[label] / n_objects, 4) if n_objects else 0.0,
                **{split: images[label, split] for split in SPLITS},
            }
            for label in self.classes
        ]

    def summary(self) -> dict[str, Any]:
        """Return a JSON-ready description of this version.

        Returns
        -------
        dict
            ``name``, ``version``, ``fingerprint``, ``created``, ``seed``, ``images``
            (all), ``splits`` (images per split), ``labels`` (:meth:`label_table`),
            ``image_sizes`` (``width`` and ``height``, each ``min``/``median``/``max`` in
            pixels), ``bit_depths`` (images per dtype, e.g. ``{"uint8": 20}``),
            ``channels`` (images per channel count, keys ``"1"``/``"3"``), ``modalities``
            (images per ``"grey"``/``"rgb"``), ``groups`` and ``source``.
        """
        infos = [self.images[s.image_id] for s in self.samples]
        splits = collections.Counter(self.split.values())
        return {
            "name": self.name,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "created": self.created,
            "seed": self.seed,
            "images": len(self.samples),
            "splits": {split: splits[split] for split in SPLITS},
            "labels": self.label_table(),
            "image_sizes": {
                "width": _spread([i.width for i in infos]),
                "height": _spread([i.height for i in infos]),
            },
            "bit_depths": dict(sorted(collections.Counter(i.dtype for i in infos).items())),
            "channels": dict(sorted(collections.Counter(str(i.channels) for i in infos).items())),
            "modalities": dict(
                sorted(collections.Counter(_modality(i.channels) for i in infos).items())
            ),
            "groups": {g: list(labels) for g, labels in self.groups.items()},
            "source": self.source,
        }


def _labels_of(sample: Sample) -> set[str]:
    """Return a sample's image labels plus the classes of its boxes."""
    return set(sample.labels) | {b.label for b in sample.boxes}


def _spread(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _modality(channels: int) -> str:
    return "grey" if channels == 1 else "rgb"


# ------------------------------------------------------------------------- image facts


def image_info(path: Path, *, page: int = 0) -> ImageInfo:
    """Read an image's size, channels and dtype from its header, and hash its bytes.

    Parameters
    ----------
    path : pathlib.Path
        A TIFF, PNG or JPEG file.
    page : int, default 0
        The page of a multi-page TIFF.

    Returns
    -------
    ImageInfo
        ``channels`` and ``dtype`` as :func:`phenocascade.imaging.decode_bytes` returns
        them (alpha planes dropped, palettes as RGB, 1-bit as ``uint8``); no pixel is
        decoded.

    Raises
    ------
    CorruptImageError
        If the file is missing, unreadable, not an image, or has no such page.
    UnsupportedImageError
        If its mode, sample count or dtype is one the pipeline cannot decode.
    """
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            head = f.read(16)
            digest.update(head)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CorruptImageError(f"{path}: cannot read image file ({exc.strerror})") from exc
    try:
        fmt = sniff_format(head)
    except CorruptImageError as exc:
        raise CorruptImageError(f"{path}: {exc}") from exc
    try:
        if fmt == "tiff":
            width, height, channels, dtype = _tiff_header(path, page)
        else:
            width, height, channels, dtype = _pil_header(path)
    except (OSError, ValueError, SyntaxError, tifffile.TiffFileError) as exc:
        raise CorruptImageError(f"{path}: cannot read the {fmt} header ({exc})") from exc
    return ImageInfo(width, height, channels, dtype, digest.hexdigest())


def _tiff_header(path: Path, page: int) -> tuple[int, int, int, str]:
    with tifffile.TiffFile(path) as tif:
        if not 0 <= page < len(tif.pages):
            raise CorruptImageError(f"{path}: no page {page} (it has {len(tif.pages)})")
        tiff_page = tif.pages[page]
        if not isinstance(tiff_page, tifffile.TiffPage):  # frames only exist with useframes
            raise CorruptImageError(f"{path}: page {page} is not a TIFF page")
        samples = tiff_page.samplesperpixel
        dtype = "uint8" if tiff_page.dtype == bool else str(tiff_page.dtype)
        width, height = tiff_page.imagewidth, tiff_page.imagelength
    if samples not in (1, 2, 3, 4) or dtype not in ("uint8", "uint16"):
        raise UnsupportedImageError(
            f"{path}: {samples} samples of {dtype} per pixel; "
            "convert to grey or RGB, 8- or 16-bit unsigned"
        )
    return int(width), int(height), 1 if samples <= 2 else 3, dtype


def _pil_header(path: Path) -> tuple[int, int, int, str]:
    with Image.open(path) as img:
        mode, (width, height) = img.mode, img.size
    if mode not in _PIL_MODES:
        raise UnsupportedImageError(f"{path}: image mode {mode} is not supported")
    channels, dtype = _PIL_MODES[mode]
    return int(width), int(height), channels, dtype


# ------------------------------------------------------------------------------- split


def assign_splits(
    samples: Sequence[Sample],
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    *,
    seed: int = 0,
) -> dict[str, SplitName]:
    """Split samples into train/val/test, seeded, grouped and stratified.

    Samples sharing a ``group`` (``image_id`` when empty) form one unit that never
    straddles splits, so degraded copies or pages of one source stay together. Labels are
    taken rarest first (counted in units; image labels and box classes alike); each
    unit goes, in the pass of its rarest label and in seeded random order, to the split
    that most lacks that label, so a label with at least 3 units reaches every split
    whose fraction is positive. Ties, and units without labels, go to the split furthest
    below its share of images.

    Parameters
    ----------
    samples : sequence of Sample
        Samples with unique ``image_id``.
    fractions : tuple of float, default (0.6, 0.2, 0.2)
        Shares of train, val and test; non-negative, summing to 1.
    seed : int, default 0
        Seed of the random order; the same samples and seed give the same split.

    Returns
    -------
    dict of str to {"train", "val", "test"}
        The split of every sample, by ``image_id``.
    """
    units: dict[str, list[Sample]] = {}
    for s in samples:
        units.setdefault(s.group or s.image_id, []).append(s)
    unit_labels = {key: set().union(*map(_labels_of, members)) for key, members in units.items()}
    label_units = collections.Counter(lb for labels in unit_labels.values() for lb in labels)
    by_rarest: dict[str | None, list[str]] = collections.defaultdict(list)
    for key in sorted(units):
        labels = unit_labels[key]
        by_rarest[min(labels, key=lambda lb: (label_units[lb], lb)) if labels else None].append(key)
    tally = _SplitTally(fractions, len(samples), label_units)
    rng = random.Random(seed)
    assigned: dict[str, SplitName] = {}
    for label in [*sorted(label_units, key=lambda lb: (label_units[lb], lb)), None]:
        keys = by_rarest.get(label, [])
        rng.shuffle(keys)
        for key in keys:
            assigned[key] = tally.add(label, unit_labels[key], len(units[key]))
    return {s.image_id: assigned[s.group or s.image_id] for s in samples}


def fixed_split(
    samples: Sequence[Sample], listed: Mapping[str, str], *, file: str
) -> dict[str, SplitName]:
    """Give each sample the split a lab fixed for it.

    Parameters
    ----------
    samples : sequence of Sample
        Samples with unique ``image_id``.
    listed : mapping of str to str
        Split by id (:func:`~phenocascade.data.importers.read_split_file`). A sample
        takes its own id's split, else its ``group``'s (a page of a stack, its stack's).
        Ids of no sample are ignored: a split file may cover more than one import.
    file : str
        Where ``listed`` came from, for the errors.

    Returns
    -------
    dict of str to {"train", "val", "test"}
        The split of every sample, by ``image_id``.

    Raises
    ------
    ValidationError
        Naming the file: samples that it gives no split (the first five, and how
        many), a split name outside train/val/test, or one group (stack) in two splits.
    """
    split: dict[str, SplitName] = {}
    of_group: dict[str, str] = {}
    missing = []
    for s in samples:
        name = listed.get(s.image_id) or listed.get(s.group or s.image_id)
        if name is None:
            missing.append(s.image_id)
            continue
        if name not in SPLITS:
            raise ValidationError(f"{file}: unknown split {name!r}; use one of {list(SPLITS)}")
        split[s.image_id] = name
        group = s.group or s.image_id
        if of_group.setdefault(group, name) != name:
            raise ValidationError(
                f"{file}: {group!r} would be in both {of_group[group]} and {name}; the "
                "pages of one stack stay in one split"
            )
    if missing:
        raise ValidationError(
            f"{file} gives no split to images {missing[:5]} ({len(missing)} in all); "
            "list every imported image"
        )
    return split


class _SplitTally:
    """What each split holds so far: images, and units per label."""

    def __init__(
        self,
        fractions: tuple[float, float, float],
        n_images: int,
        label_units: Mapping[str, int],
    ) -> None:
        self.share = dict(zip(SPLITS, fractions, strict=True))
        self.n_images = n_images
        self.label_units = label_units
        self.images: collections.Counter[str] = collections.Counter()
        self.units: collections.Counter[tuple[str, str]] = collections.Counter()

    def add(self, label: str | None, labels: Iterable[str], size: int) -> SplitName:
        """Choose the split of one unit of ``size`` images, record it and return it."""

        def want(split: SplitName) -> tuple[bool, float, float]:
            image_need = self.share[split] * self.n_images - self.images[split]
            if label is None:
                return False, 0.0, image_need
            have = self.units[split, label]
            missing = have == 0 and self.label_units[label] >= _MIN_UNITS_EVERYWHERE
            return missing, self.share[split] * self.label_units[label] - have, image_need

        split = max((s for s in SPLITS if self.share[s] > 0), key=want)
        self.images[split] += size
        for lb in labels:
            self.units[split, lb] += 1
        return split


# -------------------------------------------------------------------------- validation


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name.

    Raises
    ------
    ValidationError
        Unless it is 1-64 characters of lower-case letters, digits, ``_``, ``.`` and
        ``-``, starting with a letter or digit.
    """
    if not _NAME.fullmatch(name):
        raise ValidationError(
            f"dataset name {name!r} is not allowed; use 1-64 characters a-z 0-9 _ . - "
            "starting with a letter or digit, e.g. 'bccd-cells'"
        )
    return name


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValidationError(
            f"split fractions {list(fractions)} must be three non-negative numbers "
            "(train, val, test) summing to 1, e.g. 0.6,0.2,0.2"
        )


def _check_samples(labelled: LabelledSet) -> None:
    if not labelled.samples:
        raise ValidationError(f"{labelled.name!r} holds no samples; there is nothing to store")
    seen: set[str] = set()
    for s in labelled.samples:
        if s.image_id in seen:
            raise ValidationError(f"image id {s.image_id!r} occurs twice in {labelled.name!r}")
        seen.add(s.image_id)
        unknown = _labels_of(s) - set(labelled.classes)
        if unknown:
            raise ValidationError(
                f"sample {s.image_id!r} has labels {sorted(unknown)} outside the classes "
                f"{list(labelled.classes)}"
            )


def _label_kinds(
    labelled: LabelledSet, kinds: Mapping[str, LabelKind] | None
) -> dict[str, LabelKind]:
    """Return the kind of every class: given, else "object" if it has a box."""
    boxed = {b.label for s in labelled.samples for b in s.boxes}
    given = dict(kinds or {})
    for label, kind in given.items():
        if label not in labelled.classes:
            raise ValidationError(f"kind given for {label!r}, which is not a class of the set")
        if kind not in ("image", "object"):
            raise ValidationError(f"kind of {label!r} is {kind!r}; use 'image' or 'object'")
        if kind == "image" and label in boxed:
            raise ValidationError(f"{label!r} has boxes, so it cannot be an image label")
    default: dict[str, LabelKind] = {
        c: ("object" if c in boxed else "image") for c in labelled.classes
    }
    return {c: given.get(c, default[c]) for c in labelled.classes}


def _label_groups(
    labelled: LabelledSet,
    kinds: Mapping[str, LabelKind],
    groups: Mapping[str, Sequence[str]],
) -> dict[str, tuple[str, ...]]:
    """Check the groups: image labels of the set, at most one of each group per sample."""
    out: dict[str, tuple[str, ...]] = {}
    for group, labels in groups.items():
        members = tuple(dict.fromkeys(labels))
        if not group or not members:
            raise ValidationError(f"label group {group!r} needs a name and at least one label")
        for label in members:
            if kinds.get(label) != "image":
                raise ValidationError(
                    f"label group {group!r}: {label!r} is not an image label of the set "
                    f"(image labels: {[c for c, k in kinds.items() if k == 'image']})"
                )
        out[group] = members
    for s in labelled.samples:
        for group, members in out.items():
            present = sorted(s.labels & set(members))
            if len(present) > 1:
                raise ValidationError(
                    f"sample {s.image_id!r} has {present}, but the labels of group "
                    f"{group!r} exclude each other"
                )
    return out


# ------------------------------------------------------------------------ store / load


def save_dataset(
    root: Path,
    name: str,
    labelled: LabelledSet,
    *,
    kinds: Mapping[str, LabelKind] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    split: Mapping[str, SplitName] | None = None,
    source: Mapping[str, object] | None = None,
) -> StoredDataset:
    """Store a labelled set as the next version of dataset ``name``.

    Writes ``root/<name>/v<version>.json`` and then ``root/<name>/CURRENT`` (the version
    number), each atomically; ``CURRENT`` is the commit point, so a crash in between
    leaves the previous version current. If the new content's fingerprint equals the
    newest version's, nothing is written but ``CURRENT`` (when it lags) and that
    version is returned. A damaged newest manifest is kept, and the import stored as the
    version after it.

    Parameters
    ----------
    root : pathlib.Path
        The datasets folder, ``<settings.home>/datasets``.
    name : str
        1-64 characters ``a-z 0-9 _ . -``, starting with a letter or digit.
    labelled : LabelledSet
        Samples with unique ids and a ``path`` each; images are read (headers and a
        hash) but not copied, and their paths are stored resolved.
    kinds : mapping of str to {"image", "object"} or None, default None
        Kind of some classes; the others are ``"object"`` if they have a box, else
        ``"image"``.
    groups : mapping of str to sequence of str or None, default None
        Named groups of image labels that exclude each other.
    seed : int, default 0
        Seed of the split (:func:`assign_splits`).
    fractions : tuple of float, default (0.6, 0.2, 0.2)
        Train, val and test shares of the images.
    split : mapping of str to {"train", "val", "test"} or None, default None
        A split fixed by the lab (:func:`fixed_split`), for every sample; ``None``
        assigns one from ``fractions`` and ``seed``.
    source : mapping or None, default None
        How the set was imported (format, arguments), kept for the record.

    Returns
    -------
    StoredDataset
        The stored (or unchanged newest) version.

    Raises
    ------
    ValidationError
        A bad name or fractions, no samples, a duplicate id, a sample without path, a
        label outside the classes, a bad kind, a group of unknown or object labels, or a
        sample with two labels of one group (named).
    CorruptImageError, UnsupportedImageError
        If an image cannot be read, naming it.
    """
    check_name(name)
    _check_fractions(fractions)
    _check_samples(labelled)
    label_kinds = _label_kinds(labelled, kinds)
    label_groups = _label_groups(labelled, label_kinds, groups or {})
    samples = tuple(_resolved(s) for s in labelled.samples)
    if split is not None and any(s.image_id not in split for s in samples):
        raise ValidationError("a fixed split must give every sample a split (fixed_split)")
    folder = root / name
    versions = _versions(folder)
    stored = StoredDataset(
        name=name,
        version=(versions[-1] if versions else 0) + 1,
        fingerprint="",
        classes=labelled.classes,
        kinds=label_kinds,
        groups=label_groups,
        samples=samples,
        split=dict(split) if split is not None else assign_splits(samples, fractions, seed=seed),
        images=_image_infos(samples),
        seed=seed,
        source=dict(source or {}),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    stored = dataclasses.replace(stored, fingerprint=_fingerprint(stored))
    newest = _newest_intact(root, name, versions)
    if newest is not None and newest.fingerprint == stored.fingerprint:
        _commit(folder, newest.version)
        return newest
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / f"v{stored.version}.json", json.dumps(_manifest(stored), indent=1))
    _commit(folder, stored.version)
    return stored


def _newest_intact(root: Path, name: str, versions: Sequence[int]) -> StoredDataset | None:
    """Return the newest version, or ``None`` if there is none or it is damaged."""
    if not versions:
        return None
    try:
        return load_dataset(root, name, versions[-1])
    except ConfigError as exc:
        # A damaged manifest is kept for inspection; the import stores a good one after it.
        logger.warning("storing a new version after a damaged one: %s", exc)
        return None


def _commit(folder: Path, version: int) -> None:
    """Point ``CURRENT`` at ``version``; written only when it points elsewhere."""
    current = folder / "CURRENT"
    try:
        if current.read_text().strip() == str(version):
            return
    except OSError:
        pass  # missing or unreadable: write it
    _write_atomic(current, f"{version}\n")


def load_dataset(root: Path, name: str, version: int | None = None) -> StoredDataset:
    """Load one version of a stored dataset.

    Parameters
    ----------
    root : pathlib.Path
        The datasets folder, ``<settings.home>/datasets``.
    name : str
        The dataset's name.
    version : int or None, default None
        The version; ``None`` loads the current one (``CURRENT``, else the newest).

    Raises
    ------
    ValidationError
        If ``name`` is not a valid dataset name.
    ConfigError
        If there is no such dataset (listing the known ones) or version, or its manifest
        is unreadable, malformed or does not match its fingerprint (naming the file).
    """
    folder = root / check_name(name)
    versions = _versions(folder)
    if not versions:
        known = ", ".join(_known(root)) or "none"
        raise ConfigError(
            f"no dataset {name!r} in {root} (known: {known}); store one with "
            f"`phenocascade data import FORMAT ... --name {name}`"
        )
    if version is None:
        version = _current(folder, versions)
    if version not in versions:
        raise ConfigError(f"dataset {name!r} has no version {version}; it has {versions}")
    file = folder / f"v{version}.json"
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot read the dataset manifest ({exc})") from exc
    stored = _parse_manifest(data, file)
    if (stored.name, stored.version) != (name, version):
        raise ConfigError(
            f"{file}: holds dataset {stored.name!r} v{stored.version}, not {name!r} v{version}"
        )
    return stored


def list_datasets(root: Path) -> list[StoredDataset]:
    """Return the current version of every dataset under ``root``, sorted by name."""
    return [load_dataset(root, name) for name in _known(root)]


def _known(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if _NAME.fullmatch(p.name) and _versions(p))


def _versions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _MANIFEST.fullmatch(p.name)))


def _current(folder: Path, versions: Sequence[int]) -> int:
    """Return the version ``CURRENT`` names; the newest if there is no such file."""
    file = folder / "CURRENT"
    try:
        text = file.read_text().strip()
    except FileNotFoundError:
        return versions[-1]
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read ({exc.strerror})") from exc
    if not text.isdigit():
        raise ConfigError(
            f"{file}: holds {text!r}, not a version number; re-import the dataset to repair it"
        )
    return int(text)


def _write_atomic(path: Path, text: str) -> None:
    """Write a file so that readers see the old or the new content, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _resolved(sample: Sample) -> Sample:
    return dataclasses.replace(
        sample,
        path=None if sample.path is None else sample.path.resolve(),
        mask=None if sample.mask is None else sample.mask.resolve(),
    )


def _image_infos(samples: Sequence[Sample]) -> dict[str, ImageInfo]:
    """Return the facts of every sample's image; degraded copies share one read."""
    cache: dict[tuple[Path, int], ImageInfo] = {}
    out = {}
    for s in samples:
        if s.path is None:
            raise ValidationError(
                f"sample {s.image_id!r} has no path; a stored dataset reads images by path"
            )
        key = (s.path, s.page)
        if key not in cache:
            cache[key] = image_info(s.path, page=key[1])
        out[s.image_id] = cache[key]
    return out


# ---------------------------------------------------------------------------- manifest


def _sample_record(stored: StoredDataset, sample: Sample) -> dict[str, Any]:
    return {
        "image_id": sample.image_id,
        "path": None if sample.path is None else str(sample.path),
        "page": sample.page,
        "labels": sorted(sample.labels),
        # Floats throughout, so that a loaded manifest hashes as the stored one did.
        "boxes": [
            {"box": [float(v) for v in b.as_list()], "label": b.label, "score": float(b.score)}
            for b in sample.boxes
        ],
        "group": sample.group,
        "degradation": sample.degradation,
        "seed": sample.seed,
        "mask": None if sample.mask is None else str(sample.mask),
        "split": stored.split[sample.image_id],
        "image": dataclasses.asdict(stored.images[sample.image_id]),
    }


def _fingerprint(stored: StoredDataset) -> str:
    """Hash classes, kinds, groups and every sample record (paths, hashes, split)."""
    records = sorted((_sample_record(stored, s) for s in stored.samples), key=_by_id)
    payload = {
        "classes": list(stored.classes),
        "kinds": stored.kinds,
        "groups": {g: list(labels) for g, labels in stored.groups.items()},
        "samples": records,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _by_id(record: Mapping[str, Any]) -> str:
    return str(record["image_id"])


def _manifest(stored: StoredDataset) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "name": stored.name,
        "version": stored.version,
        "fingerprint": stored.fingerprint,
        "created": stored.created,
        "seed": stored.seed,
        "source": stored.source,
        "classes": list(stored.classes),
        "kinds": stored.kinds,
        "groups": {g: list(labels) for g, labels in stored.groups.items()},
        "samples": [_sample_record(stored, s) for s in stored.samples],
    }


def _parse_manifest(data: Any, file: Path) -> StoredDataset:
    """Rebuild a stored dataset from its manifest, checking its shape and fingerprint."""
    try:
        if data["format"] != _FORMAT:
            raise ValueError(f"format {data['format']!r}, this version reads {_FORMAT}")
        records = list(data["samples"])
        stored = StoredDataset(
            name=str(data["name"]),
            version=int(data["version"]),
            fingerprint=str(data["fingerprint"]),
            classes=tuple(str(c) for c in data["classes"]),
            kinds={str(c): _one_of(k, ("image", "object")) for c, k in data["kinds"].items()},
            groups={str(g): tuple(str(lb) for lb in v) for g, v in data["groups"].items()},
            samples=tuple(_sample_from(r) for r in records),
            split={str(r["image_id"]): _one_of(r["split"], SPLITS) for r in records},
            images={str(r["image_id"]): ImageInfo(**r["image"]) for r in records},
            seed=int(data["seed"]),
            source=dict(data["source"]),
            created=str(data["created"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(
            f"{file}: not a valid dataset manifest ({type(exc).__name__}: {exc}); "
            "re-import the dataset"
        ) from exc
    if _fingerprint(stored) != stored.fingerprint:
        raise ConfigError(
            f"{file}: content does not match its fingerprint (edited or damaged); "
            "re-import the dataset"
        )
    return stored


def _one_of(value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {list(allowed)}")
    return value


def _sample_from(record: Mapping[str, Any]) -> Sample:
    boxes = []
    for b in record["boxes"]:
        x_min, y_min, x_max, y_max = (float(v) for v in b["box"])
        boxes.append(Box(x_min, y_min, x_max, y_max, str(b["label"]), float(b["score"])))
    fields: dict[str, Any] = {
        "image_id": str(record["image_id"]),
        "path": Path(record["path"]),
        "labels": frozenset(str(lb) for lb in record["labels"]),
        "boxes": tuple(boxes),
        "group": str(record["group"]),
        "degradation": str(record["degradation"]),
        "seed": int(record["seed"]),
        "mask": None if record["mask"] is None else Path(record["mask"]),
        "page": int(record.get("page", 0)),
    }
    return Sample(**fields)
