"""The labelled-set value type shared by the importers and the dataset loaders.

Box convention: ``[x_min, y_min, x_max, y_max]`` in pixels, ``x_max``/``y_max`` exclusive
(half-open), origin at the top-left corner, as in :mod:`phenocascade.domain`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from phenocascade.config import get_settings
from phenocascade.data import degrade
from phenocascade.domain import Sample
from phenocascade.errors import ValidationError
from phenocascade.imaging import Pixels, decode_file

# The positive label of every quality gate: the image is usable.
QUALITY_LABEL = "clear"


@dataclass(frozen=True, slots=True)
class DroppedAnnotation:
    """One annotation an importer dropped on explicit request (``drop_degenerate``, ``min_size``).

    Attributes
    ----------
    file : str
        The annotation file it came from.
    line : int or None
        1-based line of its element or row, ``None`` if the format has no lines.
    image_id : str
        The image it belonged to.
    label : str
        Its class.
    box : tuple of float
        ``(x_min, y_min, x_max, y_max)`` as written in the file.
    reason : str
        Why it was dropped, e.g. ``"zero-area box"`` or ``"component of 3 px < min_size 5"``.
    """

    file: str
    line: int | None
    image_id: str
    label: str
    box: tuple[float, float, float, float]
    reason: str


@dataclass(frozen=True)
class LabelledSet:
    """A named, ordered collection of labelled samples.

    Attributes
    ----------
    name : str
        Dataset and split, e.g. ``"bccd/train"``.
    classes : tuple of str
        The label vocabulary, in the order models index it.
    samples : tuple of Sample
        The samples; every label and box label is one of ``classes``.
    dropped : tuple of DroppedAnnotation, default ()
        What the importer dropped on request; empty for strict imports.
    """

    name: str
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    dropped: tuple[DroppedAnnotation, ...] = ()

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """Return a SHA-256 hex digest that changes whenever the labelled content does.

        It covers the classes and, over samples sorted by ``image_id``, each image id,
        its sorted labels, its boxes, its degradation and seed, and its page when not 0
        (so sets without multi-page images keep their fingerprints). File paths are left
        out, so the same data in another folder has the same fingerprint.
        """
        records = sorted(
            (
                s.image_id,
                sorted(s.labels),
                [[*b.as_list(), b.label] for b in s.boxes],
                s.degradation,
                s.seed,
                *([s.page] if s.page else []),
            )
            for s in self.samples
        )
        payload = json.dumps([list(self.classes), records], separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()

    def label_counts(self) -> dict[str, int]:
        """Return, per class, the number of samples with that image label or a box of it."""
        counts: collections.Counter[str] = collections.Counter()
        for s in self.samples:
            counts.update(set(s.labels) | {b.label for b in s.boxes})
        return {c: counts[c] for c in self.classes}

    def box_counts(self) -> dict[str, int]:
        """Return, per class, the number of boxes."""
        counts = collections.Counter(b.label for s in self.samples for b in s.boxes)
        return {c: counts[c] for c in self.classes}

    def summary(self) -> dict[str, Any]:
        """Return a JSON-ready summary: sizes, counts per class, drops and fingerprint."""
        return {
            "name": self.name,
            "images": len(self.samples),
            "classes": list(self.classes),
            "images_per_label": self.label_counts(),
            "boxes_per_class": self.box_counts(),
            "unlabelled_images": sum(1 for s in self.samples if not s.labels and not s.boxes),
            "dropped": [
                {
                    "file": d.file,
                    "line": d.line,
                    "image_id": d.image_id,
                    "label": d.label,
                    "box": list(d.box),
                    "reason": d.reason,
                }
                for d in self.dropped
            ],
            "fingerprint": self.fingerprint(),
        }


def load_pixels(sample: Sample) -> Pixels:
    """Read a sample's image (its page ``sample.page``) and apply its degradation.

    Parameters
    ----------
    sample : Sample
        A sample whose ``path`` is set; ``page`` selects the page of a multi-page TIFF;
        ``degradation``/``seed`` name a degradation of :mod:`phenocascade.data.degrade`
        or ``""`` for none.

    Returns
    -------
    numpy.ndarray
        ``(H, W, C)``, ``C`` in {1, 3}, ``uint8`` or ``uint16`` as stored (never rescaled),
        degraded deterministically from ``sample.seed``.

    Raises
    ------
    ValidationError
        If the sample has no path or an unknown degradation.
    CorruptImageError, DecompressionBombError, UnsupportedImageError
        If the file cannot be read or decoded.
    """
    if sample.path is None:
        raise ValidationError(f"sample {sample.image_id!r} has no path to read pixels from")
    pixels = decode_file(sample.path, max_pixels=get_settings().max_image_pixels, page=sample.page)
    if sample.degradation:
        return degrade.apply(pixels, sample.degradation, sample.seed)
    return pixels


def stable_seed(*parts: object) -> int:
    """Derive a seed from values, stable across processes (unlike ``hash``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "big")


def quality_examples(
    sources: Sequence[Sample], *, name: str, seed: int = 0, per_image: int = 2
) -> LabelledSet:
    """Build a quality-gate set from clear images: each, plus severely degraded copies.

    Each source gives one sample labelled ``{"clear"}`` and ``per_image`` unclear copies
    (labels empty), each with a different kind drawn from
    :data:`phenocascade.data.degrade.SEVERE`, applied by :func:`load_pixels`. Source and
    copies share ``group`` (the source's group, else its id), so a split never separates
    them. Copies are named ``"<source id>~<degradation>"``.

    Parameters
    ----------
    sources : sequence of Sample
        Clear images; their labels and boxes are ignored.
    name : str
        Name of the returned set.
    seed : int, default 0
        Seeds the kinds drawn and each copy's degradation seed.
    per_image : int, default 2
        Degraded copies per source, ``0..len(SEVERE)``.

    Returns
    -------
    LabelledSet
        ``classes == ("clear",)``.
    """
    samples = []
    for source in sources:
        group = source.group or source.image_id
        samples.append(
            dataclasses.replace(
                source, labels=frozenset({QUALITY_LABEL}), boxes=(), group=group, mask=None
            )
        )
        rng = np.random.default_rng(stable_seed(seed, source.image_id))
        for k in rng.choice(len(degrade.SEVERE), per_image, replace=False):
            spec = degrade.SEVERE[int(k)]
            samples.append(
                dataclasses.replace(
                    source,
                    image_id=f"{source.image_id}~{spec}",
                    labels=frozenset(),
                    boxes=(),
                    group=group,
                    degradation=spec,
                    seed=stable_seed(seed, source.image_id, spec),
                    mask=None,
                )
            )
    return LabelledSet(name, (QUALITY_LABEL,), tuple(samples))
