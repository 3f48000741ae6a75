r"""Import recipes of the bundled datasets: DSB 2018, BCCD and BBBC006 as stored datasets.

The shared datasets folder (``Settings.datasets``; its README describes the files)
holds three public sets. Each is imported here as a lab imports its own
(``docs/own-data.md``): the importers of :mod:`phenocascade.data.importers` read the
files strictly, the split is the set's own fixed one, and
:func:`phenocascade.data.registry.save_dataset` stores it as a version under
``<home>/datasets``, where ``data list``, ``data show`` and ``plan`` find it. These are
the same imports as the commands (``D`` the datasets folder)::

    phenocascade data import masks $D/dsb2018/labels $D/dsb2018/images --label nucleus \
        --boxes large_nucleus=$D/dsb2018/derived_stage3_rare_large_nuclei.csv \
        --labels $D/dsb2018/derived_stage2_labels.csv \
        --column nucleus_size=small,medium,large --column density=sparse,medium,dense \
        --split-file $D/dsb2018/split.csv --name dsb2018
    phenocascade data import voc $D/bccd/BCCD/Annotations $D/bccd/BCCD/JPEGImages \
        --classes RBC,WBC,Platelets --drop-degenerate \
        --split-file $D/bccd/BCCD/ImageSets/Main --name bccd
    phenocascade data import folders $D/bbbc006_focus --name bbbc006

The bundled recipes (:mod:`.bundled`), the demo, the tests and the benchmarks read the
stored versions through the views below; below the recipes no code names these sets.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from phenocascade.config import Settings
from phenocascade.data import importers, registry
from phenocascade.data.degrade import SEVERE
from phenocascade.data.labelled import QUALITY_LABEL, LabelledSet, quality_examples
from phenocascade.domain import Sample
from phenocascade.errors import ValidationError

__all__ = [
    "BCCD_CLASSES",
    "BUNDLED",
    "DSB_MAJORITY_CLASSES",
    "DSB_NUCLEUS_CLASS",
    "DSB_RARE_CLASS",
    "bbbc006_set",
    "bccd_set",
    "bundled_dataset",
    "majority_set",
    "nuclei_set",
    "quality_set",
    "rare_set",
    "split_ids",
    "split_samples",
]

DSB_COLUMNS: dict[str, tuple[str, ...]] = {
    "nucleus_size": ("small", "medium", "large"),
    "density": ("sparse", "medium", "dense"),
}
DSB_MAJORITY_CLASSES: tuple[str, ...] = tuple(
    label for labels in importers.column_groups(DSB_COLUMNS).values() for label in labels
)
DSB_NUCLEUS_CLASS = "nucleus"
DSB_RARE_CLASS = "large_nucleus"
BCCD_CLASSES: tuple[str, ...] = ("RBC", "WBC", "Platelets")
BUNDLED: tuple[str, ...] = ("dsb2018", "bccd", "bbbc006")
# BBBC006's class folders: sharp fields, and fields about 32 um off focus.
_BBBC006_CLEAR = "clear_zaligned10"
# BBBC006 field names carry well and site, e.g. "..._a01_s1_w1..." and "...__a01__s1__w1_10".
_BBBC006_FIELD = re.compile(r"_+([a-p]\d\d)_+(s\d)_+w1")

_lock = threading.Lock()
_imported: dict[tuple[Path, Path, str], registry.StoredDataset] = {}


def _import_dsb2018(root: Path) -> tuple[LabelledSet, dict[str, list[str]], Path]:
    """Read DSB 2018: nuclei from the instance masks, rare boxes and image labels beside."""
    base = root / "dsb2018"
    labelled = importers.import_instance_masks(
        base / "labels", base / "images", DSB_NUCLEUS_CLASS, name="dsb2018"
    )
    labelled = importers.add_boxes(
        labelled, base / "derived_stage3_rare_large_nuclei.csv", DSB_RARE_CLASS
    )
    labelled = importers.add_image_labels(labelled, base / "derived_stage2_labels.csv", DSB_COLUMNS)
    return labelled, importers.column_groups(DSB_COLUMNS), base / "split.csv"


def _import_bccd(root: Path) -> tuple[LabelledSet, dict[str, list[str]], Path]:
    """Read BCCD's VOC files, its two zero-area RBC boxes dropped with a report."""
    base = root / "bccd" / "BCCD"
    labelled = importers.import_voc(
        base / "Annotations",
        base / "JPEGImages",
        classes=BCCD_CLASSES,
        drop_degenerate=True,
        name="bccd",
    )
    return labelled, {}, base / "ImageSets" / "Main"


def bundled_dataset(settings: Settings, name: str) -> registry.StoredDataset:
    """Import one bundled dataset into the store once per process, and return it.

    An unchanged re-import keeps the stored version (:func:`registry.save_dataset`).

    Parameters
    ----------
    settings : Settings
        ``datasets`` (the shared files) and ``dataset_store`` (where it is stored).
    name : {"dsb2018", "bccd", "bbbc006"}
        Which set.

    Raises
    ------
    ValidationError
        For another name.
    AnnotationError
        If a file of the set is malformed, naming file and line.
    """
    if name not in BUNDLED:
        raise ValidationError(f"no bundled dataset {name!r}; the bundled ones are {list(BUNDLED)}")
    root, store = settings.datasets.resolve(), settings.dataset_store.resolve()
    key = (root, store, name)
    with _lock:
        if key not in _imported:
            _imported[key] = _store(root, store, name)
        return _imported[key]


def _store(root: Path, store: Path, name: str) -> registry.StoredDataset:
    """Import ``name`` from ``root`` and save it in ``store`` (see :func:`bundled_dataset`)."""
    if name == "bbbc006":
        labelled = importers.import_class_folders(root / "bbbc006_focus", name=name)
        groups = {"class": list(labelled.classes)}
        return registry.save_dataset(store, name, labelled, groups=groups, source={"bundled": name})
    labelled, groups, split_file = (_import_dsb2018 if name == "dsb2018" else _import_bccd)(root)
    split = registry.fixed_split(
        labelled.samples, importers.read_split_file(split_file), file=str(split_file)
    )
    # Every class without a box is an image label (registry.save_dataset's rule).
    return registry.save_dataset(
        store,
        name,
        labelled,
        groups=groups,
        split=split,
        source={"bundled": name},
    )


def split_samples(settings: Settings, name: str, split: str) -> tuple[Sample, ...]:
    """Return the samples of one split of a bundled set, every label kept, in id order."""
    return bundled_dataset(settings, name).split_set(split).samples


def split_ids(settings: Settings, name: str, split: str) -> list[str]:
    """Return the image ids of one split of a bundled set, in id order."""
    return [s.image_id for s in split_samples(settings, name, split)]


def majority_set(settings: Settings, split: str) -> LabelledSet:
    """Return DSB 2018 with its six image labels in two groups (size and density).

    Each sample keeps its instance label image as ``Sample.mask``: the morphometric
    classifier learns its nuclei from them.
    """
    return bundled_dataset(settings, "dsb2018").split_set(split, DSB_MAJORITY_CLASSES)


def rare_set(settings: Settings, split: str) -> LabelledSet:
    """Return DSB 2018 with its rare boxes: nuclei over 3x their image's median area.

    319 boxes in 104 of the 664 images; every image of the split is returned, those
    without a rare box as negatives. The instance masks are left out: their objects are
    every nucleus, not this class.
    """
    rare = bundled_dataset(settings, "dsb2018").split_set(split, (DSB_RARE_CLASS,))
    return dataclasses.replace(
        rare, samples=tuple(dataclasses.replace(s, mask=None) for s in rare.samples)
    )


def nuclei_set(settings: Settings, split: str) -> LabelledSet:
    """Return DSB 2018 with a box around every nucleus, from its instance masks."""
    return bundled_dataset(settings, "dsb2018").split_set(split, (DSB_NUCLEUS_CLASS,))


def bccd_set(
    settings: Settings, split: str, classes: Sequence[str] = ("WBC", "Platelets")
) -> LabelledSet:
    """Return a split of BCCD's blood smears (official split: 205/87/72) with ``classes``."""
    return bundled_dataset(settings, "bccd").split_set(split, tuple(classes))


def quality_set(
    settings: Settings,
    split: str,
    *,
    seed: int = 0,
    per_image: int = 2,
    max_sources: int | None = None,
) -> LabelledSet:
    """Build the generic quality gate's set: clear images plus severely degraded copies.

    Sources are the DSB 2018 and BCCD images of ``split``. Each gives one sample labelled
    ``{"clear"}`` and ``per_image`` unclear copies (no label), each of another kind drawn
    from :data:`phenocascade.data.degrade.SEVERE`, applied by
    :func:`~phenocascade.data.labelled.load_pixels`. A source and its copies share
    ``group`` = the source's id, ``"dsb2018:<id>"`` or ``"bccd:<id>"``; a copy's id is
    ``"<source id>~<degradation>"``.

    Parameters
    ----------
    settings : Settings
        Where the sets are.
    split : {"train", "val", "test"}
        Which split of both sets.
    seed : int, default 0
        Seed of the source subset, the kinds drawn and each copy's degradation seed.
    per_image : int, default 2
        Degraded copies per source, ``0..len(SEVERE)``.
    max_sources : int or None, default None
        Keep a seeded random subset of this many sources (id order kept); ``None`` keeps
        all.

    Raises
    ------
    ValidationError
        If ``per_image`` or ``max_sources`` is out of range.
    """
    if not 0 <= per_image <= len(SEVERE):
        raise ValidationError(f"per_image must be in 0..{len(SEVERE)}, got {per_image}")
    if max_sources is not None and max_sources < 1:
        raise ValidationError(f"max_sources must be at least 1, got {max_sources}")
    sources = [
        (f"{name}:{s.image_id}", s.path)
        for name in ("dsb2018", "bccd")
        for s in split_samples(settings, name, split)
    ]
    if max_sources is not None and max_sources < len(sources):
        chosen = np.random.default_rng(seed).choice(len(sources), max_sources, replace=False)
        sources = [sources[i] for i in sorted(chosen)]
    clear = [Sample(source_id, path, group=source_id) for source_id, path in sources]
    return quality_examples(clear, name=f"quality/{split}", seed=seed, per_image=per_image)


def bbbc006_set(settings: Settings) -> LabelledSet:
    """Return BBBC006's real defocus (16-bit U2OS Hoechst, 696x520), for testing the gate.

    The 9 sharp fields are labelled ``{"clear"}``, the 25 fields about 32 um off focus
    have no label; ``group`` is a field's well and site (e.g. ``"a01_s1"``). Every image
    of the set, whatever its stored split: use it to test the gate, never to train it.
    """
    stored = bundled_dataset(settings, "bbbc006")
    samples = []
    for s in stored.samples:
        match = _BBBC006_FIELD.search(s.image_id)
        labels = frozenset({QUALITY_LABEL}) if _BBBC006_CLEAR in s.labels else frozenset[str]()
        group = f"{match[1]}_{match[2]}" if match else s.image_id
        samples.append(dataclasses.replace(s, labels=labels, group=group))
    return LabelledSet("bbbc006", (QUALITY_LABEL,), tuple(samples))
