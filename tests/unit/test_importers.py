import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from phenocascade.data import importers
from phenocascade.data.labelled import LabelledSet, load_pixels
from phenocascade.domain import Box, Sample
from phenocascade.errors import AnnotationError, ValidationError
from phenocascade.models.segmentation import read_mask


def _png(path: Path, width: int = 20, height: int = 16, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (width, height), 0).save(path)
    return path


def _line_of(text: str, needle: str, occurrence: int = 0) -> int:
    """1-based line of the n-th line containing ``needle``."""
    hits = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    return hits[occurrence]


def _raises_at(file: Path, line: int | None, match: str):
    where = re.escape(f"{file}:{line}: ") if line is not None else re.escape(f"{file}")
    return pytest.raises(AnnotationError, match=f"{where}.*{match}")


# --------------------------------------------------------------------------- VOC


def _voc_object(name: str, box: tuple[str, ...]) -> str:
    xmin, ymin, xmax, ymax = box
    return (
        "  <object>\n"
        f"    <name>{name}</name>\n"
        "    <bndbox>\n"
        f"      <xmin>{xmin}</xmin>\n      <ymin>{ymin}</ymin>\n"
        f"      <xmax>{xmax}</xmax>\n      <ymax>{ymax}</ymax>\n"
        "    </bndbox>\n"
        "  </object>\n"
    )


def _voc(tmp_path: Path, objects: list[tuple[str, tuple[str, ...]]], *, size=(20, 16)) -> Path:
    _png(tmp_path / "img" / "a.png")
    text = (
        "<annotation>\n  <filename>a.png</filename>\n"
        f"  <size>\n    <width>{size[0]}</width>\n    <height>{size[1]}</height>\n  </size>\n"
        + "".join(_voc_object(n, b) for n, b in objects)
        + "</annotation>\n"
    )
    path = tmp_path / "ann" / "a.xml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_voc_converts_one_based_inclusive_to_half_open(tmp_path):
    _voc(tmp_path, [("cell", ("1", "2", "20", "16")), ("dot", ("5", "5", "6", "7"))])
    got = importers.import_voc(tmp_path / "ann", tmp_path / "img", keep=["cell", "dot"])
    (sample,) = got.samples
    assert sample.boxes == (Box(0, 1, 20, 16, "cell"), Box(4, 4, 6, 7, "dot"))
    assert sample.labels == {"cell", "dot"}
    assert got.dropped == ()


def test_voc_box_outside_image_names_file_and_line(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "5", "5")), ("cell", ("3", "3", "21", "9"))])
    line = _line_of(path.read_text(), "<bndbox>", occurrence=1)
    with _raises_at(path, line, "outside the 20x16 image"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img")


def test_voc_zero_area_box_raises_unless_dropped_with_a_report(tmp_path):
    path = _voc(tmp_path, [("cell", ("2", "2", "9", "9")), ("cell", ("7", "8", "7", "12"))])
    line = _line_of(path.read_text(), "<bndbox>", occurrence=1)
    with _raises_at(path, line, "zero-area box"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img")
    got = importers.import_voc(tmp_path / "ann", tmp_path / "img", drop_degenerate=True)
    assert got.samples[0].boxes == (Box(1, 1, 9, 9, "cell"),)
    (dropped,) = got.dropped
    assert (dropped.file, dropped.line, dropped.label) == (str(path), line, "cell")
    assert dropped.box == (7.0, 8.0, 7.0, 12.0)


def test_voc_unknown_class_names_the_name_line(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "5", "5")), ("ghost", ("1", "1", "5", "5"))])
    line = _line_of(path.read_text(), "<name>ghost</name>")
    with _raises_at(path, line, "unknown class 'ghost'"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img", classes=["cell"])


def test_voc_validates_boxes_of_classes_it_does_not_keep(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "5", "5")), ("rbc", ("4", "4", "4", "4"))])
    with _raises_at(path, _line_of(path.read_text(), "<bndbox>", 1), "zero-area"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img", keep=["cell"])


def test_voc_bad_xml_names_the_line(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "5", "5"))])
    text = path.read_text().replace("</ymax>", "</ymx>", 1)
    path.write_text(text)
    with _raises_at(path, _line_of(text, "</ymx>"), "bad XML: mismatched tag"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img")


def test_voc_non_numeric_coordinate(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "five", "5"))])
    with _raises_at(path, _line_of(path.read_text(), "<xmax>"), "<xmax> is 'five'"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img")


def test_voc_missing_image(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "5", "5"))])
    (tmp_path / "img" / "a.png").unlink()
    with _raises_at(path, _line_of(path.read_text(), "<filename>"), "does not exist"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img")


def test_voc_size_disagreeing_with_the_image(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "5", "5"))], size=(20, 17))
    with _raises_at(path, _line_of(path.read_text(), "<height>"), "<height> is 17"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img")


def test_voc_missing_annotation_id(tmp_path):
    _voc(tmp_path, [("cell", ("1", "1", "5", "5"))])
    with _raises_at(tmp_path / "ann" / "b.xml", None, "does not exist"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img", ids=["a", "b"])


def test_voc_refuses_a_doctype(tmp_path):
    path = _voc(tmp_path, [("cell", ("1", "1", "5", "5"))])
    path.write_text('<!DOCTYPE annotation [<!ENTITY x "y">]>\n' + path.read_text())
    with _raises_at(path, 1, "DOCTYPE is refused"):
        importers.import_voc(tmp_path / "ann", tmp_path / "img")


def test_annotation_errors_are_validation_errors():
    assert issubclass(AnnotationError, ValidationError)


# -------------------------------------------------------------------------- COCO


def _coco(tmp_path: Path, **changes) -> Path:
    _png(tmp_path / "img" / "a.png")
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 16}],
        "categories": [{"id": 3, "name": "cell"}],
        "annotations": [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [2, 3, 4, 5]}],
    }
    for key, value in changes.items():
        doc[key] = value
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def _ann(**fields):
    return {"id": 9, "image_id": 1, "category_id": 3, "bbox": [2, 3, 4, 5], **fields}


def test_coco_converts_xywh_to_half_open(tmp_path):
    got = importers.import_coco(_coco(tmp_path), tmp_path / "img")
    assert got.classes == ("cell",)
    assert got.samples[0].image_id == "a"
    assert got.samples[0].boxes == (Box(2, 3, 6, 8, "cell"),)


@pytest.mark.parametrize(
    ("annotation", "message"),
    [
        (_ann(bbox=[10, 3, 12, 5]), r"annotations\[0\]: box .* outside the 20x16 image"),
        (_ann(bbox=[2, 3, 0, 5]), r"annotations\[0\]: zero-area box"),
        (_ann(category_id=4), r"annotations\[0\]: unknown category_id 4"),
        (_ann(image_id=2), r"annotations\[0\]: unknown image_id 2"),
        (_ann(iscrowd=1), r"annotations\[0\]: crowd annotations"),
        (_ann(bbox=[2, 3, 4]), r"annotations\[0\]\.bbox .* is not \[x, y, width, height\]"),
        ({"id": 9, "image_id": 1, "bbox": [2, 3, 4, 5]}, r"annotations\[0\] has no 'category_id'"),
    ],
)
def test_coco_bad_annotation_names_file_and_element(tmp_path, annotation, message):
    path = _coco(tmp_path, annotations=[annotation])
    with _raises_at(path, None, message):
        importers.import_coco(path, tmp_path / "img")


def test_coco_drop_degenerate_reports_the_element(tmp_path):
    path = _coco(tmp_path, annotations=[_ann(), _ann(id=10, bbox=[2, 3, 4, 0])])
    got = importers.import_coco(path, tmp_path / "img", drop_degenerate=True)
    assert len(got.samples[0].boxes) == 1
    assert [(d.file, d.label) for d in got.dropped] == [(str(path), "cell")]


def test_coco_bad_json_names_the_line(tmp_path):
    path = _coco(tmp_path)
    text = path.read_text().replace('"bbox"', "bbox")
    path.write_text(text)
    with _raises_at(path, _line_of(text, "bbox"), "bad JSON"):
        importers.import_coco(path, tmp_path / "img")


def test_coco_unknown_class_missing_image_and_size_mismatch(tmp_path):
    path = _coco(tmp_path)
    with _raises_at(path, None, r"categories\[0\]: unknown class 'cell'"):
        importers.import_coco(path, tmp_path / "img", classes=["nucleus"])
    path = _coco(tmp_path, images=[{"id": 1, "file_name": "a.png", "width": 21, "height": 16}])
    with _raises_at(path, None, r"images\[0\]: states 21x16 but a.png is 20x16"):
        importers.import_coco(path, tmp_path / "img")
    path = _coco(tmp_path, images=[{"id": 1, "file_name": "b.png", "width": 20, "height": 16}])
    with _raises_at(path, None, r"images\[0\]: image .*b.png does not exist"):
        importers.import_coco(path, tmp_path / "img")


# -------------------------------------------------------------------------- YOLO


def _yolo(tmp_path: Path, text: str) -> Path:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "neg.png")
    path = tmp_path / "labels" / "a.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_yolo_converts_normalised_boxes_and_keeps_negatives(tmp_path):
    _yolo(tmp_path, "1 0.5 0.5 0.5 0.25\n\n")
    got = importers.import_yolo(tmp_path / "labels", tmp_path / "img", ["rbc", "wbc"])
    by_id = {s.image_id: s for s in got.samples}
    assert by_id["a"].boxes == (Box(5, 6, 15, 10, "wbc"),)
    assert by_id["neg"].boxes == ()
    assert by_id["neg"].labels == frozenset()


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ("0 0.5 0.5 0.2", "expected 'class cx cy w h', got 4 fields"),
        ("2 0.5 0.5 0.2 0.2", "class index '2' is not in 0..1"),
        ("x 0.5 0.5 0.2 0.2", "class index 'x'"),
        ("0 0.5 1.5 0.2 0.2", r"outside \[0, 1\]"),
        ("0 0.95 0.5 0.2 0.2", "outside the 20x16 image"),
        ("0 0.5 0.5 0.0 0.2", "zero-area box"),
        ("0 0.5 nan 0.2 0.2", "cy is 'nan'"),
    ],
)
def test_yolo_malformed_line_names_file_and_line(tmp_path, second_line, message):
    path = _yolo(tmp_path, f"0 0.5 0.5 0.2 0.2\n{second_line}\n")
    with _raises_at(path, 2, message):
        importers.import_yolo(tmp_path / "labels", tmp_path / "img", ["rbc", "wbc"])


def test_yolo_label_file_without_image(tmp_path):
    _yolo(tmp_path, "0 0.5 0.5 0.2 0.2\n")
    orphan = tmp_path / "labels" / "lost.txt"
    orphan.write_text("0 0.5 0.5 0.2 0.2\n")
    with _raises_at(orphan, None, "no image 'lost'"):
        importers.import_yolo(tmp_path / "labels", tmp_path / "img", ["rbc"])


# ------------------------------------------------------------------- instance masks


def test_instance_masks_give_tight_half_open_boxes(tmp_path):
    labels = np.zeros((16, 20), dtype=np.uint16)
    labels[2:5, 3:9] = 1
    labels[10, 19] = 700  # one pixel in the corner
    (tmp_path / "masks").mkdir()
    Image.fromarray(labels).save(tmp_path / "masks" / "a.png")
    _png(tmp_path / "img" / "a.png")
    got = importers.import_instance_masks(tmp_path / "masks", tmp_path / "img")
    assert got.samples[0].boxes == (Box(3, 2, 9, 5, "nucleus"), Box(19, 10, 20, 11, "nucleus"))
    # The label image itself is kept for backends that learn outlines.
    assert got.samples[0].mask == tmp_path / "masks" / "a.png"
    assert (read_mask(got.samples[0]) == labels).all()


def test_instance_mask_size_mismatch_and_missing_image(tmp_path):
    (tmp_path / "masks").mkdir()
    mask = tmp_path / "masks" / "a.png"
    Image.fromarray(np.ones((16, 21), dtype=np.uint16)).save(mask)
    _png(tmp_path / "img" / "a.png")
    with _raises_at(mask, None, "mask is 21x16 but image a.png is 20x16"):
        importers.import_instance_masks(tmp_path / "masks", tmp_path / "img")
    (tmp_path / "img" / "a.png").unlink()
    with _raises_at(mask, None, "no image 'a'"):
        importers.import_instance_masks(tmp_path / "masks", tmp_path / "img")


def test_instance_mask_with_colour_is_refused(tmp_path):
    _png(tmp_path / "img" / "a.png")
    mask = _png(tmp_path / "masks" / "a.png", mode="RGB")
    with _raises_at(mask, None, "must have one channel"):
        importers.import_instance_masks(tmp_path / "masks", tmp_path / "img")


# --------------------------------------------------------------------------- CSV

_HEADER = "image_id,instance,x_min,y_min,x_max,y_max,area_px\n"


def _csv(tmp_path: Path, rows: str) -> Path:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    path = tmp_path / "boxes.csv"
    path.write_text(rows)
    return path


def test_csv_boxes_with_negatives_from_image_ids(tmp_path):
    path = _csv(tmp_path, _HEADER + "a,1,0,0,20,16,320\na,2,3,4,5,6,4\n")
    got = importers.import_csv_boxes(path, tmp_path / "img", image_ids=["b", "a"])
    assert [s.image_id for s in got.samples] == ["b", "a"]
    assert got.samples[0].boxes == ()
    assert got.samples[1].boxes == (Box(0, 0, 20, 16, "nucleus"), Box(3, 4, 5, 6, "nucleus"))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a,2,3,4,21,6,4", "outside the 20x16 image"),
        ("a,2,3,4,3,6,0", "zero-area box"),
        ("a,2,6,4,3,6,0", "inverted"),
        ("a,2,3,4,x,6,4", "x_max is 'x'"),
        ("c,2,3,4,5,6,4", "no image 'c'"),
        ("a,2,3,4,5", "does not have the header's 7 fields"),
        ("a,2,3,4,5,6,4,9", "does not have the header's 7 fields"),
    ],
)
def test_csv_boxes_bad_row_names_file_and_line(tmp_path, row, message):
    path = _csv(tmp_path, _HEADER + "a,1,0,0,2,2,4\n" + row + "\n")
    with _raises_at(path, 3, message):
        importers.import_csv_boxes(path, tmp_path / "img")


def test_csv_missing_column(tmp_path):
    path = _csv(tmp_path, "image_id,x_min,y_min,x_max\na,1,1,2\n")
    with _raises_at(path, 1, r"header lacks columns \['y_max'\]"):
        importers.import_csv_boxes(path, tmp_path / "img")


def test_csv_labels_groups_and_errors(tmp_path):
    path = _csv(tmp_path, "image_id,size\na,small\nb,large\n")
    columns = {"size": ["small", "large"]}
    got = importers.import_csv_labels(path, tmp_path / "img", columns)
    assert got.classes == ("size:small", "size:large")
    assert [set(s.labels) for s in got.samples] == [{"size:small"}, {"size:large"}]
    path.write_text("image_id,size\na,small\nb,huge\n")
    with _raises_at(path, 3, "unknown class size:'huge'"):
        importers.import_csv_labels(path, tmp_path / "img", columns)
    path.write_text("image_id,size\na,small\na,large\n")
    with _raises_at(path, 3, "duplicate row for image 'a'"):
        importers.import_csv_labels(path, tmp_path / "img", columns)
    path.write_text("image_id,size\na,small\n")
    with _raises_at(path, None, r"no row for images \['b'\]"):
        importers.import_csv_labels(path, tmp_path / "img", columns, image_ids=["a", "b"])


# ------------------------------------------------------------------ class folders


def test_class_folders(tmp_path):
    _png(tmp_path / "clear" / "x.png")
    _png(tmp_path / "unclear" / "y.jpg", mode="RGB")
    (tmp_path / ".DS_Store").write_text("")
    got = importers.import_class_folders(tmp_path)
    assert got.classes == ("clear", "unclear")
    assert [(s.image_id, set(s.labels)) for s in got.samples] == [
        ("clear/x", {"clear"}),
        ("unclear/y", {"unclear"}),
    ]


def test_class_folders_refuse_strays(tmp_path):
    _png(tmp_path / "clear" / "x.png")
    stray = tmp_path / "clear" / "notes.txt"
    stray.write_text("hi")
    with _raises_at(stray, None, "not an image"):
        importers.import_class_folders(tmp_path)
    stray.unlink()
    (tmp_path / "LICENSE.txt").write_text("CC0")
    assert [s.image_id for s in importers.import_class_folders(tmp_path).samples] == ["clear/x"]
    loose = _png(tmp_path / "loose.png")
    with _raises_at(loose, None, "image outside a class folder"):
        importers.import_class_folders(tmp_path)


# ---------------------------------------------------------------------- exporters


def _detection_set(tmp_path: Path) -> LabelledSet:
    a = _png(tmp_path / "src" / "a.png", 40, 20)
    b = _png(tmp_path / "src" / "b.png", 40, 20)
    return LabelledSet(
        "toy",
        ("rbc", "wbc"),
        (
            Sample("a", a, frozenset({"wbc"}), (Box(4, 2, 12, 10, "wbc"),), "a"),
            Sample("b", b, frozenset(), (), "b", degradation="defocus:severe", seed=3),
        ),
    )


def test_export_yolo_round_trips_through_import_yolo(tmp_path):
    labelled = _detection_set(tmp_path)
    out = tmp_path / "yolo"
    data_yaml = importers.export_yolo(labelled, out, "train")
    stale = out / "labels" / "train" / "stale.txt"
    stale.write_text("0 0.5 0.5 0.1 0.1\n")
    importers.export_yolo(labelled, out, "train")  # a re-export removes stale files
    assert not stale.exists()
    assert yaml.safe_load(data_yaml.read_text())["names"] == {0: "rbc", 1: "wbc"}
    assert (out / "images" / "train" / "a.png").is_symlink()
    assert (out / "images" / "train" / "b.png").is_file()  # degraded pixels written out
    back = importers.import_yolo(out / "labels" / "train", out / "images" / "train", ["rbc", "wbc"])
    assert [len(s.boxes) for s in back.samples] == [1, 0]
    assert back.samples[0].boxes[0].as_list() == pytest.approx([4, 2, 12, 10])
    assert back.samples[0].boxes[0].label == "wbc"
    with pytest.raises(ValidationError, match="names classes"):
        importers.export_yolo(LabelledSet("x", ("cell",), ()), out, "val")


def test_to_coco_scores_perfect_predictions_at_ap_one(tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    labelled = _detection_set(tmp_path)
    gt = COCO()
    gt.dataset = importers.to_coco(labelled)
    gt.createIndex()
    dets = [{**a, "score": 0.9} for a in gt.dataset["annotations"]]
    evaluator = COCOeval(gt, gt.loadRes(dets), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[1] == pytest.approx(1.0)  # AP50
    assert gt.dataset["images"][0] == {"id": 1, "file_name": "a", "width": 40, "height": 20}


# -------------------------------------------------------------------- class masks


def _mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def _stack(path: Path, pages: np.ndarray) -> Path:
    """Write a multi-page grey TIFF, one page per leading index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tw:
        for page in pages:
            tw.write(page, photometric="minisblack")
    return path


def test_class_masks_give_boxes_per_class_and_keep_negatives(tmp_path):
    for stem in ("a", "b", "c"):
        _png(tmp_path / "img" / f"{stem}.png")
    cells = np.zeros((16, 20), np.uint8)
    cells[2:5, 3:9] = 255  # 0/255
    cells[10:16, 15:20] = 255  # touches the bottom-right corner
    _mask(tmp_path / "masks" / "cell" / "a.png", cells)
    dots = np.zeros((16, 20), np.uint8)
    dots[7, 7] = 1  # 0/1
    _mask(tmp_path / "masks" / "dot" / "a.png", dots)
    _mask(tmp_path / "masks" / "dot" / "b.png", np.zeros((16, 20), np.uint8))
    got = importers.import_class_masks(tmp_path / "masks", tmp_path / "img")
    assert got.classes == ("cell", "dot")
    assert [s.image_id for s in got.samples] == ["a", "b", "c"]
    a, b, c = got.samples
    assert a.boxes == (
        Box(3, 2, 9, 5, "cell"),
        Box(15, 10, 20, 16, "cell"),
        Box(7, 7, 8, 8, "dot"),
    )
    assert a.labels == {"cell", "dot"} and a.mask is None
    assert b.boxes == () and c.boxes == () and not b.labels and not c.labels  # negatives
    assert got.box_counts() == {"cell": 2, "dot": 1}
    assert got.dropped == ()


def test_class_masks_drop_small_components_with_a_report(tmp_path):
    _png(tmp_path / "img" / "a.png")
    mask = np.zeros((16, 20), np.uint8)
    mask[1:4, 1:4] = 255  # 9 px
    mask[10, 10:13] = 255  # 3 px
    path = _mask(tmp_path / "masks" / "cell" / "a.png", mask)
    got = importers.import_class_masks(tmp_path / "masks", tmp_path / "img", min_size=5)
    assert got.samples[0].boxes == (Box(1, 1, 4, 4, "cell"),)
    (dropped,) = got.dropped
    assert dropped.file == str(path) and dropped.image_id == "a" and dropped.label == "cell"
    assert dropped.box == (10.0, 10.0, 13.0, 11.0)
    assert dropped.reason == "component of 3 px < min_size 5"


def test_class_masks_join_diagonal_pixels(tmp_path):
    _png(tmp_path / "img" / "a.png")
    mask = np.zeros((16, 20), np.uint8)
    mask[2, 2] = mask[3, 3] = mask[4, 4] = 255  # touching only at corners: one object
    mask[2, 10] = 255  # a gap of one pixel: another object
    mask[3, 12] = 255
    _mask(tmp_path / "masks" / "cell" / "a.png", mask)
    got = importers.import_class_masks(tmp_path / "masks", tmp_path / "img")
    assert got.samples[0].boxes == (
        Box(2, 2, 5, 5, "cell"),
        Box(10, 2, 11, 3, "cell"),
        Box(12, 3, 13, 4, "cell"),
    )


def test_class_masks_uint16_label_image_gives_one_box_per_instance(tmp_path):
    _png(tmp_path / "img" / "a.png")
    labels = np.zeros((16, 20), np.uint16)
    labels[2:6, 2:5] = 1
    labels[2:6, 5:9] = 2  # touches instance 1: still its own object
    labels[12, 1] = labels[12, 18] = 3  # one instance in two pieces
    _mask(tmp_path / "masks" / "cell" / "a.png", labels)
    binary = np.where(labels > 0, 65535, 0).astype(np.uint16)  # two values: foreground
    _mask(tmp_path / "masks" / "blob" / "a.png", binary)
    got = importers.import_class_masks(tmp_path / "masks", tmp_path / "img", min_size=2)
    assert got.samples[0].boxes == (
        Box(2, 2, 9, 6, "blob"),  # the touching instances are one component
        Box(2, 2, 5, 6, "cell"),
        Box(5, 2, 9, 6, "cell"),
        Box(1, 12, 19, 13, "cell"),
    )
    assert [d.reason for d in got.dropped] == [
        "component of 1 px < min_size 2",
        "component of 1 px < min_size 2",
    ]


def test_class_masks_accept_grey_saved_as_rgb_and_refuse_colour(tmp_path):
    _png(tmp_path / "img" / "a.png")
    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[4:6, 4:6] = 255
    path = _mask(tmp_path / "masks" / "cell" / "a.png", rgb)
    got = importers.import_class_masks(tmp_path / "masks", tmp_path / "img")
    assert got.samples[0].boxes == (Box(4, 4, 6, 6, "cell"),)
    rgb[0, 0] = (255, 0, 0)
    _mask(path, rgb)
    with _raises_at(path, None, "must be grey"):
        importers.import_class_masks(tmp_path / "masks", tmp_path / "img")


def test_class_mask_without_its_image_names_the_file(tmp_path):
    _png(tmp_path / "img" / "a.png")
    orphan = _mask(tmp_path / "masks" / "cell" / "lost.png", np.zeros((16, 20), np.uint8))
    with _raises_at(orphan, None, "no image 'lost'"):
        importers.import_class_masks(tmp_path / "masks", tmp_path / "img")


def test_class_mask_of_another_size_names_the_file(tmp_path):
    _png(tmp_path / "img" / "a.png")
    mask = _mask(tmp_path / "masks" / "cell" / "a.png", np.zeros((16, 21), np.uint8))
    with _raises_at(mask, None, "mask is 21x16 but image a.png is 20x16"):
        importers.import_class_masks(tmp_path / "masks", tmp_path / "img")


def test_class_masks_unreadable_mask_and_class_folders(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _mask(tmp_path / "masks" / "cell" / "a.png", np.zeros((16, 20), np.uint8))
    (tmp_path / "masks" / "dot").mkdir()
    got = importers.import_class_masks(
        tmp_path / "masks", tmp_path / "img", classes=["dot", "cell"]
    )
    assert got.classes == ("dot", "cell")
    with _raises_at(tmp_path / "masks" / "dot", None, "folder of unknown class 'dot'"):
        importers.import_class_masks(tmp_path / "masks", tmp_path / "img", classes=["cell"])
    with _raises_at(tmp_path / "masks", None, r"no folder for classes \['rbc'\]"):
        importers.import_class_masks(
            tmp_path / "masks", tmp_path / "img", classes=["cell", "dot", "rbc"]
        )
    broken = tmp_path / "masks" / "dot" / "a.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with _raises_at(broken, None, "unreadable mask"):
        importers.import_class_masks(tmp_path / "masks", tmp_path / "img")


# ---------------------------------------------------------------- multi-page TIFF


def _pages_16_bit(count: int = 3) -> np.ndarray:
    """``count`` uint16 pages of 20x16 px whose values tell the pages apart."""
    return np.stack([np.full((16, 20), 1000 * (k + 1), np.uint16) for k in range(count)])


def test_multi_page_16_bit_tiff_gives_one_sample_per_page_matched_by_a_mask_stack(tmp_path):
    image = _stack(tmp_path / "img" / "z.tif", _pages_16_bit())
    _png(tmp_path / "img" / "flat.png")
    masks = np.zeros((3, 16, 20), np.uint8)
    masks[0, 1:3, 1:3] = 1  # page 0: one object
    masks[2, 5:9, 10:12] = 1  # page 2: another; page 1 has none
    _stack(tmp_path / "masks" / "cell" / "z.tif", masks)
    got = importers.import_class_masks(tmp_path / "masks", tmp_path / "img")
    assert [(s.image_id, s.page, s.group) for s in got.samples] == [
        ("flat", 0, "flat"),
        ("z@p0", 0, "z"),
        ("z@p1", 1, "z"),
        ("z@p2", 2, "z"),
    ]
    pages = got.samples[1:]
    assert [s.boxes for s in pages] == [
        (Box(1, 1, 3, 3, "cell"),),
        (),
        (Box(10, 5, 12, 9, "cell"),),
    ]
    for k, sample in enumerate(pages):
        assert sample.path == image
        pixels = load_pixels(sample)
        assert pixels.dtype == np.uint16 and pixels.shape == (16, 20, 1)
        assert (pixels == 1000 * (k + 1)).all()


def test_instance_mask_stack_matches_page_by_page_and_counts_must_agree(tmp_path):
    _stack(tmp_path / "img" / "z.tif", _pages_16_bit())
    labels = np.zeros((3, 16, 20), np.uint16)
    labels[1, 2:4, 3:6] = 7
    mask = _stack(tmp_path / "masks" / "z.tif", labels)
    got = importers.import_instance_masks(tmp_path / "masks", tmp_path / "img")
    assert [s.boxes for s in got.samples] == [(), (Box(3, 2, 6, 4, "nucleus"),), ()]
    assert [s.page for s in got.samples] == [0, 1, 2]
    assert all(s.mask is None for s in got.samples)  # the segmenter reads single pages only
    _stack(mask, labels[:2])
    with _raises_at(mask, None, r"mask has 2 page\(s\) but image .*z.tif has 3"):
        importers.import_instance_masks(tmp_path / "masks", tmp_path / "img")


def test_yolo_labels_pages_of_a_stack_and_exports_the_page(tmp_path):
    _stack(tmp_path / "img" / "z.tif", _pages_16_bit(2))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "z@p1.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    got = importers.import_yolo(tmp_path / "labels", tmp_path / "img", ["cell"])
    assert [(s.image_id, s.page, len(s.boxes)) for s in got.samples] == [
        ("z@p0", 0, 0),
        ("z@p1", 1, 1),
    ]
    importers.export_yolo(got, tmp_path / "yolo", "train")
    exported = tmp_path / "yolo" / "images" / "train" / "z@p1.tif"
    assert not exported.is_symlink()  # the page itself, not the whole stack
    assert (tifffile.imread(exported) == 2000).all()
    assert importers.to_coco(got)["images"][1]["width"] == 20
    (tmp_path / "labels" / "z.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    with _raises_at(tmp_path / "labels" / "z.txt", None, r"z.tif has 2 pages: name their"):
        importers.import_yolo(tmp_path / "labels", tmp_path / "img", ["cell"])


def test_class_folders_import_each_page(tmp_path):
    _stack(tmp_path / "clear" / "z.tif", _pages_16_bit(2))
    got = importers.import_class_folders(tmp_path)
    assert [(s.image_id, s.page, s.group) for s in got.samples] == [
        ("clear/z@p0", 0, "clear/z"),
        ("clear/z@p1", 1, "clear/z"),
    ]


def test_formats_that_label_single_images_refuse_a_stack(tmp_path):
    _stack(tmp_path / "img" / "a.tif", _pages_16_bit(2))
    path = tmp_path / "labels.csv"
    path.write_text("image_id,size\na,small\n")
    with _raises_at(tmp_path / "img" / "a.tif", None, r"multi-page TIFF \(2 pages\)"):
        importers.import_csv_labels(path, tmp_path / "img", {"size": ["small"]})


def test_fingerprint_counts_the_page_only_when_it_is_not_zero(tmp_path):
    def fingerprint(*samples: Sample) -> str:
        return LabelledSet("s", ("cell",), samples).fingerprint()

    flat = Sample("a", None, frozenset({"cell"}), (Box(1, 2, 3, 4, "cell"),), "a")
    records = [["a", ["cell"], [[1, 2, 3, 4, "cell"]], "", 0]]  # the rule before pages
    before_pages = hashlib.sha256(
        json.dumps([["cell"], records], separators=(",", ":")).encode()
    ).hexdigest()
    assert fingerprint(flat) == before_pages  # sets without stacks keep their fingerprints
    page_1 = dataclasses.replace(flat, page=1)
    assert fingerprint(page_1) != fingerprint(flat)
    assert fingerprint(page_1) != fingerprint(dataclasses.replace(flat, page=2))
