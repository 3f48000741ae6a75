"""Stored, versioned datasets: round trip, versions, the split, groups and summaries."""

import collections
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from phenocascade.data.labelled import LabelledSet
from phenocascade.data.registry import (
    SPLITS,
    ImageInfo,
    assign_splits,
    fixed_split,
    image_info,
    list_datasets,
    load_dataset,
    save_dataset,
)
from phenocascade.domain import Box, Sample
from phenocascade.errors import ConfigError, CorruptImageError, ValidationError


def _png(path: Path, *, size: tuple[int, int] = (12, 10), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 7).save(path)
    return path


def _tiff16(path: Path, *, size: tuple[int, int] = (16, 9)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, np.full((size[1], size[0]), 1000, dtype=np.uint16))
    return path


def _labelled(tmp_path: Path, labels_of: dict[str, set[str]], **extra: Sample) -> LabelledSet:
    """One 12x10 grey PNG per image id, with the given image labels."""
    samples = [
        Sample(f"{i}", _png(tmp_path / "img" / f"{i}.png"), labels=frozenset(labels), group=i)
        for i, labels in labels_of.items()
    ]
    samples.extend(extra.values())
    classes = sorted({lb for s in samples for lb in s.labels | {b.label for b in s.boxes}})
    return LabelledSet("test", tuple(classes), tuple(samples))


def _common_and_rare(tmp_path: Path, n_common: int = 20, n_rare: int = 3) -> LabelledSet:
    labels = {f"c{i:02d}": {"common"} for i in range(n_common)}
    labels.update({f"r{i}": {"rare"} for i in range(n_rare)})
    return _labelled(tmp_path, labels)


def _split_of(stored_split: Mapping[str, str], samples: tuple[Sample, ...], label: str) -> set[str]:
    return {stored_split[s.image_id] for s in samples if label in s.labels}


# ----------------------------------------------------------------------- round trip


def test_save_then_load_returns_the_same_dataset_with_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _png(Path("img/a.png"), size=(20, 16))
    mask = _png(Path("masks/a.png"), size=(20, 16))
    box = Box(1, 2, 9, 8, "cell", 0.75)
    samples = (
        Sample("a", Path("img/a.png"), frozenset({"cell", "stained"}), (box,), "src", mask=mask),
        Sample("a-blur", Path("img/a.png"), frozenset({"cell"}), (box,), "src", "blur", 3),
    )
    labelled = LabelledSet("t", ("cell", "stained"), samples)
    root = tmp_path / "datasets"

    stored = save_dataset(root, "cells", labelled, seed=5, source={"format": "test"})
    loaded = load_dataset(root, "cells")

    assert loaded == stored
    assert stored.version == 1
    assert (root / "cells" / "v1.json").is_file()
    assert (root / "cells" / "CURRENT").read_text().strip() == "1"
    assert stored.kinds == {"cell": "object", "stained": "image"}
    assert loaded.samples[0].path == (tmp_path / "img/a.png").resolve()
    assert loaded.samples[0].mask == mask.resolve()
    assert loaded.samples[1].degradation == "blur" and loaded.samples[1].seed == 3
    assert loaded.samples[0].boxes == (box,)
    assert loaded.split["a"] == loaded.split["a-blur"]
    assert loaded.images["a"].width == 20 and loaded.images["a"].height == 16
    assert loaded.seed == 5 and loaded.source == {"format": "test"}
    assert [d.name for d in list_datasets(root)] == ["cells"]


def test_image_info_reads_headers_and_hashes_the_bytes(tmp_path: Path) -> None:
    png = _png(tmp_path / "rgba.png", size=(30, 20), mode="RGBA")
    tif = _tiff16(tmp_path / "grey.tif", size=(16, 9))

    assert image_info(png) == ImageInfo(
        30, 20, 3, "uint8", hashlib.sha256(png.read_bytes()).hexdigest()
    )
    assert image_info(tif) == ImageInfo(
        16, 9, 1, "uint16", hashlib.sha256(tif.read_bytes()).hexdigest()
    )


def test_a_file_that_is_not_an_image_is_refused_naming_it(tmp_path: Path) -> None:
    bogus = tmp_path / "img" / "a.png"
    bogus.parent.mkdir()
    bogus.write_text("not pixels")
    labelled = LabelledSet("t", ("x",), (Sample("a", bogus, frozenset({"x"})),))

    with pytest.raises(CorruptImageError, match=f"{bogus}: not a TIFF, PNG or JPEG"):
        save_dataset(tmp_path / "ds", "d", labelled)


# ------------------------------------------------------------------------- versions


def test_same_content_keeps_its_version_and_a_changed_label_makes_the_next(
    tmp_path: Path,
) -> None:
    root = tmp_path / "datasets"
    first = _labelled(tmp_path, {"a": {"x"}, "b": {"y"}, "c": {"x"}})

    v1 = save_dataset(root, "demo", first)
    again = save_dataset(root, "demo", first)
    assert again.version == 1 and again.fingerprint == v1.fingerprint
    assert sorted(p.name for p in (root / "demo").iterdir()) == ["CURRENT", "v1.json"]

    changed = dataclasses.replace(
        first,
        samples=(
            dataclasses.replace(first.samples[0], labels=frozenset({"y"})),
            *first.samples[1:],
        ),
    )
    v2 = save_dataset(root, "demo", changed)

    assert v2.version == 2
    assert v2.fingerprint != v1.fingerprint
    assert (root / "demo" / "CURRENT").read_text().strip() == "2"
    assert load_dataset(root, "demo").version == 2
    assert load_dataset(root, "demo", 1).fingerprint == v1.fingerprint


def test_reimport_after_a_crash_before_current_commits_the_newest(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    first = _labelled(tmp_path, {"a": {"x"}, "b": {"y"}})
    save_dataset(root, "demo", first)
    changed = dataclasses.replace(first, classes=("x", "y", "z"))
    save_dataset(root, "demo", changed)
    (root / "demo" / "CURRENT").write_text("1\n")  # as if the import died before its commit

    assert load_dataset(root, "demo").version == 1
    assert save_dataset(root, "demo", changed).version == 2
    assert load_dataset(root, "demo").version == 2


def test_fingerprint_changes_with_a_label_and_not_with_the_import_time(tmp_path: Path) -> None:
    labelled = _labelled(tmp_path, {"a": {"x"}, "b": {"y"}})
    relabelled = dataclasses.replace(
        labelled,
        samples=(
            labelled.samples[0],
            dataclasses.replace(labelled.samples[1], labels=frozenset({"x"})),
        ),
    )

    one = save_dataset(tmp_path / "one", "d", labelled)
    two = save_dataset(tmp_path / "two", "d", labelled)
    three = save_dataset(tmp_path / "three", "d", relabelled)

    assert one.fingerprint == two.fingerprint
    assert three.fingerprint != one.fingerprint


# ---------------------------------------------------------------------------- split


def test_split_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    samples = _common_and_rare(tmp_path, n_common=30).samples

    assert assign_splits(samples, seed=3) == assign_splits(samples, seed=3)
    assert len({tuple(assign_splits(samples, seed=s).items()) for s in range(5)}) > 1


def test_split_never_separates_samples_of_one_group(tmp_path: Path) -> None:
    image = _png(tmp_path / "src.png")
    samples = [
        Sample(f"s{i}-{copy}", image, frozenset({"x"}), group=f"s{i}", degradation=copy)
        for i in range(12)
        for copy in ("", "blur", "noise")
    ]

    for seed in range(5):
        split = assign_splits(samples, seed=seed)
        by_group = collections.defaultdict(set)
        for s in samples:
            by_group[s.group].add(split[s.image_id])
        assert all(len(splits) == 1 for splits in by_group.values())
        assert set(split.values()) == set(SPLITS)


def test_a_fixed_split_gives_the_pages_of_a_stack_their_stack_s_split(tmp_path: Path) -> None:
    image = _png(tmp_path / "src.png")
    pages = [Sample(f"z@p{k}", image, group="z", page=k) for k in range(3)]
    alone = Sample("a", image)

    split = fixed_split([*pages, alone], {"z": "val", "a": "test"}, file="split.csv")

    assert split == {"z@p0": "val", "z@p1": "val", "z@p2": "val", "a": "test"}
    with pytest.raises(ValidationError, match="'z' would be in both val and train"):
        fixed_split(pages, {"z": "val", "z@p2": "train"}, file="split.csv")


@pytest.mark.parametrize("seed", range(8))
def test_rare_class_with_three_units_reaches_every_split(tmp_path: Path, seed: int) -> None:
    labelled = _common_and_rare(tmp_path, n_common=40, n_rare=3)

    split = assign_splits(labelled.samples, seed=seed)

    assert _split_of(split, labelled.samples, "rare") == set(SPLITS)
    counts = collections.Counter(split.values())
    assert (counts["train"], counts["val"], counts["test"]) in {(25, 9, 9), (26, 9, 8), (26, 8, 9)}


def test_rare_object_class_counts_for_stratification(tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png")
    samples = [
        Sample(f"n{i}", image, frozenset({"cell"}), (Box(0, 0, 2, 2, "cell"),)) for i in range(20)
    ]
    samples += [
        Sample(
            f"m{i}",
            image,
            frozenset({"cell", "mitosis"}),
            (Box(0, 0, 2, 2, "cell"), Box(3, 3, 5, 5, "mitosis")),
        )
        for i in range(3)
    ]

    split = assign_splits(samples, (0.8, 0.1, 0.1), seed=1)

    assert _split_of(split, tuple(samples), "mitosis") == set(SPLITS)


def test_a_split_with_no_share_gets_nothing(tmp_path: Path) -> None:
    samples = _common_and_rare(tmp_path).samples

    split = assign_splits(samples, (0.75, 0.25, 0.0))

    assert set(split.values()) == {"train", "val"}


def test_bad_fractions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="summing to 1"):
        save_dataset(tmp_path, "d", _common_and_rare(tmp_path), fractions=(0.6, 0.3, 0.3))


# --------------------------------------------------------------------------- checks


def test_two_labels_of_one_group_on_a_sample_are_refused_naming_it(tmp_path: Path) -> None:
    labelled = _labelled(tmp_path, {"ok": {"sex:f"}, "both": {"sex:f", "sex:m"}})

    with pytest.raises(ValidationError, match=r"sample 'both' has \['sex:f', 'sex:m'\].*'sex'"):
        save_dataset(tmp_path / "ds", "d", labelled, groups={"sex": ["sex:f", "sex:m"]})
    assert not (tmp_path / "ds").exists()


def test_a_group_of_unknown_or_object_labels_is_refused(tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png")
    boxed = Sample("b", image, frozenset({"cell"}), (Box(0, 0, 2, 2, "cell"),))
    labelled = _labelled(tmp_path, {"a": {"x"}}, boxed=boxed)

    with pytest.raises(ValidationError, match="'nope' is not an image label"):
        save_dataset(tmp_path, "d", labelled, groups={"g": ["x", "nope"]})
    with pytest.raises(ValidationError, match="'cell' is not an image label"):
        save_dataset(tmp_path, "d", labelled, groups={"g": ["x", "cell"]})


@pytest.mark.parametrize("name", ["", "Upper", "-dash", "a/b", "..", "sp ace", "x" * 65])
def test_a_bad_name_is_refused_with_the_allowed_form(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValidationError, match=re.escape("use 1-64 characters a-z 0-9 _ . -")):
        save_dataset(tmp_path, name, _labelled(tmp_path, {"a": {"x"}}))


def test_a_missing_dataset_names_itself_and_the_known_ones(tmp_path: Path) -> None:
    save_dataset(tmp_path, "there", _labelled(tmp_path, {"a": {"x"}}))

    with pytest.raises(ConfigError, match=r"no dataset 'gone'.*known: there"):
        load_dataset(tmp_path, "gone")
    with pytest.raises(ConfigError, match=r"'there' has no version 4"):
        load_dataset(tmp_path, "there", 4)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],
        lambda text: text.replace('"labels": [\n    "x"\n   ]', '"labels": [\n    "y"\n   ]'),
        lambda text: text.replace('"split": "', '"split": "holdout-'),
    ],
    ids=["truncated", "edited", "bad-split"],
)
def test_a_corrupt_manifest_is_refused_naming_the_file(
    tmp_path: Path, damage: Callable[[str], str]
) -> None:
    save_dataset(tmp_path, "d", _labelled(tmp_path, {"a": {"x"}}))
    manifest = tmp_path / "d" / "v1.json"
    damaged = damage(manifest.read_text())
    assert damaged != manifest.read_text()
    manifest.write_text(damaged)

    with pytest.raises(ConfigError, match=str(manifest)):
        load_dataset(tmp_path, "d")


def test_reimport_after_a_damaged_manifest_stores_the_next_version(tmp_path: Path) -> None:
    labelled = _labelled(tmp_path, {"a": {"x"}})
    save_dataset(tmp_path, "d", labelled)
    (tmp_path / "d" / "v1.json").write_text("{")
    (tmp_path / "d" / "CURRENT").write_text("garbage")

    repaired = save_dataset(tmp_path, "d", labelled)

    assert repaired.version == 2
    assert load_dataset(tmp_path, "d") == repaired


# ------------------------------------------------------------------------- readings


def test_split_set_keeps_only_the_asked_labels(tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png")
    boxes = (Box(0, 0, 2, 2, "cell"), Box(3, 3, 5, 5, "mitosis"))
    labelled = _labelled(
        tmp_path,
        {f"i{i}": {"stained"} for i in range(6)},
        boxed=Sample("b", image, frozenset({"cell", "mitosis", "stained"}), boxes),
    )
    stored = save_dataset(tmp_path / "ds", "d", labelled)
    split = stored.split["b"]

    subset = stored.split_set(split, ["mitosis"])

    assert subset.classes == ("mitosis",)
    assert subset.name == f"d/{split}"
    assert {s.image_id for s in subset.samples} == {
        i for i, sp in stored.split.items() if sp == split
    }
    b = next(s for s in subset.samples if s.image_id == "b")
    assert b.labels == {"mitosis"} and [x.label for x in b.boxes] == ["mitosis"]
    assert all(not s.labels for s in subset.samples if s.image_id != "b")
    assert sum(len(stored.split_set(sp)) for sp in SPLITS) == len(labelled)
    with pytest.raises(ValidationError, match="no labels \\['nope'\\]"):
        stored.split_set("train", ["nope"])


def test_label_table_counts_images_objects_and_splits(tmp_path: Path) -> None:
    image = _png(tmp_path / "x.png")
    samples = {
        "one": Sample("one", image, frozenset({"cell"}), (Box(0, 0, 2, 2, "cell"),) * 3),
        "two": Sample(
            "two",
            image,
            frozenset({"cell", "mitosis"}),
            (Box(0, 0, 2, 2, "cell"), Box(3, 3, 5, 5, "mitosis")),
        ),
    }
    labelled = _labelled(tmp_path, {"a": {"clear"}, "b": set()}, **samples)
    stored = save_dataset(tmp_path / "ds", "d", labelled, groups={"quality": ["clear"]})

    rows = {row["label"]: row for row in stored.label_table()}

    assert rows["cell"]["images"] == 2 and rows["cell"]["objects"] == 4
    assert rows["cell"]["object_fraction"] == 0.8 and rows["cell"]["image_fraction"] == 0.5
    assert rows["mitosis"]["kind"] == "object" and rows["mitosis"]["group"] is None
    assert rows["clear"]["kind"] == "image" and rows["clear"]["group"] == "quality"
    assert rows["clear"][stored.split["a"]] == 1
    assert sum(rows["cell"][sp] for sp in SPLITS) == 2


def test_summary_reports_bit_depths_modalities_and_sizes(tmp_path: Path) -> None:
    samples = (
        Sample("grey16", _tiff16(tmp_path / "g.tif", size=(16, 9)), frozenset({"x"})),
        Sample("rgb8", _png(tmp_path / "c.png", size=(30, 20), mode="RGB"), frozenset({"x"})),
        Sample("rgb8b", _png(tmp_path / "d.png", size=(40, 10), mode="RGB"), frozenset({"x"})),
    )
    stored = save_dataset(tmp_path / "ds", "mixed", LabelledSet("m", ("x",), samples))

    summary = stored.summary()

    assert summary["bit_depths"] == {"uint16": 1, "uint8": 2}
    assert summary["modalities"] == {"grey": 1, "rgb": 2}
    assert summary["channels"] == {"1": 1, "3": 2}
    assert summary["image_sizes"]["width"] == {"min": 16, "median": 30, "max": 40}
    assert summary["image_sizes"]["height"] == {"min": 9, "median": 10, "max": 20}
    assert sum(summary["splits"].values()) == summary["images"] == 3
    assert json.loads(json.dumps(summary)) == summary


def test_pages_of_a_multi_page_tiff_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "stack.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((9, 16), dtype=np.uint8))
        tif.write(np.zeros((12, 20), dtype=np.uint16))
    samples = tuple(Sample(f"p{p}", path, frozenset({"x"}), group="stack", page=p) for p in (0, 1))

    stored = save_dataset(tmp_path / "ds", "stack", LabelledSet("s", ("x",), samples))

    loaded = load_dataset(tmp_path / "ds", "stack")
    assert [s.page for s in loaded.samples] == [0, 1]
    assert stored.images["p1"].dtype == "uint16" and stored.images["p1"].width == 20
