"""The loaders against the real shared datasets (Settings().datasets); counts from its README."""

from pathlib import Path

import numpy as np
import pytest

from phenocascade.config import Settings
from phenocascade.data import datasets, degrade, importers
from phenocascade.errors import AnnotationError, ValidationError


@pytest.fixture(scope="module")
def root() -> Path:
    path = Settings().datasets
    if not (path / "README.md").is_file():
        pytest.skip(f"shared datasets not found at {path} (set PHENOCASCADE_DATASETS)")
    return path


def test_dsb_split_sizes_and_majority_labels(root):
    sizes = {s: len(datasets.dsb2018_majority(root, s)) for s in datasets.SPLITS}
    assert sizes == {"train": 399, "val": 133, "test": 132}
    train = datasets.dsb2018_majority(root, "train")
    assert train.classes == datasets.DSB_MAJORITY_CLASSES
    for sample in train.samples:  # exactly one label per group
        assert sorted(label.split(":")[0] for label in sample.labels) == ["density", "nucleus_size"]
        assert sample.path is not None and sample.path.is_file()


def test_splits_are_disjoint(root):
    ids = [set(datasets.split_ids(root, "dsb2018", s)) for s in datasets.SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(i) for i in ids) == 664


def test_rare_boxes_319_in_104_images_with_negatives(root):
    sets = [datasets.dsb2018_rare(root, s) for s in datasets.SPLITS]
    boxes = sum(len(x.boxes) for rare in sets for x in rare.samples)
    positives = sum(1 for rare in sets for x in rare.samples if x.boxes)
    assert (boxes, positives) == (319, 104)
    assert sum(len(rare) for rare in sets) == 664  # every image, negatives included
    assert sets[0].classes == ("large_nucleus",)
    negative = next(x for x in sets[0].samples if not x.boxes)
    assert negative.labels == frozenset()


def test_bccd_official_split_and_degenerate_boxes(root):
    test = datasets.bccd(root, "test")
    assert len(test) == 72
    assert test.classes == ("WBC", "Platelets")
    with pytest.raises(AnnotationError, match=r"BloodImage_00343\.xml:\d+: zero-area box"):
        datasets.bccd(root, "train")
    sizes = {s: len(datasets.bccd(root, s, drop_degenerate=True)) for s in datasets.SPLITS}
    assert sizes == {"train": 205, "val": 87, "test": 72}


def test_strict_voc_import_of_all_bccd_names_the_first_bad_file(root):
    base = root / "bccd" / "BCCD"
    with pytest.raises(AnnotationError, match=r"BloodImage_00338\.xml:\d+: zero-area box"):
        importers.import_voc(base / "Annotations", base / "JPEGImages")
    got = importers.import_voc(base / "Annotations", base / "JPEGImages", drop_degenerate=True)
    assert [Path(d.file).name for d in got.dropped] == [
        "BloodImage_00338.xml",
        "BloodImage_00343.xml",
    ]
    assert got.box_counts() == {"Platelets": 361, "RBC": 4155 - 2, "WBC": 372}
    assert got.label_counts()["WBC"] == 358
    assert got.label_counts()["Platelets"] == 201


def test_bbbc006_real_defocus(root):
    focus = datasets.bbbc006(root)
    clear = [s for s in focus.samples if s.labels == {"clear"}]
    unclear = [s for s in focus.samples if not s.labels]
    assert (len(clear), len(unclear)) == (9, 25)
    pixels = datasets.load_pixels(unclear[0])  # LZW TIFF through imagecodecs
    assert pixels.dtype == np.uint16
    assert pixels.shape == (520, 696, 1)
    # The sharpness measure separates every real sharp field from every defocused one.
    sharp = [degrade.sharpness(datasets.load_pixels(s)) for s in clear]
    blurred = [degrade.sharpness(datasets.load_pixels(s)) for s in unclear]
    assert min(sharp) > max(blurred)


def test_quality_set_keeps_copies_with_their_source(root):
    quality = datasets.quality_set(root, "val", seed=1, per_image=2, max_sources=10)
    assert len(quality) == 30
    clear = [s for s in quality.samples if s.labels == {"clear"}]
    assert len(clear) == 10 and all(not s.degradation for s in clear)
    for source in clear:
        copies = [s for s in quality.samples if s.group == source.image_id and s is not source]
        assert len(copies) == 2
        assert {c.degradation for c in copies} <= set(degrade.SEVERE)
        assert all(c.labels == frozenset() and c.path == source.path for c in copies)
    again = datasets.quality_set(root, "val", seed=1, per_image=2, max_sources=10)
    assert again.fingerprint() == quality.fingerprint()
    other = datasets.quality_set(root, "val", seed=2, per_image=2, max_sources=10)
    assert other.fingerprint() != quality.fingerprint()


def test_quality_set_sources_follow_both_official_splits(root):
    full = datasets.quality_set(root, "test", per_image=0)
    assert len(full) == 132 + 72
    train_groups = {s.group for s in datasets.quality_set(root, "train", per_image=0).samples}
    assert not train_groups & {s.group for s in full.samples}


def test_load_pixels_applies_the_degradation_deterministically(root):
    quality = datasets.quality_set(root, "test", seed=0, per_image=1, max_sources=2)
    source, copy = quality.samples[0], quality.samples[1]
    original = datasets.load_pixels(source)
    degraded = datasets.load_pixels(copy)
    assert degraded.dtype == original.dtype and degraded.shape == original.shape
    assert not np.array_equal(degraded, original)
    np.testing.assert_array_equal(degraded, datasets.load_pixels(copy))


def test_unknown_split_is_refused(root):
    with pytest.raises(ValidationError, match="unknown split 'dev'"):
        datasets.dsb2018_majority(root, "dev")  # type: ignore[arg-type]
