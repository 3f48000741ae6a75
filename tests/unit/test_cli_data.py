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
