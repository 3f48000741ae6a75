"""Strict importers of common annotation formats, and exporters for training.

Every importer returns a :class:`~phenocascade.data.labelled.LabelledSet` and is strict:
a malformed file (bad XML/JSON/CSV, a box outside its image, a zero-area box, an
unknown class, a missing image) raises :class:`~phenocascade.errors.AnnotationError`
naming the file and the line (or element), and nothing is imported. The only way past
a zero-area box is an explicit ``drop_degenerate=True``, which records each dropped box
in :attr:`LabelledSet.dropped`.

Boxes come out as ``[x_min, y_min, x_max, y_max]`` in pixels, half-open, origin at the
top-left corner of the top-left pixel. Format conventions converted on import:

- Pascal VOC: 1-based inclusive pixel indices -> ``[xmin - 1, ymin - 1, xmax, ymax]``
  (as Detectron2 does); a box with ``xmax == xmin`` (or ``ymax == ymin``) as written is
  a zero-area box, since annotation tools write such boxes for stray clicks.
- COCO: ``[x, y, width, height]`` -> ``[x, y, x + width, y + height]``.
- YOLO: normalised ``cx cy w h`` -> pixels of the image.
- Instance masks: the tight half-open box of each non-zero label value.
- Class masks: the tight half-open box of each object of a class's mask.

A multi-page TIFF (z-slices or time points of one field) in an image folder that an
importer lists (YOLO, class folders, instance and class masks) becomes one sample per
page, ``<stem>@p<k>`` with ``Sample.page == k`` (from 0), all pages in one ``group`` so
that a split keeps a stack together; a mask stack matches its image stack page by page.
Formats that label named single images (VOC, COCO, CSV) refuse a multi-page TIFF.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import warnings
import xml.parsers.expat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import tifffile
import yaml
from PIL import Image

from phenocascade.data.labelled import DroppedAnnotation, LabelledSet, load_pixels
from phenocascade.domain import Box, Sample
from phenocascade.errors import (
    AnnotationError,
    BadInputError,
    PhenocascadeError,
    ValidationError,
)
from phenocascade.imaging import DECODER_ERRORS, Pixels, decode_file, tiff_pages

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_ZERO_AREA = "zero-area box"
# Normalised YOLO coordinates are written with a few decimals; allow their rounding.
_YOLO_TOLERANCE = 1e-4
# COCO boxes are floats; allow float round-off at the image border.
_COCO_TOLERANCE = 1e-6
# Masks are checked against their image's size; this only keeps absurd headers out.
_MASK_MAX_PIXELS = 2**31


# ----------------------------------------------------------------------------- helpers


def image_size(path: Path, *, page: int | None = None) -> tuple[int, int]:
    """Return ``(width, height)`` from an image file's header, without decoding pixels.

    Parameters
    ----------
    path : pathlib.Path
        The image file.
    page : int or None, default None
        Page of a multi-page TIFF, from 0. ``None`` expects a single-plane image and
        refuses a multi-page TIFF, whose pages each need their own annotations.

    Raises
    ------
    AnnotationError
        If the file is missing, its header cannot be read, the page does not exist, or
        it is a multi-page TIFF and ``page`` is ``None``.
    """
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                pages = len(tif.pages)
                if page is None and pages > 1:
                    raise AnnotationError(
                        f"multi-page TIFF ({pages} pages) where this format labels single "
                        "images; save each page as an image, or import it from a folder "
                        "(YOLO, class folders, masks), which makes each page a sample",
                        file=str(path),
                    )
                _check_page(page or 0, pages, file=str(path))
                plane = tif.pages.get(page or 0).aspage()
                return int(plane.imagewidth), int(plane.imagelength)
        _check_page(page or 0, 1, file=str(path))
        with warnings.catch_warnings():
            # Only the header is read; decoding checks the size against max_image_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return int(img.width), int(img.height)
    except FileNotFoundError as exc:
        raise AnnotationError("image file does not exist", file=str(path)) from exc
    except Image.DecompressionBombError as exc:
        raise AnnotationError(f"image too large to import ({exc})", file=str(path)) from exc
    except DECODER_ERRORS as exc:
        raise AnnotationError(f"cannot read the image header ({exc})", file=str(path)) from exc


def _read_text(path: Path) -> str:
    """Return the content of a UTF-8 text file; refuse other bytes, naming the bad line.

    Raises
    ------
    FileNotFoundError
        If the file does not exist (each format words its own message).
    AnnotationError
        If the content is not UTF-8.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AnnotationError(
            f"not UTF-8 text (byte {data[exc.start]:#04x}); save the file as UTF-8",
            file=str(path),
            line=data.count(b"\n", 0, exc.start) + 1,
        ) from exc


def _check_page(page: int, pages: int, *, file: str) -> None:
    """Refuse a page index outside a file's ``pages`` pages."""
    if not 0 <= page < pages:
        raise AnnotationError(
            f"page {page} does not exist; the image has {pages} page(s)", file=file
        )


def image_pages(path: Path) -> int:
    """Return how many planes an image file holds: its pages if a TIFF, else 1.

    Raises
    ------
    AnnotationError
        If the file cannot be read or is not an image.
    """
    try:
        return tiff_pages(path)
    except BadInputError as exc:
        raise AnnotationError(f"unreadable image ({exc})", file=str(path)) from exc


@dataclass(frozen=True, slots=True)
class _Plane:
    """One 2-D image of a folder: an image file, or one page of a multi-page TIFF.

    ``image_id`` is ``<prefix><stem>``, or ``<prefix><stem>@p<page>`` for a page of a
    stack of ``pages`` pages; ``group`` is ``<prefix><stem>`` for every page.
    """

    image_id: str
    path: Path
    page: int
    pages: int
    group: str


def _planes(path: Path, prefix: str = "") -> list[_Plane]:
    """Return the planes of an image file: itself, or each page of a multi-page TIFF."""
    group = f"{prefix}{path.stem}"
    pages = image_pages(path)
    if pages == 1:
        return [_Plane(group, path, 0, 1, group)]
    return [_Plane(f"{group}@p{k}", path, k, pages, group) for k in range(pages)]


def _single_image(img_dir: Path, stem: str, *, file: str, line: int | None) -> Path:
    """Find the image of a format that labels whole images; refuse a multi-page TIFF."""
    path = find_image(img_dir, stem, file=file, line=line)
    image_size(path)  # reads the header: refuses a stack, whose pages need their own labels
    return path


def find_image(img_dir: Path, stem: str, *, file: str, line: int | None) -> Path:
    """Return the one image called ``stem`` + a known suffix in ``img_dir``."""
    found = [img_dir / f"{stem}{s}" for s in IMAGE_SUFFIXES if (img_dir / f"{stem}{s}").is_file()]
    if not found:
        raise AnnotationError(
            f"no image {stem!r} ({'/'.join(IMAGE_SUFFIXES)}) in {img_dir}", file=file, line=line
        )
    if len(found) > 1:
        raise AnnotationError(
            f"image {stem!r} is ambiguous in {img_dir}: {[p.name for p in found]}",
            file=file,
            line=line,
        )
    return found[0]


@dataclass
class _BoxChecker:
    """Validates boxes against their image and collects dropped degenerate ones."""

    drop_degenerate: bool
    dropped: list[DroppedAnnotation] = field(default_factory=list)

    def check(
        self,
        written: tuple[float, float, float, float],
        box: tuple[float, float, float, float],
        size: tuple[int, int],
        *,
        label: str,
        image_id: str,
        file: str,
        line: int | None,
        element: str = "",
        tolerance: float = 0.0,
    ) -> bool:
        """Return ``True`` to keep ``box``, ``False`` if dropped; raise if malformed.

        ``written`` is the box as the file states it (for messages and the drop
        report), ``box`` the converted half-open pixel box, allowed to exceed the image
        by ``tolerance`` pixels of round-off.
        """
        where = f"{element}: " if element else ""
        if not all(math.isfinite(v) for v in box):
            raise AnnotationError(f"{where}box {written} is not finite", file=file, line=line)
        x0, y0, x1, y1 = box
        wx0, wy0, wx1, wy1 = written
        if wx1 < wx0 or wy1 < wy0:
            raise AnnotationError(
                f"{where}box {written} of {label!r} is inverted (max < min)", file=file, line=line
            )
        width, height = size
        tol = tolerance
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise AnnotationError(
                f"{where}box {written} of {label!r} lies outside the {width}x{height} image "
                f"{image_id!r}",
                file=file,
                line=line,
            )
        if x1 <= x0 or y1 <= y0 or wx1 == wx0 or wy1 == wy0:
            if not self.drop_degenerate:
                raise AnnotationError(
                    f"{where}{_ZERO_AREA} {written} of {label!r} in image {image_id!r}; fix the "
                    "file, or import with drop_degenerate=True to drop such boxes with a report",
                    file=file,
                    line=line,
                )
            self.dropped.append(DroppedAnnotation(file, line, image_id, label, written, _ZERO_AREA))
            return False
        return True


def _box(x0: float, y0: float, x1: float, y1: float, label: str, size: tuple[int, int]) -> Box:
    """Build a box, clipping the tolerated round-off at the image border."""
    width, height = size
    return Box(
        max(0.0, float(x0)),
        max(0.0, float(y0)),
        min(float(width), float(x1)),
        min(float(height), float(y1)),
        label,
    )


def _number(text: str | None, *, what: str, file: str, line: int | None) -> float:
    """Parse a finite number or raise naming the field."""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AnnotationError(f"{what} is {text!r}, not a finite number", file=file, line=line)
    return value


def _check_vocabulary(
    classes: Sequence[str] | None, keep: Sequence[str] | None, *, file: str
) -> None:
    """Refuse a ``keep`` subset that names classes outside ``classes``."""
    if classes is not None and keep is not None:
        unknown = sorted(set(keep) - set(classes))
        if unknown:
            raise ValidationError(f"{file}: keep={unknown} are not among classes={list(classes)}")


def image_files(img_dir: Path) -> list[Path]:
    """Return the image files of a folder, sorted; other non-hidden files are an error."""
    if not img_dir.is_dir():
        raise AnnotationError("image folder does not exist", file=str(img_dir))
    out = []
    for p in sorted(img_dir.iterdir()):
        if p.name.startswith(".") or p.is_dir():
            continue
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise AnnotationError(
                f"not an image ({'/'.join(IMAGE_SUFFIXES)}); move it out of the image folder",
                file=str(p),
            )
        out.append(p)
    return out


def _sample(image_id: str, path: Path, boxes: Sequence[Box], labels: Iterable[str] = ()) -> Sample:
    """Build a sample whose image labels are its own labels plus its box classes."""
    return Sample(
        image_id=image_id,
        path=path,
        labels=frozenset(labels) | {b.label for b in boxes},
        boxes=tuple(boxes),
        group=image_id,
    )


def _plane_sample(plane: _Plane, boxes: Sequence[Box], labels: Iterable[str] = ()) -> Sample:
    """Build the sample of one plane (see :func:`_sample`), with its page and group."""
    sample = _sample(plane.image_id, plane.path, boxes, labels)
    return dataclasses.replace(sample, page=plane.page, group=plane.group)


# ------------------------------------------------------------------------------- VOC


@dataclass
class _Node:
    """An XML element with the line it starts on (ElementTree keeps no line numbers)."""

    tag: str
    line: int
    text: str = ""
    children: list[_Node] = field(default_factory=list)

    def find(self, tag: str) -> _Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list[_Node]:
        return [c for c in self.children if c.tag == tag]


def _parse_xml(path: Path) -> _Node:
    """Parse an XML file into :class:`_Node` s; refuse DTDs (VOC files have none)."""
    parser = xml.parsers.expat.ParserCreate()
    roots: list[_Node] = []
    stack: list[_Node] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else roots).append(node)
        stack.append(node)

    def end(tag: str) -> None:
        stack.pop()

    def chars(data: str) -> None:
        if stack:
            stack[-1].text += data

    def doctype(*args: object) -> None:
        raise AnnotationError(
            "XML with a DOCTYPE is refused (entities could expand without bound)",
            file=str(path),
            line=parser.CurrentLineNumber,
        )

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.StartDoctypeDeclHandler = doctype
    try:
        parser.Parse(path.read_bytes(), True)
    except xml.parsers.expat.ExpatError as exc:
        raise AnnotationError(
            f"bad XML: {xml.parsers.expat.ErrorString(exc.code)}", file=str(path), line=exc.lineno
        ) from exc
    return roots[0]


def _child_text(node: _Node, tag: str, *, file: str) -> tuple[str, int]:
    """Return the stripped text and line of a required child element."""
    child = node.find(tag)
    if child is None:
        raise AnnotationError(f"<{node.tag}> has no <{tag}>", file=file, line=node.line)
    return child.text.strip(), child.line


def import_voc(
    ann_dir: Path,
    img_dir: Path,
    ids: Sequence[str] | None = None,
    classes: Sequence[str] | None = None,
    drop_degenerate: bool = False,
    *,
    keep: Sequence[str] | None = None,
    one_based: bool = True,
    name: str = "voc",
) -> LabelledSet:
    """Import Pascal VOC XML annotations.

    Parameters
    ----------
    ann_dir : pathlib.Path
        Folder of ``<id>.xml`` files.
    img_dir : pathlib.Path
        Folder of the images named by each file's ``<filename>`` (else ``<id>`` + a
        known suffix).
    ids : sequence of str or None, default None
        Annotation ids to import, in order; ``None`` imports every ``*.xml``, sorted.
    classes : sequence of str or None, default None
        The known class names; an object of another class is an error. ``None`` accepts
        every name found (sorted).
    drop_degenerate : bool, default False
        Drop zero-area boxes and record them in ``dropped`` instead of raising.
    keep : sequence of str or None, default None
        Classes to keep (a subset of ``classes``), in model order; boxes of other
        classes are validated, then left out. ``None`` keeps all.
    one_based : bool, default True
        VOC's 1-based inclusive indices; ``False`` reads 0-based half-open boxes.
    name : str, default "voc"
        Name of the returned set.

    Returns
    -------
    LabelledSet
        One sample per annotation file; image labels = classes of its kept boxes.

    Raises
    ------
    AnnotationError
        On bad XML, a missing element or image, a non-numeric or out-of-image box, an
        unknown class, a size that disagrees with the image, or a zero-area box
        (unless ``drop_degenerate``); the message names the file and line.
    """
    where = str(ann_dir)
    _check_vocabulary(classes, keep, file=where)
    if ids is None:
        if not ann_dir.is_dir():
            raise AnnotationError("annotation folder does not exist", file=where)
        files = sorted(ann_dir.glob("*.xml"))
    else:
        files = [ann_dir / f"{i}.xml" for i in ids]
    checker = _BoxChecker(drop_degenerate)
    parsed: list[tuple[str, Path, list[Box]]] = []
    seen: set[str] = set()
    for path in files:
        file = str(path)
        if not path.is_file():
            raise AnnotationError("annotation file does not exist", file=file)
        root = _parse_xml(path)
        if root.tag != "annotation":
            raise AnnotationError(
                f"root element is <{root.tag}>, not <annotation>", file=file, line=1
            )
        image_id = path.stem
        fname = root.find("filename")
        if fname is not None and fname.text.strip():
            img_path = img_dir / fname.text.strip()
            if not img_path.is_file():
                raise AnnotationError(
                    f"image {img_path} does not exist", file=file, line=fname.line
                )
        else:
            img_path = find_image(img_dir, image_id, file=file, line=root.line)
        size = image_size(img_path)
        size_node = root.find("size")
        if size_node is not None:
            for tag, actual in zip(("width", "height"), size, strict=True):
                text, line = _child_text(size_node, tag, file=file)
                stated = _number(text, what=f"<{tag}>", file=file, line=line)
                if stated != actual:
                    raise AnnotationError(
                        f"<{tag}> is {text} but image {img_path.name} has {tag} {actual}",
                        file=file,
                        line=line,
                    )
        boxes: list[Box] = []
        for obj in root.findall("object"):
            label, label_line = _child_text(obj, "name", file=file)
            if classes is not None and label not in classes:
                raise AnnotationError(
                    f"unknown class {label!r}; known classes are {list(classes)}",
                    file=file,
                    line=label_line,
                )
            seen.add(label)
            bnd = obj.find("bndbox")
            if bnd is None:
                raise AnnotationError("<object> has no <bndbox>", file=file, line=obj.line)
            values = []
            for tag in ("xmin", "ymin", "xmax", "ymax"):
                text, line = _child_text(bnd, tag, file=file)
                values.append(_number(text, what=f"<{tag}>", file=file, line=line))
            wx0, wy0, wx1, wy1 = values
            shift = 1.0 if one_based else 0.0
            converted = (wx0 - shift, wy0 - shift, wx1, wy1)
            keep_it = checker.check(
                (wx0, wy0, wx1, wy1),
                converted,
                size,
                label=label,
                image_id=image_id,
                file=file,
                line=bnd.line,
            )
            if keep_it and (keep is None or label in keep):
                boxes.append(_box(*converted, label, size))
        parsed.append((image_id, img_path, boxes))
    vocabulary = tuple(keep) if keep is not None else tuple(classes or sorted(seen))
    samples = tuple(_sample(i, p, b) for i, p, b in parsed)
    return LabelledSet(name, vocabulary, samples, tuple(checker.dropped))


# ------------------------------------------------------------------------------ COCO


def _field(entry: Any, key: str, kind: type | tuple[type, ...], *, element: str, file: str) -> Any:
    """Return ``entry[key]`` if it exists and has type ``kind``."""
    if not isinstance(entry, dict) or key not in entry:
        raise AnnotationError(f"{element} has no {key!r}", file=file)
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AnnotationError(f"{element}.{key} is {value!r}, of the wrong type", file=file)
    return value


def import_coco(
    json_path: Path,
    img_dir: Path,
    *,
    classes: Sequence[str] | None = None,
    keep: Sequence[str] | None = None,
    drop_degenerate: bool = False,
    name: str = "coco",
) -> LabelledSet:
    """Import a COCO detection JSON file (``images``, ``annotations``, ``categories``).

    Parameters
    ----------
    json_path : pathlib.Path
        The COCO file.
    img_dir : pathlib.Path
        Folder that ``file_name`` is relative to.
    classes : sequence of str or None, default None
        Known class names; a category outside them is an error. ``None`` accepts the
        file's categories (in id order).
    keep : sequence of str or None, default None
        Classes to keep, in model order; ``None`` keeps all.
    drop_degenerate : bool, default False
        Drop zero-width or zero-height boxes with a report instead of raising.
    name : str, default "coco"
        Name of the returned set.

    Returns
    -------
    LabelledSet
        One sample per image entry (``image_id`` = ``file_name`` without suffix).

    Raises
    ------
    AnnotationError
        On bad JSON (with its line), or naming the element (``annotations[17]``) for a
        missing or mistyped field, an unknown image or category id, a crowd annotation,
        a missing image, a size mismatch, or a bad box.
    """
    file = str(json_path)
    _check_vocabulary(classes, keep, file=file)
    try:
        doc = json.loads(_read_text(json_path))
    except FileNotFoundError as exc:
        raise AnnotationError("COCO file does not exist", file=file) from exc
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"bad JSON: {exc.msg}", file=file, line=exc.lineno) from exc
    except (RecursionError, ValueError) as exc:  # too deeply nested; an int of over 4300 digits
        raise AnnotationError(f"bad JSON: {exc}", file=file) from exc
    for key in ("images", "annotations", "categories"):
        _field(doc, key, list, element="the top-level object", file=file)
    categories: dict[int, str] = {}
    for i, cat in enumerate(doc["categories"]):
        element = f"categories[{i}]"
        cid = _field(cat, "id", int, element=element, file=file)
        cname = _field(cat, "name", str, element=element, file=file)
        if cid in categories:
            raise AnnotationError(f"{element}: duplicate category id {cid}", file=file)
        if classes is not None and cname not in classes:
            raise AnnotationError(
                f"{element}: unknown class {cname!r}; known classes are {list(classes)}", file=file
            )
        categories[cid] = cname
    images: dict[int, tuple[str, Path, tuple[int, int]]] = {}
    for i, img in enumerate(doc["images"]):
        element = f"images[{i}]"
        iid = _field(img, "id", int, element=element, file=file)
        fname = _field(img, "file_name", str, element=element, file=file)
        width = _field(img, "width", int, element=element, file=file)
        height = _field(img, "height", int, element=element, file=file)
        if iid in images:
            raise AnnotationError(f"{element}: duplicate image id {iid}", file=file)
        path = img_dir / fname
        if not path.is_file():
            raise AnnotationError(f"{element}: image {path} does not exist", file=file)
        actual = image_size(path)
        if actual != (width, height):
            raise AnnotationError(
                f"{element}: states {width}x{height} but {path.name} is {actual[0]}x{actual[1]}",
                file=file,
            )
        images[iid] = (str(Path(fname).with_suffix("")), path, actual)
    image_ids = [v[0] for v in images.values()]
    if len(set(image_ids)) != len(image_ids):
        raise AnnotationError("two images share a file name without suffix", file=file)
    checker = _BoxChecker(drop_degenerate)
    boxes: dict[int, list[Box]] = {iid: [] for iid in images}
    for i, ann in enumerate(doc["annotations"]):
        element = f"annotations[{i}]"
        _field(ann, "id", int, element=element, file=file)
        iid = _field(ann, "image_id", int, element=element, file=file)
        cid = _field(ann, "category_id", int, element=element, file=file)
        bbox = _field(ann, "bbox", list, element=element, file=file)
        if iid not in images:
            raise AnnotationError(f"{element}: unknown image_id {iid}", file=file)
        if cid not in categories:
            raise AnnotationError(f"{element}: unknown category_id {cid}", file=file)
        if ann.get("iscrowd", 0):
            raise AnnotationError(
                f"{element}: crowd annotations (iscrowd=1) are not supported", file=file
            )
        if len(bbox) != 4 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in bbox
        ):
            raise AnnotationError(
                f"{element}.bbox {bbox!r} is not [x, y, width, height]", file=file
            )
        try:
            x, y, w, h = (float(v) for v in bbox)
        except OverflowError as exc:
            raise AnnotationError(
                f"{element}.bbox has an integer too large for a float ({exc})", file=file
            ) from exc
        label = categories[cid]
        image_id, _, size = images[iid]
        converted = (x, y, x + w, y + h)
        keep_it = checker.check(
            converted,
            converted,
            size,
            label=label,
            image_id=image_id,
            file=file,
            line=None,
            element=element,
            tolerance=_COCO_TOLERANCE,
        )
        if keep_it and (keep is None or label in keep):
            boxes[iid].append(_box(*converted, label, size))
    vocabulary = tuple(keep) if keep is not None else tuple(classes or categories.values())
    samples = tuple(_sample(v[0], v[1], boxes[iid]) for iid, v in images.items())
    return LabelledSet(name, vocabulary, samples, tuple(checker.dropped))


# ------------------------------------------------------------------------------ YOLO


def import_yolo(
    labels_dir: Path,
    img_dir: Path,
    classes: Sequence[str],
    *,
    drop_degenerate: bool = False,
    name: str = "yolo",
) -> LabelledSet:
    """Import YOLO detection labels: one ``<stem>.txt`` per image, ``cls cx cy w h`` lines.

    Parameters
    ----------
    labels_dir : pathlib.Path
        Folder of label files; an image without one is a negative (no boxes). Page ``k``
        of a multi-page TIFF ``<stem>.tif`` is the image ``<stem>@p<k>``.
    img_dir : pathlib.Path
        Folder of the images; every label file needs its image here.
    classes : sequence of str
        Class names by index.
    drop_degenerate : bool, default False
        Drop zero-width or zero-height boxes with a report instead of raising.
    name : str, default "yolo"
        Name of the returned set.

    Raises
    ------
    AnnotationError
        Naming file and line: not five fields, a non-numeric value, a class index out of
        range, coordinates outside ``[0, 1]`` or the image, a zero-area box; or a label
        file without an image.
    """
    planes = {pl.image_id: pl for p in image_files(img_dir) for pl in _planes(p)}
    if not labels_dir.is_dir():
        raise AnnotationError("label folder does not exist", file=str(labels_dir))
    checker = _BoxChecker(drop_degenerate)
    boxes: dict[str, list[Box]] = {image_id: [] for image_id in planes}
    for path in sorted(labels_dir.glob("*.txt")):
        plane = planes.get(path.stem)
        if plane is None:
            stack = planes.get(f"{path.stem}@p0")
            hint = (
                f"; {stack.path.name} has {stack.pages} pages: name their label files "
                f"{path.stem}@p<k>.txt"
                if stack is not None
                else ""
            )
            raise AnnotationError(f"no image {path.stem!r} in {img_dir}{hint}", file=str(path))
        boxes[plane.image_id] = _yolo_boxes(path, plane, classes, checker)
    samples = tuple(_plane_sample(pl, boxes[image_id]) for image_id, pl in planes.items())
    return LabelledSet(name, tuple(classes), samples, tuple(checker.dropped))


def _yolo_boxes(
    path: Path, plane: _Plane, classes: Sequence[str], checker: _BoxChecker
) -> list[Box]:
    """Return the kept boxes of one YOLO label file, in pixels of its image plane."""
    file = str(path)
    size = image_size(plane.path, page=plane.page)
    width, height = size
    boxes = []
    for line_no, raw in enumerate(_read_text(path).splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        if len(fields) != 5:
            raise AnnotationError(
                f"expected 'class cx cy w h', got {len(fields)} fields (polygons are not "
                "supported)",
                file=file,
                line=line_no,
            )
        try:
            index = int(fields[0])
        except ValueError:
            index = -1
        if not 0 <= index < len(classes):
            raise AnnotationError(
                f"class index {fields[0]!r} is not in 0..{len(classes) - 1}",
                file=file,
                line=line_no,
            )
        cx, cy, w, h = (
            _number(v, what=k, file=file, line=line_no)
            for k, v in zip(("cx", "cy", "w", "h"), fields[1:], strict=True)
        )
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            raise AnnotationError(
                f"normalised coordinates {fields[1:]} are outside [0, 1]",
                file=file,
                line=line_no,
            )
        written = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
        converted = (
            written[0] * width,
            written[1] * height,
            written[2] * width,
            written[3] * height,
        )
        label = classes[index]
        if checker.check(
            written,
            converted,
            size,
            label=label,
            image_id=plane.image_id,
            file=file,
            line=line_no,
            tolerance=_YOLO_TOLERANCE * max(width, height),
        ):
            boxes.append(_box(*converted, label, size))
    return boxes


# -------------------------------------------------------------------- instance masks


def instance_boxes(labels: npt.NDArray[np.integer[Any]]) -> dict[int, tuple[int, int, int, int]]:
    """Return the tight half-open box of every non-zero value of a 2-D label image.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` integer array, 0 = background.

    Returns
    -------
    dict of int to tuple of int
        ``{value: (x_min, y_min, x_max, y_max)}``, sorted by value.
    """
    flat = np.flatnonzero(labels)
    if flat.size == 0:
        return {}
    values = labels.ravel()[flat]
    order = np.argsort(values, kind="stable")
    values, flat = values[order], flat[order]
    uniques, starts = np.unique(values, return_index=True)
    rows, cols = np.divmod(flat, labels.shape[1])
    y0 = np.minimum.reduceat(rows, starts)
    y1 = np.maximum.reduceat(rows, starts) + 1
    x0 = np.minimum.reduceat(cols, starts)
    x1 = np.maximum.reduceat(cols, starts) + 1
    return {
        int(v): (int(a), int(b), int(c), int(d))
        for v, a, b, c, d in zip(uniques, x0, y0, x1, y1, strict=True)
    }


def _mask_pages(mask: Path, img_dir: Path) -> Iterator[tuple[_Plane, Pixels]]:
    """Yield each plane of a mask's image with the mask's decoded page of the same size.

    The mask ``<stem>.<suffix>`` belongs to the image of that stem in ``img_dir``; a
    multi-page mask matches a multi-page image page by page.
    """
    file = str(mask)
    img_path = find_image(img_dir, mask.stem, file=file, line=None)
    planes = _planes(img_path)
    mask_pages = image_pages(mask)
    if mask_pages != len(planes):
        raise AnnotationError(
            f"mask has {mask_pages} page(s) but image {img_path} has {len(planes)}; a mask "
            "needs one page per page of its image",
            file=file,
        )
    for plane in planes:
        try:
            pixels = decode_file(mask, max_pixels=_MASK_MAX_PIXELS, page=plane.page)
        except PhenocascadeError as exc:
            raise AnnotationError(f"unreadable mask ({exc})", file=file) from exc
        size = image_size(img_path, page=plane.page)
        if size != (pixels.shape[1], pixels.shape[0]):
            where = f" page {plane.page}" if plane.pages > 1 else ""
            raise AnnotationError(
                f"mask{where} is {pixels.shape[1]}x{pixels.shape[0]} but image "
                f"{img_path.name}{where} is {size[0]}x{size[1]}",
                file=file,
            )
        yield plane, pixels


def import_instance_masks(
    mask_dir: Path, img_dir: Path, label: str = "nucleus", *, name: str = "masks"
) -> LabelledSet:
    """Import instance label images (``uint8``/``uint16``, 0 = background) as boxes.

    Each sample also keeps its label image as ``Sample.mask``, for backends that learn
    object outlines, except the pages of a multi-page mask: those keep their boxes only,
    since :func:`phenocascade.models.segmentation.read_mask` reads single-page masks.

    Parameters
    ----------
    mask_dir : pathlib.Path
        Folder of one single-channel label image per image, same stem as the image; a
        multi-page TIFF mask labels a multi-page TIFF image page by page.
    img_dir : pathlib.Path
        Folder of the images.
    label : str, default "nucleus"
        Class of every instance.
    name : str, default "masks"
        Name of the returned set.

    Raises
    ------
    AnnotationError
        If a mask is unreadable or not single-channel, its image is missing, their
        sizes differ, or their page counts differ.
    """
    samples = []
    for path in image_files(mask_dir):
        for plane, pixels in _mask_pages(path, img_dir):
            if pixels.shape[2] != 1:
                raise AnnotationError(
                    f"a label image must have one channel, this one has {pixels.shape[2]}",
                    file=str(path),
                )
            size = (pixels.shape[1], pixels.shape[0])
            boxes = [_box(*b, label, size) for b in instance_boxes(pixels[:, :, 0]).values()]
            sample = _plane_sample(plane, boxes)
            samples.append(sample if plane.pages > 1 else dataclasses.replace(sample, mask=path))
    return LabelledSet(name, (label,), tuple(samples))


# ------------------------------------------------------------------------ class masks


def _grey_plane(pixels: Pixels, *, file: str) -> npt.NDArray[np.uint8] | npt.NDArray[np.uint16]:
    """Return the one plane of a grey mask, or of a grey mask saved as RGB."""
    grey = pixels[:, :, 0]
    if pixels.shape[2] == 1 or (pixels == grey[:, :, None]).all():
        return grey
    raise AnnotationError(
        "a mask must be grey (one channel, or RGB with three equal channels); this one has colours",
        file=file,
    )


def mask_objects(
    mask: npt.NDArray[np.integer[Any]],
) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """Return the objects of a 2-D foreground or instance mask.

    Objects are the 8-connected components of the non-zero pixels (pixels that touch
    at a corner belong to one object). A ``uint16`` mask with more than two distinct
    values (0 included) is an instance label image instead: each non-zero value is one
    object, connected or not.

    Parameters
    ----------
    mask : numpy.ndarray
        ``(H, W)`` ``uint8`` or ``uint16``, 0 = background.

    Returns
    -------
    list of tuple
        ``(name, (x_min, y_min, x_max, y_max), pixel_count)`` per object, boxes
        half-open in pixels, in raster order of their first pixel (components) or by
        value (instances); ``name`` is ``"component"`` or ``"instance <value>"``.
    """
    labels: npt.NDArray[np.integer[Any]]
    if mask.dtype == np.uint16 and np.count_nonzero(np.bincount(mask.ravel())) > 2:
        labels, kind = mask, "instance {}"
    else:
        _, found = cv2.connectedComponents(
            (mask != 0).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        labels, kind = np.asarray(found, dtype=np.int32), "component"
    counts = np.bincount(labels.ravel())
    return [
        (kind.format(value), box, int(counts[value]))
        for value, box in instance_boxes(labels).items()
    ]


def _mask_folders(mask_root: Path, classes: Sequence[str] | None) -> list[tuple[str, Path]]:
    """Return ``(class, folder)`` pairs of ``mask_root``, in class order."""
    if not mask_root.is_dir():
        raise AnnotationError("mask folder does not exist", file=str(mask_root))
    if classes is not None and len(set(classes)) != len(classes):
        raise ValidationError(f"{mask_root}: classes={list(classes)} name a class twice")
    found: dict[str, Path] = {}
    for entry in sorted(mask_root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise AnnotationError(
                "file outside a class folder; masks go in <mask_root>/<class>/<stem>.png",
                file=str(entry),
            )
        if classes is not None and entry.name not in classes:
            raise AnnotationError(
                f"folder of unknown class {entry.name!r}; known classes are {list(classes)}",
                file=str(entry),
            )
        found[entry.name] = entry
    if classes is None:
        if not found:
            raise AnnotationError("mask folder holds no class folders", file=str(mask_root))
        return list(found.items())
    missing = [c for c in classes if c not in found]
    if missing:
        raise AnnotationError(
            f"no folder for classes {missing}; make an empty folder for a class without objects",
            file=str(mask_root),
        )
    return [(c, found[c]) for c in classes]


def _folder_planes(img_dir: Path) -> dict[str, _Plane]:
    """Return every plane of an image folder by image id; refuse ids that two files share."""
    planes: dict[str, _Plane] = {}
    for plane in (pl for p in image_files(img_dir) for pl in _planes(p)):
        if plane.image_id in planes:
            raise AnnotationError(
                f"image {plane.image_id!r} is ambiguous: {planes[plane.image_id].path.name} "
                f"and {plane.path.name}; rename one",
                file=str(img_dir),
            )
        planes[plane.image_id] = plane
    return planes


def import_class_masks(
    mask_root: Path,
    img_dir: Path,
    *,
    classes: Sequence[str] | None = None,
    min_size: int = 1,
    name: str = "class-masks",
) -> LabelledSet:
    """Import one foreground mask per image and class, ``mask_root/<class>/<stem>.<ext>``.

    A mask is a PNG or TIFF of its image's size, same stem as the image; binary (0/1 or
    0/255) or any 8- or 16-bit mask, grey or grey saved as RGB: non-zero = foreground.
    Its objects are the 8-connected components of the foreground (pixels that touch at a
    corner join); a ``uint16`` mask with more than two distinct values (0 included) is
    an instance label image instead, one object per non-zero value (see
    :func:`mask_objects`). Each object becomes its tight half-open box
    ``[x_min, y_min, x_max, y_max]`` in pixels.

    Parameters
    ----------
    mask_root : pathlib.Path
        One sub-folder per class (hidden entries ignored), each with at most one mask
        per image; a multi-page TIFF mask labels a multi-page TIFF image page by page.
    img_dir : pathlib.Path
        Folder of the images. Every image becomes a sample; one with a mask in no class
        folder is a negative (no boxes).
    classes : sequence of str or None, default None
        The class names in model order; each needs a folder and no other folder may
        exist. ``None`` takes the folder names, sorted.
    min_size : int, default 1
        Objects of fewer pixels are dropped and reported in ``dropped``.
    name : str, default "class-masks"
        Name of the returned set.

    Returns
    -------
    LabelledSet
        One sample per image plane (``<stem>``, or ``<stem>@p<k>`` per page of a stack),
        image labels = classes of its boxes; ``Sample.mask`` stays ``None``.

    Raises
    ------
    AnnotationError
        Naming the file: a mask without its image, of another size or page count than
        its image, unreadable, or coloured; a file outside the class folders or a
        non-image in one; an unknown or missing class folder; two images of one stem.
    """
    folders = _mask_folders(mask_root, classes)
    planes = _folder_planes(img_dir)
    boxes: dict[str, list[Box]] = {image_id: [] for image_id in planes}
    dropped: list[DroppedAnnotation] = []
    for label, folder in folders:
        masks = image_files(folder)
        stems = collections.Counter(m.stem for m in masks)
        for mask in masks:
            if stems[mask.stem] > 1:
                raise AnnotationError(f"two masks for image {mask.stem!r}", file=str(mask))
            for plane, pixels in _mask_pages(mask, img_dir):
                size = (pixels.shape[1], pixels.shape[0])
                for what, box, area in mask_objects(_grey_plane(pixels, file=str(mask))):
                    if area >= min_size:
                        boxes[plane.image_id].append(_box(*box, label, size))
                        continue
                    reason = f"{what} of {area} px < min_size {min_size}"
                    written = (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
                    dropped.append(
                        DroppedAnnotation(str(mask), None, plane.image_id, label, written, reason)
                    )
    samples = tuple(_plane_sample(pl, boxes[image_id]) for image_id, pl in planes.items())
    return LabelledSet(name, tuple(c for c, _ in folders), samples, tuple(dropped))


# ------------------------------------------------------------------------------- CSV


def read_csv_rows(csv_path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Return ``(line, row)`` pairs of a CSV file whose header has ``required`` columns."""
    file = str(csv_path)
    try:
        text = _read_text(csv_path)
    except FileNotFoundError as exc:
        raise AnnotationError("CSV file does not exist", file=file) from exc
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = []
        try:
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise AnnotationError(f"header lacks columns {missing}", file=file, line=1)
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise AnnotationError(
                        f"row does not have the header's {len(reader.fieldnames or [])} fields",
                        file=file,
                        line=reader.line_num,
                    )
                rows.append((reader.line_num, row))
        except csv.Error as exc:
            raise AnnotationError(f"bad CSV: {exc}", file=file, line=reader.line_num) from exc
    return rows


def _csv_boxes(
    csv_path: Path,
    label: str,
    checker: _BoxChecker,
    size_of: Callable[[str, int], tuple[int, int]],
) -> dict[str, list[Box]]:
    """Read and check a CSV of boxes (``image_id,x_min,y_min,x_max,y_max``), by image.

    ``size_of(image_id, line)`` gives an image's ``(width, height)`` on the line that
    first names it, raising for an image it cannot find. Every image named keeps an
    entry, even if ``checker`` dropped all of its boxes, in the order the file names them.
    """
    file = str(csv_path)
    sizes: dict[str, tuple[int, int]] = {}
    boxes: dict[str, list[Box]] = {}
    for line, row in read_csv_rows(csv_path, ("image_id", "x_min", "y_min", "x_max", "y_max")):
        image_id = row["image_id"].strip()
        if image_id not in sizes:
            sizes[image_id] = size_of(image_id, line)
        x0, y0, x1, y1 = (
            _number(row[k], what=k, file=file, line=line)
            for k in ("x_min", "y_min", "x_max", "y_max")
        )
        kept = boxes.setdefault(image_id, [])
        if checker.check(
            (x0, y0, x1, y1),
            (x0, y0, x1, y1),
            sizes[image_id],
            label=label,
            image_id=image_id,
            file=file,
            line=line,
        ):
            kept.append(_box(x0, y0, x1, y1, label, sizes[image_id]))
    return boxes


def import_csv_boxes(
    csv_path: Path,
    img_dir: Path,
    *,
    label: str = "nucleus",
    image_ids: Sequence[str] | None = None,
    drop_degenerate: bool = False,
    name: str = "csv",
) -> LabelledSet:
    """Import boxes from a CSV file with ``image_id,x_min,y_min,x_max,y_max`` columns.

    This is the format of the DSB 2018 ``boxes.csv`` (half-open pixel boxes); other
    columns (``instance``, ``area_px``...) are ignored.

    Parameters
    ----------
    csv_path : pathlib.Path
        The CSV file, with a header row.
    img_dir : pathlib.Path
        Folder of ``<image_id>`` + a known suffix.
    label : str, default "nucleus"
        Class of every box.
    image_ids : sequence of str or None, default None
        Images to return, in order, including those without boxes (negatives). Rows of
        other images are still validated. ``None`` returns the images named in the file.
    drop_degenerate : bool, default False
        Drop zero-area boxes with a report instead of raising.
    name : str, default "csv"
        Name of the returned set.

    Raises
    ------
    AnnotationError
        Naming file and line: a missing column or field, a non-numeric value, a missing
        image, a box outside its image or of zero area.
    """
    file = str(csv_path)
    checker = _BoxChecker(drop_degenerate)
    paths: dict[str, Path] = {}

    def size_of(image_id: str, line: int) -> tuple[int, int]:
        paths[image_id] = find_image(img_dir, image_id, file=file, line=line)
        return image_size(paths[image_id])

    boxes = _csv_boxes(csv_path, label, checker, size_of)
    wanted = list(boxes) if image_ids is None else list(image_ids)
    samples = []
    for image_id in wanted:
        path = paths.get(image_id) or _single_image(img_dir, image_id, file=file, line=None)
        samples.append(_sample(image_id, path, boxes.get(image_id, [])))
    return LabelledSet(name, (label,), tuple(samples), tuple(checker.dropped))


def import_csv_labels(
    csv_path: Path,
    img_dir: Path,
    columns: Mapping[str, Sequence[str]],
    *,
    image_ids: Sequence[str] | None = None,
    name: str = "csv",
) -> LabelledSet:
    """Import image-level labels from categorical CSV columns.

    Each listed column becomes one group of labels ``"<column>:<value>"``; every row
    has exactly one value per column, so exactly one label per group is present.

    Parameters
    ----------
    csv_path : pathlib.Path
        CSV with an ``image_id`` column and the listed columns.
    img_dir : pathlib.Path
        Folder of ``<image_id>`` + a known suffix.
    columns : mapping of str to sequence of str
        Column name -> allowed values; their order gives the class order.
    image_ids : sequence of str or None, default None
        Images to return, in order; each needs a row. ``None`` returns every row.
    name : str, default "csv"
        Name of the returned set.

    Raises
    ------
    AnnotationError
        Naming file and line: a missing column, a value outside the allowed ones, a
        duplicate image, a missing image; or an image in ``image_ids`` without a row.
        Naming the image: an unreadable header, or a multi-page TIFF.
    """
    file = str(csv_path)
    classes = _label_classes(columns)
    samples: dict[str, Sample] = {}
    for image_id, (line, labels) in _label_rows(csv_path, columns).items():
        path = _single_image(img_dir, image_id, file=file, line=line)
        samples[image_id] = _sample(image_id, path, (), labels)
    wanted = list(samples) if image_ids is None else list(image_ids)
    missing = [i for i in wanted if i not in samples]
    if missing:
        raise AnnotationError(f"no row for images {missing[:5]} ({len(missing)} in all)", file=file)
    return LabelledSet(name, classes, tuple(samples[i] for i in wanted))


def column_groups(columns: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Return the label group of each column of a labels table, as the importers name them.

    The label of value ``V`` in column ``C`` is ``"C:V"``; a column's labels exclude each
    other, so each column is one group.
    """
    return {col: [f"{col}:{v}" for v in values] for col, values in columns.items()}


def _label_classes(columns: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Return the label of every value of every column, ``"<column>:<value>"``, in order."""
    return tuple(label for labels in column_groups(columns).values() for label in labels)


def _label_rows(
    csv_path: Path, columns: Mapping[str, Sequence[str]]
) -> dict[str, tuple[int, set[str]]]:
    """Return each image's line and labels, ``"<column>:<value>"``, from a labels CSV."""
    file = str(csv_path)
    rows: dict[str, tuple[int, set[str]]] = {}
    for line, row in read_csv_rows(csv_path, ("image_id", *columns)):
        image_id = row["image_id"].strip()
        if image_id in rows:
            raise AnnotationError(f"duplicate row for image {image_id!r}", file=file, line=line)
        labels = set()
        for col, values in columns.items():
            value = row[col].strip()
            if value not in values:
                raise AnnotationError(
                    f"unknown class {col}:{value!r}; allowed values are {list(values)}",
                    file=file,
                    line=line,
                )
            labels.add(f"{col}:{value}")
        rows[image_id] = (line, labels)
    return rows


def add_image_labels(
    labelled: LabelledSet, csv_path: Path, columns: Mapping[str, Sequence[str]]
) -> LabelledSet:
    """Add image-level labels from categorical CSV columns to an imported set.

    For a lab whose objects come in one format (boxes or masks) and whose image-level
    phenotypes come in a table: each listed column becomes one group of labels
    ``"<column>:<value>"`` (as :func:`import_csv_labels` makes them) beside the set's
    own classes.

    Parameters
    ----------
    labelled : LabelledSet
        The imported set.
    csv_path : pathlib.Path
        CSV with an ``image_id`` column and the listed columns. A page of a multi-page
        TIFF, ``<stem>@p<k>``, takes its own row if it has one, else its stack's row
        (``<stem>``).
    columns : mapping of str to sequence of str
        Column name -> allowed values; their order gives the class order.

    Returns
    -------
    LabelledSet
        The same samples with the rows' labels added, and the labels after its classes.

    Raises
    ------
    AnnotationError
        Naming file and line: a missing column, a value outside the allowed ones, a
        duplicate image. Naming the file: a label that is already a class of the set, or
        images without a row (the first five, and how many).
    """
    file = str(csv_path)
    added = _label_classes(columns)
    clash = sorted(set(added) & set(labelled.classes))
    if clash:
        raise AnnotationError(f"labels {clash} are already classes of the import", file=file)
    rows = _label_rows(csv_path, columns)
    samples, missing = [], []
    for s in labelled.samples:
        row = rows.get(s.image_id) or rows.get(s.group or s.image_id)
        if row is None:
            missing.append(s.image_id)
            continue
        samples.append(dataclasses.replace(s, labels=frozenset(s.labels) | row[1]))
    if missing:
        raise AnnotationError(f"no row for images {missing[:5]} ({len(missing)} in all)", file=file)
    return dataclasses.replace(
        labelled, classes=(*labelled.classes, *added), samples=tuple(samples)
    )


def add_boxes(
    labelled: LabelledSet, csv_path: Path, label: str, *, drop_degenerate: bool = False
) -> LabelledSet:
    """Add boxes of one more class from a CSV to an imported set.

    For a lab whose objects come in one format (masks, say) and one class of them, a
    rare phenotype, in a table of boxes (``image_id,x_min,y_min,x_max,y_max``, half-open
    pixels, as :func:`import_csv_boxes` reads): the boxes join the images of the set as
    class ``label``; images without a row keep none of them (negatives).

    Parameters
    ----------
    labelled : LabelledSet
        The imported set.
    csv_path : pathlib.Path
        The boxes, with a header row; other columns are ignored.
    label : str
        Their class, new to the set.
    drop_degenerate : bool, default False
        Drop zero-area boxes with a report instead of raising.

    Returns
    -------
    LabelledSet
        The same samples with the boxes added after their own, ``label`` after the set's
        classes.

    Raises
    ------
    AnnotationError
        Naming file and line: a missing column or field, a non-numeric value, an image
        that is not in the set, a box outside its image or of zero area. Naming the
        file: ``label`` is already a class of the set.
    """
    file = str(csv_path)
    if label in labelled.classes:
        raise AnnotationError(f"class {label!r} is already a class of the import", file=file)
    by_id = {s.image_id: s for s in labelled.samples}

    def size_of(image_id: str, line: int) -> tuple[int, int]:
        sample = by_id.get(image_id)
        if sample is None or sample.path is None:
            raise AnnotationError(f"image {image_id!r} is not in the import", file=file, line=line)
        return image_size(sample.path, page=sample.page)

    checker = _BoxChecker(drop_degenerate)
    added = _csv_boxes(csv_path, label, checker, size_of)
    samples = tuple(
        dataclasses.replace(s, labels=s.labels | {label}, boxes=(*s.boxes, *added[s.image_id]))
        if added.get(s.image_id)
        else s
        for s in labelled.samples
    )
    return dataclasses.replace(
        labelled,
        classes=(*labelled.classes, label),
        samples=samples,
        dropped=(*labelled.dropped, *checker.dropped),
    )


def read_split_file(path: Path) -> dict[str, str]:
    """Read a fixed train/val/test split.

    Parameters
    ----------
    path : pathlib.Path
        A CSV with ``image_id`` and ``split`` columns (``train``, ``val`` or ``test``),
        or a folder holding ``train.txt``, ``val.txt`` and ``test.txt``, one id a line
        (Pascal VOC's ``ImageSets/Main``).

    Returns
    -------
    dict of str to str
        The split of every listed id.

    Raises
    ------
    AnnotationError
        Naming file and line: a missing file or column, an unknown split, an id listed
        twice.
    """
    splits = ("train", "val", "test")
    listed: dict[str, str] = {}

    def put(image_id: str, split: str, file: str, line: int) -> None:
        if split not in splits:
            raise AnnotationError(
                f"unknown split {split!r}; use one of {list(splits)}", file=file, line=line
            )
        if image_id in listed:
            raise AnnotationError(f"image {image_id!r} is listed twice", file=file, line=line)
        listed[image_id] = split

    if path.is_dir():
        for split in splits:
            file = path / f"{split}.txt"
            try:
                text = _read_text(file)
            except FileNotFoundError as exc:
                raise AnnotationError(
                    f"a split folder needs {', '.join(f'{s}.txt' for s in splits)}", file=str(file)
                ) from exc
            for line, entry in enumerate(text.splitlines(), start=1):
                if entry.strip():
                    put(entry.strip(), split, str(file), line)
        return listed
    for line, row in read_csv_rows(path, ("image_id", "split")):
        put(row["image_id"].strip(), row["split"].strip(), str(path), line)
    return listed


# --------------------------------------------------------------------- class folders


def import_class_folders(root: Path, *, name: str = "folders") -> LabelledSet:
    """Import single-label images laid out as ``root/<class>/<image>``.

    Parameters
    ----------
    root : pathlib.Path
        One sub-folder per class (sorted names give the class order); hidden entries
        and files beside the class folders that are not images (a licence, a README)
        are ignored.
    name : str, default "folders"
        Name of the returned set.

    Returns
    -------
    LabelledSet
        ``image_id`` is ``"<class>/<stem>"`` (``"<class>/<stem>@p<k>"`` per page of a
        multi-page TIFF); labels are ``{class}``.

    Raises
    ------
    AnnotationError
        If ``root`` is missing, holds an image outside the class folders, a class
        folder holds a non-image, or a class folder is empty.
    """
    if not root.is_dir():
        raise AnnotationError("folder does not exist", file=str(root))
    classes: list[str] = []
    samples: list[Sample] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                raise AnnotationError(
                    "image outside a class folder; move it into the folder of its class",
                    file=str(entry),
                )
            continue
        images = image_files(entry)
        if not images:
            raise AnnotationError("class folder holds no images", file=str(entry))
        classes.append(entry.name)
        samples.extend(
            _plane_sample(pl, (), {entry.name})
            for p in images
            for pl in _planes(p, f"{entry.name}/")
        )
    return LabelledSet(name, tuple(classes), tuple(samples))


# ------------------------------------------------------------------------- exporters


def _safe_name(image_id: str) -> str:
    """Turn an image id into one file name (ids may hold ``/``)."""
    return image_id.replace(os.sep, "__")


def export_yolo(
    labelled_set: LabelledSet, out_dir: Path, split_name: str, *, copy: bool = False
) -> Path:
    """Write a split in the Ultralytics YOLO layout and (re)write ``data.yaml``.

    Writes ``out_dir/images/<split_name>/<id><suffix>`` (a symlink to the original, or a
    copy; samples with a degradation, or a page of a multi-page TIFF, get a PNG (uint8)
    or TIFF (uint16) of their pixels) and ``out_dir/labels/<split_name>/<id>.txt`` with
    ``class cx cy w h`` lines, normalised to ``[0, 1]``; an image without boxes gets an
    empty file (a negative).
    Both split folders are emptied first, so a re-export never leaves stale files.

    Parameters
    ----------
    labelled_set : LabelledSet
        Samples with paths; box labels index ``labelled_set.classes``.
    out_dir : pathlib.Path
        Dataset root; created if missing.
    split_name : str
        ``"train"``, ``"val"`` or ``"test"``.
    copy : bool, default False
        Copy images instead of symlinking them.

    Returns
    -------
    pathlib.Path
        ``out_dir/data.yaml``, listing every split folder present and the class names.

    Raises
    ------
    ValidationError
        If a box label is not a class, a sample has no path, or ``data.yaml`` already
        names other classes.
    """
    index = {c: i for i, c in enumerate(labelled_set.classes)}
    names = dict(enumerate(labelled_set.classes))
    yaml_path = out_dir / "data.yaml"
    if yaml_path.is_file():
        existing = yaml.safe_load(yaml_path.read_text()) or {}
        if existing.get("names", names) != names:
            raise ValidationError(
                f"{yaml_path} names classes {existing.get('names')}, not {names}; use another "
                "folder"
            )
    img_out = out_dir / "images" / split_name
    lbl_out = out_dir / "labels" / split_name
    for folder in (img_out, lbl_out):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    for sample in labelled_set.samples:
        if sample.path is None:
            raise ValidationError(f"sample {sample.image_id!r} has no path to export")
        stem = _safe_name(sample.image_id)
        if sample.degradation or image_pages(sample.path) > 1:
            pixels = load_pixels(sample)
            if pixels.dtype == np.uint8:
                target = img_out / f"{stem}.png"
                Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(target)
            else:
                target = img_out / f"{stem}.tif"
                tifffile.imwrite(target, pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        else:
            target = img_out / f"{stem}{sample.path.suffix.lower()}"
            if copy:
                shutil.copyfile(sample.path, target)
            else:
                target.symlink_to(sample.path.resolve())
        width, height = image_size(sample.path, page=sample.page)
        lines = []
        for b in sample.boxes:
            if b.label not in index:
                raise ValidationError(
                    f"sample {sample.image_id!r} has a box of {b.label!r}, not one of "
                    f"{list(labelled_set.classes)}"
                )
            cx = (b.x_min + b.x_max) / 2 / width
            cy = (b.y_min + b.y_max) / 2 / height
            w = (b.x_max - b.x_min) / width
            h = (b.y_max - b.y_min) / height
            lines.append(f"{index[b.label]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
        (lbl_out / f"{stem}.txt").write_text("".join(lines))
    splits = {
        s: f"images/{s}"
        for s in sorted(p.name for p in (out_dir / "images").iterdir() if p.is_dir())
    }
    yaml_path.write_text(
        yaml.safe_dump({"path": str(out_dir.resolve()), **splits, "names": names}, sort_keys=False)
    )
    return yaml_path


def to_coco(labelled_set: LabelledSet) -> dict[str, Any]:
    """Return a COCO ground-truth dict that ``pycocotools.coco.COCO`` can index.

    Image ids are ``1..N`` in sample order, with ``file_name`` = the sample's
    ``image_id``; category ids are ``1..K`` in ``classes`` order; each box becomes
    ``bbox = [x_min, y_min, width, height]`` with ``area = width * height`` and
    ``iscrowd = 0``. Image sizes are read from the files' headers.

    Raises
    ------
    ValidationError
        If a sample has no path or a box label is not a class.
    """
    category = {c: i for i, c in enumerate(labelled_set.classes, start=1)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_index, sample in enumerate(labelled_set.samples, start=1):
        if sample.path is None:
            raise ValidationError(f"sample {sample.image_id!r} has no path; COCO needs its size")
        width, height = image_size(sample.path, page=sample.page)
        images.append(
            {"id": image_index, "file_name": sample.image_id, "width": width, "height": height}
        )
        for b in sample.boxes:
            if b.label not in category:
                raise ValidationError(
                    f"sample {sample.image_id!r} has a box of {b.label!r}, not one of "
                    f"{list(labelled_set.classes)}"
                )
            w, h = b.x_max - b.x_min, b.y_max - b.y_min
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_index,
                    "category_id": category[b.label],
                    "bbox": [b.x_min, b.y_min, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": labelled_set.name},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": c} for c, i in category.items()],
    }
