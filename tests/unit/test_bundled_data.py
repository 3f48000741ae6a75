"""The bundled datasets, imported and stored as a lab's own (counts from their README)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from phenocascade.config import Settings
from phenocascade.data import degrade, importers, registry
from phenocascade.data.labelled import load_pixels
from phenocascade.errors import AnnotationError, ValidationError
from phenocascade.recipes import bundled_data

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    path = Settings().datasets
    if not (path / "README.md").is_file():
        pytest.skip(f"shared datasets not found at {path} (set PHENOCASCADE_DATASETS)")
    return Settings(home=tmp_path_factory.mktemp("home"), datasets=path)


def test_the_bundled_sets_are_stored_datasets_with_their_fixed_splits(settings):
    stored = {name: bundled_data.bundled_dataset(settings, name) for name in bundled_data.BUNDLED}
    assert [d.name for d in registry.list_datasets(settings.dataset_store)] == sorted(stored)
    dsb = registry.load_dataset(settings.dataset_store, "dsb2018")
    assert dsb.fingerprint == stored["dsb2018"].fingerprint
    assert dsb.summary()["splits"] == {"train": 399, "val": 133, "test": 132}
    table = {row["label"]: row for row in dsb.label_table()}
    assert (table["nucleus"]["objects"], table["large_nucleus"]["objects"]) == (28986, 319)
    assert table["large_nucleus"]["images"] == 104 and table["large_nucleus"]["kind"] == "object"
    assert dsb.groups == {
        "nucleus_size": ("nucleus_size:small", "nucleus_size:medium", "nucleus_size:large"),
        "density": ("density:sparse", "density:medium", "density:dense"),
    }
    bccd = stored["bccd"]
    assert bccd.summary()["splits"] == {"train": 205, "val": 87, "test": 72}
    boxes = {row["label"]: row["objects"] for row in bccd.label_table()}
    assert boxes == {"RBC": 4155 - 2, "WBC": 372, "Platelets": 361}  # two zero-area RBCs
    # A second call in the process is the same version; so is an unchanged re-import.
    assert bundled_data.bundled_dataset(settings, "dsb2018") is stored["dsb2018"]


def test_the_import_recipes_are_the_documented_data_import_commands(settings, tmp_path):
    """Each recipe stores exactly what the command in the module's docstring stores."""
    d = settings.datasets.resolve()
    commands = {
        "dsb2018": ["masks", f"{d}/dsb2018/labels", f"{d}/dsb2018/images", "--label", "nucleus",
                    "--boxes", f"large_nucleus={d}/dsb2018/derived_stage3_rare_large_nuclei.csv",
                    "--labels", f"{d}/dsb2018/derived_stage2_labels.csv",
                    "--column", "nucleus_size=small,medium,large",
                    "--column", "density=sparse,medium,dense",
                    "--split-file", f"{d}/dsb2018/split.csv"],
        "bccd": ["voc", f"{d}/bccd/BCCD/Annotations", f"{d}/bccd/BCCD/JPEGImages",
                 "--classes", "RBC,WBC,Platelets", "--drop-degenerate",
                 "--split-file", f"{d}/bccd/BCCD/ImageSets/Main"],
        "bbbc006": ["folders", f"{d}/bbbc006_focus"],
    }  # fmt: skip
    env = {"PHENOCASCADE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for name, args in commands.items():
        done = subprocess.run(
            [sys.executable, "-m", "phenocascade", "data", "import", *args, "--name", name],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        cli = registry.load_dataset(tmp_path / "datasets", name)
        assert cli.fingerprint == bundled_data.bundled_dataset(settings, name).fingerprint, name


def test_views_of_dsb2018(settings):
    majority = {s: bundled_data.majority_set(settings, s) for s in SPLITS}
    assert {s: len(m) for s, m in majority.items()} == {"train": 399, "val": 133, "test": 132}
    assert majority["train"].classes == bundled_data.DSB_MAJORITY_CLASSES
    for sample in majority["train"].samples:  # one label per group, and its instance mask
        assert sorted(label.split(":")[0] for label in sample.labels) == ["density", "nucleus_size"]
        assert not sample.boxes and sample.mask is not None and sample.mask.is_file()
    ids = [set(bundled_data.split_ids(settings, "dsb2018", s)) for s in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    rare = [bundled_data.rare_set(settings, s) for s in SPLITS]
    assert sum(len(x.boxes) for r in rare for x in r.samples) == 319
    assert sum(1 for r in rare for x in r.samples if x.boxes) == 104
    assert sum(len(r) for r in rare) == 664 and rare[0].classes == ("large_nucleus",)
    negative = next(x for x in rare[0].samples if not x.boxes)
    assert negative.labels == frozenset() and negative.mask is None
    nuclei = [bundled_data.nuclei_set(settings, s) for s in SPLITS]
    assert sum(len(x.boxes) for n in nuclei for x in n.samples) == 28986


def test_strict_voc_import_of_all_bccd_names_the_first_bad_file(settings):
    base = settings.datasets / "bccd" / "BCCD"
    with pytest.raises(AnnotationError, match=r"BloodImage_00338\.xml:\d+: zero-area box"):
        importers.import_voc(base / "Annotations", base / "JPEGImages")
    got = importers.import_voc(base / "Annotations", base / "JPEGImages", drop_degenerate=True)
    assert [Path(d.file).name for d in got.dropped] == [
        "BloodImage_00338.xml",
        "BloodImage_00343.xml",
    ]
    assert got.label_counts()["WBC"] == 358
    assert got.label_counts()["Platelets"] == 201
    test = bundled_data.bccd_set(settings, "test")
    assert len(test) == 72 and test.classes == ("WBC", "Platelets")


def test_bbbc006_real_defocus(settings):
    focus = bundled_data.bbbc006_set(settings)
    clear = [s for s in focus.samples if s.labels == {"clear"}]
    unclear = [s for s in focus.samples if not s.labels]
    assert (len(clear), len(unclear)) == (9, 25)
    assert clear[0].group == "a01_s1"
    pixels = load_pixels(unclear[0])  # LZW TIFF through imagecodecs
    assert pixels.dtype == np.uint16
    assert pixels.shape == (520, 696, 1)
    # The sharpness measure separates every real sharp field from every defocused one.
    sharp = [degrade.sharpness(load_pixels(s)) for s in clear]
    blurred = [degrade.sharpness(load_pixels(s)) for s in unclear]
    assert min(sharp) > max(blurred)


def test_quality_set_keeps_copies_with_their_source(settings):
    quality = bundled_data.quality_set(settings, "val", seed=1, per_image=2, max_sources=10)
    assert len(quality) == 30
    clear = [s for s in quality.samples if s.labels == {"clear"}]
    assert len(clear) == 10 and all(not s.degradation for s in clear)
    for source in clear:
        copies = [s for s in quality.samples if s.group == source.image_id and s is not source]
        assert len(copies) == 2
        assert {c.degradation for c in copies} <= set(degrade.SEVERE)
        assert all(c.labels == frozenset() and c.path == source.path for c in copies)
    again = bundled_data.quality_set(settings, "val", seed=1, per_image=2, max_sources=10)
    assert again.fingerprint() == quality.fingerprint()
    other = bundled_data.quality_set(settings, "val", seed=2, per_image=2, max_sources=10)
    assert other.fingerprint() != quality.fingerprint()


def test_quality_set_sources_follow_both_official_splits(settings):
    full = bundled_data.quality_set(settings, "test", per_image=0)
    assert len(full) == 132 + 72
    train = bundled_data.quality_set(settings, "train", per_image=0)
    assert not {s.group for s in train.samples} & {s.group for s in full.samples}


def test_load_pixels_applies_the_degradation_deterministically(settings):
    quality = bundled_data.quality_set(settings, "test", seed=0, per_image=1, max_sources=2)
    source, copy = quality.samples[0], quality.samples[1]
    original = load_pixels(source)
    degraded = load_pixels(copy)
    assert degraded.dtype == original.dtype and degraded.shape == original.shape
    assert not np.array_equal(degraded, original)
    np.testing.assert_array_equal(degraded, load_pixels(copy))


def test_unknown_split_or_set_is_refused(settings):
    with pytest.raises(ValidationError, match="unknown split 'dev'"):
        bundled_data.majority_set(settings, "dev")
    with pytest.raises(ValidationError, match="no bundled dataset 'coco'"):
        bundled_data.bundled_dataset(settings, "coco")
