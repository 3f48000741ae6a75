"""What changed for each image between the outputs of two sets of model versions.

Pure functions over stored ``ImageOutput`` records (as :mod:`phenocascade.store.cassandra`
returns them); ``phenocascade diff`` reads the outputs and prints what these find.

A *versions spec* is a versions key such as ``"majority=v2;minority=v3;quality=v1"``, or a
part of one (``"minority=v3"``). An output matches a spec when it shares a tier with it and
every tier they share has the spec's version: an image the quality gate skipped (its
output names only the gate) matches every spec with that gate version, so a promotion of a
tier behind the gate leaves it unchanged, as it should.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from phenocascade.domain import box_iou
from phenocascade.errors import ValidationError

LABEL_PRESENT = 0.5
"""An image-level label counts as given at this calibrated score or above (as ``results``)."""
BOX_IOU = 0.5
"""Two boxes of one label are the same object at this intersection over union or above."""
_TIER = re.compile(r"[A-Za-z0-9_.-]+")
_VERSION = re.compile(r"[^\s;=@]+")


def parse_versions(text: str, *, option: str = "versions") -> dict[str, str]:
    """Return ``{tier: version}`` from a versions spec such as ``"majority=v2;quality=v1"``.

    Parameters
    ----------
    text : str
        ``tier=version`` parts joined by ``;``.
    option : str, default "versions"
        The option it came from, for the error message.

    Raises
    ------
    ValidationError
        If a part is not ``tier=version``, names an expert (``tier@expert=...``: outputs
        are compared as the models made them), or a tier appears twice.
    """
    spec: dict[str, str] = {}
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise ValidationError(f"{option} is empty; give tier=version parts such as quality=v1")
    for part in parts:
        tier, sep, version = part.partition("=")
        if "@expert" in tier:
            raise ValidationError(
                f"{option}: {part!r} names an expert; diff compares the models' outputs, so "
                "leave out the tier@expert=... parts"
            )
        if not sep or not _TIER.fullmatch(tier) or not _VERSION.fullmatch(version):
            raise ValidationError(
                f"{option}: {part!r} is not tier=version (e.g. "
                "'majority=20261201T101500-3fa2;quality=20261130T090000-1c2d')"
            )
        if tier in spec:
            raise ValidationError(f"{option}: tier {tier!r} is given twice")
        spec[tier] = version
    return spec


def matches(spec: Mapping[str, str], model_versions: Mapping[str, str]) -> bool:
    """Whether an output with ``model_versions`` was produced under ``spec``.

    It shares at least one tier with the spec, and each shared tier has the spec's version.
    """
    shared = spec.keys() & model_versions.keys()
    return bool(shared) and all(spec[t] == model_versions[t] for t in shared)


def pick(outputs: Iterable[Mapping[str, Any]], spec: Mapping[str, str]) -> dict[str, Any] | None:
    """Return the newest model output (no expert's answer in it) matching ``spec``, or ``None``."""
    found = [
        dict(o) for o in outputs if not o.get("annotators") and matches(spec, o["model_versions"])
    ]
    return max(found, key=lambda o: o["produced_at"]) if found else None


def given_labels(output: Mapping[str, Any]) -> set[str]:
    """Return the image-level labels an output gives (score at least :data:`LABEL_PRESENT`)."""
    return {label for label, p in output["labels"].items() if p >= LABEL_PRESENT}


def box_changes(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return the boxes only ``after`` has (added) and only ``before`` has (removed).

    Boxes of the same label overlapping by at least :data:`BOX_IOU` are one object, matched
    greedily from the largest overlap; their scores may differ.
    """
    coords = ("x_min", "y_min", "x_max", "y_max")
    overlaps = box_iou(
        [[b[c] for c in coords] for b in before], [[a[c] for c in coords] for a in after]
    )
    pairs = sorted(
        (
            (float(overlaps[i, j]), i, j)
            for i, b in enumerate(before)
            for j, a in enumerate(after)
            if b["label"] == a["label"]
        ),
        reverse=True,
    )
    matched_before: set[int] = set()
    matched_after: set[int] = set()
    for overlap, i, j in pairs:
        if overlap < BOX_IOU:
            break
        if i not in matched_before and j not in matched_after:
            matched_before.add(i)
            matched_after.add(j)
    added = [dict(a) for j, a in enumerate(after) if j not in matched_after]
    removed = [dict(b) for i, b in enumerate(before) if i not in matched_before]
    return added, removed


@dataclass
class ImageChange:
    """How one image's output differs between the two specs.

    Attributes
    ----------
    image_id, study : str
        The image.
    from_key, to_key : str
        The versions keys of the two outputs compared.
    status : tuple of (str, str) or None
        Old and new status, if it changed.
    routes : dict of str to (str or None, str or None)
        Each tier whose route changed: old and new route (``None``: the tier did not see it).
    labels_added, labels_removed : list of str
        Image-level labels given only after, only before.
    boxes_added, boxes_removed : list of dict
        ``Box`` records found only after, only before.
    """

    image_id: str
    study: str
    from_key: str
    to_key: str
    status: tuple[str, str] | None = None
    routes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    labels_added: list[str] = field(default_factory=list)
    labels_removed: list[str] = field(default_factory=list)
    boxes_added: list[dict[str, Any]] = field(default_factory=list)
    boxes_removed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def what(self) -> list[str]:
        """Which of ``route``, ``labels`` and ``boxes`` changed (a status change is a route's)."""
        kinds = []
        if self.routes or self.status:
            kinds.append("route")
        if self.labels_added or self.labels_removed:
            kinds.append("labels")
        if self.boxes_added or self.boxes_removed:
            kinds.append("boxes")
        return kinds

    def as_dict(self) -> dict[str, Any]:
        """Return it as JSON-ready data."""
        return {
            "image_id": self.image_id,
            "study": self.study,
            "from": self.from_key,
            "to": self.to_key,
            "changed": self.what,
            "status": list(self.status) if self.status else None,
            "routes": {tier: list(pair) for tier, pair in self.routes.items()},
            "labels": {"added": self.labels_added, "removed": self.labels_removed},
            "boxes": {"added": self.boxes_added, "removed": self.boxes_removed},
        }


def compare(
    before: Mapping[str, Any], after: Mapping[str, Any], *, from_key: str, to_key: str
) -> ImageChange | None:
    """Return how ``after`` differs from ``before`` (same image), or ``None`` if it does not.

    Routes and status compare as they are, labels as the set given (score at least
    :data:`LABEL_PRESENT`, so a score that moves without crossing it is no change), boxes
    as objects (:func:`box_changes`).
    """
    change = ImageChange(
        image_id=before["image_id"], study=before["study"], from_key=from_key, to_key=to_key
    )
    if before["status"] != after["status"]:
        change.status = (before["status"], after["status"])
    old_routes, new_routes = before["routes"], after["routes"]
    for tier in sorted(old_routes.keys() | new_routes.keys()):
        if old_routes.get(tier) != new_routes.get(tier):
            change.routes[tier] = (old_routes.get(tier), new_routes.get(tier))
    old_labels, new_labels = given_labels(before), given_labels(after)
    change.labels_added = sorted(new_labels - old_labels)
    change.labels_removed = sorted(old_labels - new_labels)
    change.boxes_added, change.boxes_removed = box_changes(before["boxes"], after["boxes"])
    return change if change.what else None


@dataclass
class VersionsDiff:
    """The outcome of :func:`diff_outputs`.

    Attributes
    ----------
    compared : int
        Images with an output under both specs.
    changed : list of ImageChange
        Those whose output changed, in image id order.
    only_from, only_to : list of str
        Images with an output under one spec only (not re-scored yet, or new).
    """

    compared: int
    changed: list[ImageChange]
    only_from: list[str]
    only_to: list[str]

    def as_dict(self) -> dict[str, Any]:
        """Return it as JSON-ready data."""
        return {
            "compared": self.compared,
            "unchanged": self.compared - len(self.changed),
            "changed": [c.as_dict() for c in self.changed],
            "only_from": self.only_from,
            "only_to": self.only_to,
        }


def output_key(output: Mapping[str, Any]) -> str:
    """Return the versions key of a model output (``tier=version`` joined by ``;``)."""
    return ";".join(f"{t}={v}" for t, v in sorted(output["model_versions"].items()))


def diff_outputs(
    outputs: Iterable[Mapping[str, Any]],
    from_spec: Mapping[str, str],
    to_spec: Mapping[str, str],
) -> VersionsDiff:
    """Compare, image by image, the output under ``from_spec`` with the one under ``to_spec``.

    Parameters
    ----------
    outputs : Iterable of Mapping
        Stored ``ImageOutput`` records, any number per image and in any order.
    from_spec, to_spec : Mapping of str to str
        Versions specs (:func:`parse_versions`); for each image, the newest model output
        matching each (:func:`pick`) is compared.
    """
    by_image: dict[str, list[Mapping[str, Any]]] = {}
    for output in outputs:
        by_image.setdefault(output["image_id"], []).append(output)
    changed: list[ImageChange] = []
    only_from: list[str] = []
    only_to: list[str] = []
    compared = 0
    for image_id in sorted(by_image):
        before = pick(by_image[image_id], from_spec)
        after = pick(by_image[image_id], to_spec)
        if before is None and after is None:
            continue
        if after is None:
            only_from.append(image_id)
        elif before is None:
            only_to.append(image_id)
        else:
            compared += 1
            change = compare(before, after, from_key=output_key(before), to_key=output_key(after))
            if change is not None:
                changed.append(change)
    return VersionsDiff(compared, changed, only_from, only_to)
