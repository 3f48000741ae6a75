"""Fuzz every dataset importer: a file imports cleanly or raises ValidationError.

Each example writes a tiny dataset under ``tmp_path``: real images next to an annotation
file that is malformed, half-valid or random bytes. The importer must return a
:class:`~phenocascade.data.labelled.LabelledSet` or raise
:class:`~phenocascade.errors.ValidationError` (usually its subclass
:class:`~phenocascade.errors.AnnotationError`, naming the file); any other exception is a
crash of ``phenocascade data import``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from encoded import png, tiff
from fuzzing import example_dir, fuzz, outcome, png_header
from hypothesis import example, given
from hypothesis import strategies as st

from phenocascade.data import importers
from phenocascade.data.labelled import LabelledSet
from phenocascade.domain import Box
from phenocascade.errors import ValidationError

WIDTH, HEIGHT = 12, 10
CLASSES = ["cell", "debris"]


IMAGE = png(np.zeros((HEIGHT, WIDTH), np.uint8))
STACK = tiff(np.zeros((2, HEIGHT, WIDTH), np.uint8))
BOMBS = [png_header(100_000, 100_000), png_header(10_000, 10_000)]
# Image files an importer may meet: good ones, a stack, and broken or hostile ones.
image_files = st.sampled_from(
    [IMAGE, IMAGE, STACK, b"", IMAGE[:40], b"II*\x00", *BOMBS]
) | st.binary(max_size=32)


def image_name(stem: str, data: bytes) -> str:
    """Name an image file as its format would be named, so the header is what is fuzzed."""
    return f"{stem}.tif" if data.startswith(b"II") else f"{stem}.png"


def run(call: Callable[[], LabelledSet]) -> LabelledSet | BaseException:
    """Import, allowing only a LabelledSet of valid boxes or a ValidationError."""
    got = outcome(call, (ValidationError,))
    if isinstance(got, LabelledSet):
        for sample in got.samples:
            for box in sample.boxes:
                assert_valid_box(box)
    return got


def assert_valid_box(box: Box) -> None:
    assert 0 <= box.x_min < box.x_max <= WIDTH, box
    assert 0 <= box.y_min < box.y_max <= HEIGHT, box


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)
    return path


# Text of one numeric field: valid numbers, edge cases, and junk.
numbers = (
    st.integers(-3, 14).map(str)
    | st.floats(-2, 14).map(repr)
    | st.sampled_from(
        ["nan", "inf", "-inf", "1e400", "", " ", "0x1", "1_0", "\u0661", "--1", "5,0"]
    )
    | st.text(string.printable, max_size=4)
)
labels = st.sampled_from([*CLASSES, "", "Cell", "other"]) | st.text(max_size=4)
# Bytes that are no valid UTF-8, or a valid file mangled.
junk = st.binary(max_size=64) | st.sampled_from([b"\xff\xfe\x00", b"\x00" * 8, b"\xef\xbb\xbf"])


# ---------------------------------------------------------------------------- VOC


def xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@st.composite
def voc_files(draw: st.DrawFn) -> bytes:
    """Draw a VOC XML file: fields fuzzed, elements dropped, some left unescaped."""
    escape = draw(st.sampled_from([xml_escape, xml_escape, str]))

    def element(tag: str, body: str) -> str:
        return "" if draw(st.integers(0, 9)) == 0 else f"<{tag}>{body}</{tag}>"

    objects = "".join(
        element(
            "object",
            element("name", escape(draw(labels)))
            + element(
                "bndbox",
                "".join(
                    element(t, escape(draw(numbers))) for t in ("xmin", "ymin", "xmax", "ymax")
                ),
            ),
        )
        for _ in range(draw(st.integers(0, 3)))
    )
    size = element("size", element("width", draw(numbers)) + element("height", draw(numbers)))
    fname = element("filename", escape(draw(st.sampled_from(["a.png", "", "b.png", "../a.png"]))))
    root = draw(st.sampled_from(["annotation", "annotation", "doc"]))
    text = f"<{root}>{fname}{size}{objects}</{root}>"
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", '<?xml version="1.0"?>', "<!DOCTYPE a>"])) + text
    return text.encode()


VOC = (
    b"<annotation><filename>a.png</filename><object><name>cell</name><bndbox><xmin>2</xmin>"
    b"<ymin>2</ymin><xmax>5</xmax><ymax>6</ymax></bndbox></object></annotation>"
)


@given(xml=voc_files() | junk, image=image_files, drop=st.booleans())
# Regressions: Pillow's own bomb error, and its bomb warning (an error under -W error),
# escaped from reading the image header.
@example(xml=VOC, image=BOMBS[0], drop=False)
@example(xml=VOC, image=BOMBS[1], drop=False)
@fuzz(60)
def test_voc_imports_or_raises_validation_error(
    tmp_path: Path, xml: bytes, image: bytes, drop: bool
) -> None:
    with example_dir(tmp_path) as root:
        write(root / "img" / image_name("a", image), image)
        write(root / "ann" / "a.xml", xml)
        run(lambda: importers.import_voc(root / "ann", root / "img", drop_degenerate=drop))
        run(lambda: importers.import_voc(root / "ann", root / "img", classes=CLASSES))


# --------------------------------------------------------------------------- COCO

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
coords = st.integers(-2, 14) | st.floats(-2, 14) | json_values


@st.composite
def coco_docs(draw: st.DrawFn) -> Any:
    """Draw a COCO document: the right keys with fuzzed values, some replaced by junk."""

    def maybe(value: Any) -> Any:
        return draw(json_values) if draw(st.integers(0, 7)) == 0 else value

    images = [
        maybe(
            {
                "id": maybe(draw(st.integers(0, 2))),
                "file_name": maybe(draw(st.sampled_from(["a.png", "b.png", "", ".", "a"]))),
                "width": maybe(WIDTH),
                "height": maybe(HEIGHT),
            }
        )
        for _ in range(draw(st.integers(0, 2)))
    ]
    annotations = [
        maybe(
            {
                "id": maybe(i),
                "image_id": maybe(draw(st.integers(0, 2))),
                "category_id": maybe(draw(st.integers(0, 2))),
                "bbox": maybe([draw(coords) for _ in range(draw(st.integers(3, 5)))]),
                "iscrowd": maybe(0),
            }
        )
        for i in range(draw(st.integers(0, 3)))
    ]
    categories = [
        maybe({"id": maybe(i), "name": maybe(draw(labels))}) for i in range(draw(st.integers(0, 2)))
    ]
    return maybe({"images": images, "annotations": annotations, "categories": categories})


COCO_HUGE_INT = json.dumps(
    {
        "images": [{"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10**400, 0, 1, 1]}],
        "categories": [{"id": 1, "name": "cell"}],
    }
).encode()


@given(
    doc=coco_docs().map(lambda d: json.dumps(d).encode()) | junk,
    image=image_files,
    drop=st.booleans(),
)
# Regressions: UnicodeDecodeError, RecursionError, ValueError (int of over 4300 digits) and
# OverflowError (int too large for a float) escaped instead of an AnnotationError.
@example(doc=b"\x80", image=IMAGE, drop=False)
@example(doc=b"[" * 100_000, image=IMAGE, drop=False)
@example(doc=b'{"images": [' + b"9" * 5000 + b"]}", image=IMAGE, drop=False)
@example(doc=COCO_HUGE_INT, image=IMAGE, drop=False)
@fuzz(60)
def test_coco_imports_or_raises_validation_error(
    tmp_path: Path, doc: bytes, image: bytes, drop: bool
) -> None:
    with example_dir(tmp_path) as root:
        write(root / "img" / image_name("a", image), image)
        write(root / "coco.json", doc)
        run(lambda: importers.import_coco(root / "coco.json", root / "img", drop_degenerate=drop))


# --------------------------------------------------------------------------- YOLO

yolo_fields = (
    st.sampled_from(["0", "1", "2", "-1", "0.5", "0.25", "1", "0", "1e-9", "nan", "inf", "1e400"])
    | numbers
)


@st.composite
def yolo_files(draw: st.DrawFn) -> bytes:
    rows = [
        " ".join(draw(st.lists(yolo_fields, min_size=4, max_size=6)))
        for _ in range(draw(st.integers(0, 3)))
    ]
    return "\n".join(rows).encode()


@given(labels_file=yolo_files() | junk, image=image_files, stem=st.sampled_from(["a", "b", "a@p1"]))
# Regression: a label file that is not UTF-8 raised UnicodeDecodeError.
@example(labels_file=b"0 0.5 0.5 0.2 0.2\n\xff", image=IMAGE, stem="a")
@fuzz(60)
def test_yolo_imports_or_raises_validation_error(
    tmp_path: Path, labels_file: bytes, image: bytes, stem: str
) -> None:
    with example_dir(tmp_path) as root:
        write(root / "img" / image_name("a", image), image)
        write(root / "labels" / f"{stem}.txt", labels_file)
        run(lambda: importers.import_yolo(root / "labels", root / "img", CLASSES))


# ---------------------------------------------------------------------------- CSV

csv_cells = numbers | labels | st.sampled_from(['"', '""', "a,b", "\x00", "\r", "a\nb"])


@st.composite
def csv_files(draw: st.DrawFn) -> bytes:
    columns = ["image_id", "x_min", "y_min", "x_max", "y_max", "stain"]
    header = draw(st.lists(st.sampled_from([*columns, "x"]), min_size=1, max_size=7))
    rows = [
        [draw(st.sampled_from(["a", "b", "a ", ""]) | csv_cells)]
        + [draw(csv_cells) for _ in range(draw(st.integers(len(header) - 2, len(header))))]
        for _ in range(draw(st.integers(0, 3)))
    ]
    return "\n".join(",".join(row) for row in [header, *rows]).encode()


@given(csv_file=csv_files() | junk, image=image_files, drop=st.booleans())
# Regression: a CSV file that is not UTF-8 raised UnicodeDecodeError.
@example(csv_file=b"image_id,x_min,y_min,x_max,y_max\na,1,1,2,2\n\xe9", image=IMAGE, drop=False)
@fuzz(60)
def test_csv_importers_import_or_raise_validation_error(
    tmp_path: Path, csv_file: bytes, image: bytes, drop: bool
) -> None:
    with example_dir(tmp_path) as root:
        write(root / "img" / image_name("a", image), image)
        path = write(root / "rows.csv", csv_file)
        run(lambda: importers.import_csv_boxes(path, root / "img", drop_degenerate=drop))
        run(lambda: importers.import_csv_labels(path, root / "img", {"stain": ["he", "dapi"]}))


# ------------------------------------------------------------------- class folders

names = st.sampled_from(["a.png", "b.tif", "c.txt", ".hidden", "d.JPG", "e.png.bak"])


@given(
    tree=st.dictionaries(
        st.sampled_from(["cell", "debris", "x.png", ".git"]),
        st.dictionaries(names, image_files, max_size=3) | image_files,
        max_size=3,
    )
)
@fuzz(50)
def test_class_folders_import_or_raise_validation_error(
    tmp_path: Path, tree: dict[str, dict[str, bytes] | bytes]
) -> None:
    with example_dir(tmp_path) as root:
        for entry, content in tree.items():
            if isinstance(content, bytes):
                write(root / "data" / entry, content)
                continue
            (root / "data" / entry).mkdir(parents=True)
            for name, data in content.items():
                write(root / "data" / entry / name, data)
        got = run(lambda: importers.import_class_folders(root / "data"))
    if isinstance(got, LabelledSet):
        assert all(len(s.labels) == 1 for s in got.samples)


# -------------------------------------------------------------------------- masks


@st.composite
def masks(draw: st.DrawFn) -> bytes:
    """Draw a mask file: a label image of the image's size or not, 8/16-bit, grey or RGB."""
    if draw(st.integers(0, 4)) == 0:
        return draw(image_files)
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    height = draw(st.sampled_from([HEIGHT, HEIGHT, 8]))
    shape = (height, WIDTH, 3) if draw(st.integers(0, 5)) == 0 else (height, WIDTH)
    values = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**32 - 1))
    arr = np.random.default_rng(seed).choice(np.asarray(values, dtype=dtype), size=shape)
    if dtype == np.uint16 and len(shape) == 3:
        arr = arr.astype(np.uint8)  # Pillow writes no 16-bit RGB
    return tiff(arr) if draw(st.booleans()) else png(arr)


@given(mask=masks(), image=image_files, stem=st.sampled_from(["a", "a", "b"]))
@fuzz(50)
def test_instance_masks_import_or_raise_validation_error(
    tmp_path: Path, mask: bytes, image: bytes, stem: str
) -> None:
    with example_dir(tmp_path) as root:
        write(root / "img" / image_name("a", image), image)
        write(root / "masks" / f"{stem}.tif", mask)
        run(lambda: importers.import_instance_masks(root / "masks", root / "img"))


@given(
    mask=masks(),
    image=image_files,
    folder=st.sampled_from(["cell", "cell", "other", "cell/deeper"]),
    min_size=st.integers(-1, 5),
)
@fuzz(50)
def test_class_masks_import_or_raise_validation_error(
    tmp_path: Path, mask: bytes, image: bytes, folder: str, min_size: int
) -> None:
    with example_dir(tmp_path) as root:
        write(root / "img" / image_name("a", image), image)
        write(root / "masks" / folder / "a.png", mask)
        (root / "masks" / "debris").mkdir(exist_ok=True)
        run(
            lambda: importers.import_class_masks(
                root / "masks", root / "img", classes=CLASSES, min_size=min_size
            )
        )
