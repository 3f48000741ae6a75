"""``phenocascade data import|list|show``: imports store versioned datasets."""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from phenocascade.cli import main
from phenocascade.config import get_settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PHENOCASCADE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _folders(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (12, 10), i).save(root / label / f"{label}{i}.png")
    return root


def test_import_folders_stores_a_dataset_and_show_prints_its_counts(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _folders(tmp_path / "classes", {"normal": 12, "rare": 3})

    assert main(["data", "import", "folders", str(root), "--name", "x", "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stored dataset x version 1 (fingerprint ")
    assert "15 images, train/val/test " in out.splitlines()[0]
    assert "rare" in out
    assert (home / "datasets" / "x" / "v1.json").is_file()

    assert main(["data", "show", "x", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == 1 and summary["images"] == 15 and summary["seed"] == 2
    rows = {row["label"]: row for row in summary["labels"]}
    assert rows["normal"]["images"] == 12 and rows["rare"]["images"] == 3
    assert all(rows["rare"][split] == 1 for split in ("train", "val", "test"))
    assert summary["groups"] == {"class": ["normal", "rare"]}
    assert summary["bit_depths"] == {"uint8": 15} and summary["modalities"] == {"grey": 15}
    assert summary["source"]["format"] == "folders"
    assert summary["source"]["root"] == str(root.resolve())


def test_reimport_keeps_the_version_and_list_shows_it(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _folders(tmp_path / "classes", {"a": 3, "b": 3})
    args = ["data", "import", "folders", str(root), "--name", "ab"]
    main(args)
    main(args)
    capsys.readouterr()

    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "ab" in out and "a, b" in out
    assert sorted(p.name for p in (home / "datasets" / "ab").iterdir()) == ["CURRENT", "v1.json"]


def test_csv_columns_declare_their_groups(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "img"
    img.mkdir()
    lines = ["image_id,stain"]
    for i in range(6):
        Image.new("RGB", (12, 10)).save(img / f"i{i}.png")
        lines.append(f"i{i},{'he' if i % 2 else 'ihc'}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "summary.json"

    rc = main(
        [
            "data", "import", "csv", str(tmp_path / "labels.csv"), str(img),
            "--column", "stain=he,ihc", "--name", "stains", "--split", "0.5,0.5,0",
            "--out", str(out),
        ]
    )  # fmt: skip

    assert rc == 0
    summary = json.loads(out.read_text())
    assert summary["groups"] == {"stain": ["stain:he", "stain:ihc"]}
    assert summary["splits"] == {"train": 3, "val": 3, "test": 0}
    assert summary["dropped"] == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "Bad Name"], "dataset name 'Bad Name' is not allowed"),
        (["--name", "x", "--split", "0.5,0.5"], "--split '0.5,0.5': expected three fractions"),
        (["--name", "x", "--split", "0.5,0.4,0.3"], "must be three non-negative numbers"),
        (["--name", "x", "--group", "oops"], "--group 'oops': expected NAME=L1,L2"),
        (["--name", "x", "--group", "class=a"], "a group 'class' is already declared"),
        (["--name", "x", "--group", "g=a,zzz"], "'zzz' is not an image label"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    root = _folders(tmp_path / "classes", {"a": 3, "b": 3})

    assert main(["data", "import", "folders", str(root), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert not (home / "datasets").exists()


def test_show_of_an_unknown_dataset_lists_the_known_ones(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["data", "import", "folders", str(_folders(tmp_path / "c", {"a": 2})), "--name", "have"])
    capsys.readouterr()

    assert main(["data", "show", "want"]) == 2
    err = capsys.readouterr().err
    assert "no dataset 'want'" in err and "(known: have)" in err


def test_show_prints_sizes_bit_depths_modalities_and_groups(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(
        [
            "data",
            "import",
            "folders",
            str(_folders(tmp_path / "c", {"a": 3, "b": 3})),
            "--name",
            "d",
        ]
    )
    capsys.readouterr()

    assert main(["data", "show", "d"]) == 0
    out = capsys.readouterr().out
    assert "dataset d version 1" in out
    assert "width: min 12, median 12, max 12 px" in out
    assert "bit depths: uint8 6" in out
    assert "modalities: grey 6" in out
    assert "group class: a, b" in out


def test_import_class_masks_stores_object_classes(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, masks = tmp_path / "img", tmp_path / "masks"
    img.mkdir()
    for cls in ("cell", "mitosis"):
        (masks / cls).mkdir(parents=True)
    for i in range(6):
        Image.new("L", (16, 12)).save(img / f"i{i}.png")
        cells = np.zeros((12, 16), dtype=np.uint8)
        cells[1:4, 1:4] = 255
        cells[6:10, 8:14] = 255
        cells[11, 0] = 255  # one pixel: under --min-size
        Image.fromarray(cells).save(masks / "cell" / f"i{i}.png")
    (masks / "empty").mkdir()
    Image.new("L", (16, 12)).save(masks / "empty" / "i0.png")

    rc = main(
        ["data", "import", "class-masks", str(masks), str(img), "--name", "cm", "--min-size", "2"]
    )

    assert rc == 0
    assert "dropped" in capsys.readouterr().out
    assert main(["data", "show", "cm", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {row["label"]: row for row in summary["labels"]}
    assert rows["cell"]["kind"] == "object" and rows["cell"]["objects"] == 12
    assert rows["empty"]["kind"] == "object" and rows["empty"]["objects"] == 0
    assert summary["groups"] == {}


def _masks(root: Path, n: int) -> tuple[Path, Path]:
    """``n`` images with one instance each, as instance label images."""
    img, masks = root / "img", root / "masks"
    img.mkdir()
    masks.mkdir()
    for i in range(n):
        Image.new("L", (16, 12)).save(img / f"i{i}.png")
        instances = np.zeros((12, 16), dtype=np.uint16)
        instances[2 : 4 + i % 3, 2:6] = 1
        Image.fromarray(instances).save(masks / f"i{i}.png")
    return img, masks


def test_objects_and_a_table_of_image_labels_import_as_one_dataset_with_a_fixed_split(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, masks = _masks(tmp_path, 6)
    table = tmp_path / "labels.csv"
    table.write_text(
        "image_id,size,extra\n"
        + "".join(f"i{i},{'big' if i < 2 else 'small'},x\n" for i in range(6))
    )
    split = tmp_path / "split.csv"
    order = ["train"] * 2 + ["val"] * 2 + ["test"] * 2
    # An id of no imported image is ignored: a lab's split file may cover more.
    split.write_text(
        "image_id,split\n" + "".join(f"i{i},{s}\n" for i, s in enumerate(order)) + "gone,train\n"
    )

    rc = main(
        [
            *("data", "import", "masks", str(masks), str(img), "--name", "m"),
            *("--labels", str(table), "--column", "size=small,big", "--split-file", str(split)),
        ]
    )

    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["data", "show", "m", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = {row["label"]: row for row in summary["labels"]}
    assert rows["nucleus"]["kind"] == "object" and rows["nucleus"]["objects"] == 6
    assert rows["size:big"]["kind"] == "image" and rows["size:big"]["images"] == 2
    assert rows["size:small"]["images"] == 4
    assert summary["groups"] == {"size": ["size:small", "size:big"]}
    assert summary["splits"] == {"train": 2, "val": 2, "test": 2}
    stored = json.loads((home / "datasets" / "m" / "v1.json").read_text())
    by_id = {r["image_id"]: r["split"] for r in stored["samples"]}
    assert by_id == {f"i{i}": s for i, s in enumerate(order)}


def test_a_voc_style_folder_of_id_lists_is_a_split_file(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, masks = _masks(tmp_path, 3)
    lists = tmp_path / "Main"
    lists.mkdir()
    for i, split in enumerate(("train", "val", "test")):
        (lists / f"{split}.txt").write_text(f"i{i}\n\n")

    rc = main(["data", "import", "masks", str(masks), str(img), "--name", "v"])
    assert rc == 0
    rc = main(
        [
            *("data", "import", "masks", str(masks), str(img)),
            "--name",
            "w",
            "--split-file",
            str(lists),
        ]
    )

    assert rc == 0, capsys.readouterr().err
    assert "train/val/test 1/1/1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("split_rows", "labels_rows", "extra", "message"),
    [
        ("i0,train\ni1,val\n", None, [], "gives no split to images ['i2'] (1 in all)"),
        ("i0,train\ni1,val\ni2,holdout\n", None, [], "split.csv:4: unknown split 'holdout'"),
        ("i0,train\ni0,val\n", None, [], "split.csv:3: image 'i0' is listed twice"),
        (None, "i0,a\ni1,b\n", ["--column", "g=a,b"], "labels.csv: no row for images ['i2']"),
        (None, "i0,a\ni1,c\ni2,a\n", ["--column", "g=a,b"], "labels.csv:3: unknown class g:'c'"),
        (None, "i0,a\n", [], "name its label columns with --column"),
        (None, None, ["--column", "g=a,b"], "--column needs --labels CSV"),
    ],
)
def test_a_bad_split_file_or_label_table_is_one_line_naming_it(
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    split_rows: str | None,
    labels_rows: str | None,
    extra: list[str],
    message: str,
) -> None:
    img, masks = _masks(tmp_path, 3)
    args = ["data", "import", "masks", str(masks), str(img), "--name", "bad", *extra]
    if split_rows is not None:
        (tmp_path / "split.csv").write_text("image_id,split\n" + split_rows)
        args += ["--split-file", str(tmp_path / "split.csv")]
    if labels_rows is not None:
        (tmp_path / "labels.csv").write_text("image_id,g\n" + labels_rows)
        args += ["--labels", str(tmp_path / "labels.csv")]

    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert not (home / "datasets").exists()


def test_a_table_of_rare_boxes_joins_the_mask_objects_as_an_object_class(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img, masks = _masks(tmp_path, 4)
    rare = tmp_path / "rare.csv"
    rare.write_text("image_id,instance,x_min,y_min,x_max,y_max\ni1,1,2,2,6,5\n")

    rc = main(
        [
            *("data", "import", "masks", str(masks), str(img), "--name", "r"),
            *("--boxes", f"outsized={rare}"),
        ]
    )

    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["data", "show", "r", "--json"]) == 0
    rows = {row["label"]: row for row in json.loads(capsys.readouterr().out)["labels"]}
    assert rows["nucleus"]["objects"] == 4
    assert (rows["outsized"]["kind"], rows["outsized"]["objects"], rows["outsized"]["images"]) == (
        "object",
        1,
        1,
    )


@pytest.mark.parametrize(
    ("rows", "spec", "message"),
    [
        ("i9,2,2,6,5\n", "outsized={csv}", "rare.csv:2: image 'i9' is not in the import"),
        ("i0,2,2,60,5\n", "outsized={csv}", "rare.csv:2: box (2.0, 2.0, 60.0, 5.0) of 'outsized'"),
        ("i0,2,2,6,5\n", "nucleus={csv}", "class 'nucleus' is already a class of the import"),
        ("i0,2,2,6,5\n", "{csv}", "--boxes"),
    ],
)
def test_a_bad_table_of_boxes_is_one_line_naming_it(
    home: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    rows: str,
    spec: str,
    message: str,
) -> None:
    img, masks = _masks(tmp_path, 2)
    csv = tmp_path / "rare.csv"
    csv.write_text("image_id,x_min,y_min,x_max,y_max\n" + rows)
    args = ["data", "import", "masks", str(masks), str(img), "--name", "bad"]

    assert main([*args, "--boxes", spec.format(csv=csv)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert not (home / "datasets").exists()
