"""Plan a cascade from stored datasets: which tiers exist and which labels each decides.

``phenocascade plan NAME...`` turns the label frequencies and label kinds of stored
datasets into a topology. The number of tiers follows the data. These rules are the spec:

Frequency
    An image label counts images: images carrying it / all images. An object class counts
    objects: its boxes / the boxes of all object classes. Every label reports both counts
    (images containing it, and its objects). Counts cover every sample of the dataset: the
    plan decides which tiers exist, it fits nothing, so no split is held out.
Rare
    A label whose frequency is at most ``minority_max_fraction`` (default 0.15) is rare;
    any other is frequent.
Tier 1, the quality gate (always)
    Tier ``quality``: role gate, backend ``quality_probe``, labels ``["clear"]``, routes
    pass -> ``images.usable``, skip -> ``images.skipped``. ``quality="own"``: artifact
    ``<dataset>-quality``, ``dataset: <dataset>``, trained on the dataset's own quality
    labels when it has an image label ``"clear"`` (with any group holding it), else on
    synthetic degradations of its images. ``quality="generic"``: artifact ``quality`` (the
    bundled gate), ``dataset: null``. The gate decides quality labels; other tiers never
    get them. A table row names the gate's training source.
Label groups
    One classifier tier (role branch, backend ``multilabel_cnn``) per group with at least
    one frequent label: tier name = group name, labels = the group's labels. The labels of
    a group with no frequent label are pooled with the ungrouped image labels.
Ungrouped image labels
    All go to one classifier tier ``labels`` (rare ones too: nothing to detect without
    boxes), except labels in no image (nothing to learn) or in every image (no decision);
    no ``labels`` tier when none is left.
Object classes
    Rare classes -> one detector tier ``rare`` (backend ``torchvision_detector``). Frequent
    classes -> one classifier tier ``objects`` of image-level presence labels (label = class
    name; an image with a box of it is positive), except classes in every image (no
    image-level decision to make). Classes without boxes get no tier. No rare class, no
    detector tier.
Several datasets
    Each dataset's tiers are planned separately and named ``<dataset>-<tier>``; one gate
    serves all, trained (``own``) on the first dataset. With one dataset, no prefix.
Every tier
    Artifact ``<dataset>-<tier>`` (unless generic), consumer group ``phenocascade-<tier>``,
    result topic ``tier.<tier>``; branches read ``images.usable``; batch size 8 (gate and
    classifiers) or 4 (detector); ``threads = max(1, cpu_count // number of tiers)`` so that
    tiers sharing a machine do not oversubscribe its cores; one replica.
Topics
    Every topic is declared: submitted and usable 4 partitions each, the rest as in the
    packaged ``topology.yaml`` (annotations kept forever, deadletter 1 partition for 30
    days, models 1 partition compacted).
Namespace
    The topology is namespaced with :meth:`Topology.namespaced`, by default with
    ``"<first dataset>."``, so that two labs' cascades on one cluster never share a topic.
Refusal
    A dataset that needs no tier besides the gate is refused with a
    :class:`~phenocascade.errors.ValidationError` listing its labels.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import pydantic
import yaml

from phenocascade.config import TierSpec, TopicSpec, Topology
from phenocascade.data.registry import LabelKind, StoredDataset
from phenocascade.errors import ValidationError

GATE_TIER = "quality"
QUALITY_LABEL = "clear"
LABELS_TIER = "labels"
OBJECTS_TIER = "objects"
DETECTOR_TIER = "rare"
GENERIC_GATE_ARTIFACT = "quality"

SUBMITTED_TOPIC = "images.submitted"
USABLE_TOPIC = "images.usable"
SKIPPED_TOPIC = "images.skipped"
_THIRTY_DAYS_MS = 30 * 24 * 3600 * 1000
# Tier names become topic and consumer-group names: Kafka's legal characters only.
_TIER_NAME = re.compile(r"[A-Za-z0-9._-]+")

# Where each label goes: (tier name before any dataset prefix, or None; the reason).
_Decision = tuple[str | None, str]


@dataclass(frozen=True)
class PlanRow:
    """One label of one dataset, its counts, and the tier that decides it.

    Attributes
    ----------
    dataset : str
        The dataset's name.
    label : str
        The label (image label or object class).
    kind : {"image", "object"}
        Image label, or object class with boxes.
    images : int
        Images carrying the label or holding a box of it.
    objects : int
        Boxes of the label.
    image_fraction : float
        ``images`` / all images of the dataset.
    object_fraction : float or None
        ``objects`` / all boxes of the dataset's object classes; ``None`` for image labels.
    tier : str or None
        Name of the tier that decides the label (as in the topology), ``None`` for none.
    why : str
        The rule that put the label there, with its figures.
    """

    dataset: str
    label: str
    kind: LabelKind
    images: int
    objects: int
    image_fraction: float
    object_fraction: float | None
    tier: str | None
    why: str


@dataclass(frozen=True)
class CascadePlan:
    """A planned cascade: the validated topology and the table that explains it.

    Attributes
    ----------
    topology : Topology
        The whole flow, namespaced with ``prefix``.
    rows : list of PlanRow
        The gate's row first, then every label of every dataset in ``classes`` order.
    prefix : str
        The namespace prefix of every topic, consumer group and joiner id.
    """

    topology: Topology
    rows: list[PlanRow]
    prefix: str

    def to_yaml(self, header: str) -> str:
        """Return the topology as YAML that :func:`~phenocascade.config.load_topology` reads.

        Parameters
        ----------
        header : str
            Text written first as ``#`` comment lines (what made the file, from what).
        """
        comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
        body = yaml.safe_dump(
            self.topology.model_dump(mode="json"), sort_keys=False, default_flow_style=None
        )
        return comment + body


@dataclass(frozen=True)
class _Branch:
    """A branch tier of one dataset, before naming and wiring."""

    name: str
    backend: str
    labels: list[str]
    batch_size: int
    groups: dict[str, list[str]] = field(default_factory=dict)


def plan_cascade(
    datasets: Sequence[StoredDataset],
    *,
    minority_max_fraction: float = 0.15,
    quality: Literal["own", "generic"] = "own",
    prefix: str | None = None,
) -> CascadePlan:
    """Plan the tiers of a cascade from stored datasets (rules: the module docstring).

    Parameters
    ----------
    datasets : sequence of StoredDataset
        At least one, names unique; the first one trains the gate and names the prefix.
    minority_max_fraction : float, default 0.15
        Largest frequency of a rare label, in ``(0, 1)``.
    quality : {"own", "generic"}, default "own"
        Train the gate on the first dataset, or run the bundled generic gate.
    prefix : str or None, default None
        Namespace of topics, consumer groups and joiner id; ``None``: ``"<first name>."``.

    Returns
    -------
    CascadePlan
        The validated topology and one row per label.

    Raises
    ------
    ValidationError
        If no dataset is given, names repeat, the fraction is outside ``(0, 1)``, a dataset
        has no sample, a group name cannot be a tier name, or a dataset needs nothing
        decided besides the gate.
    """
    _check_arguments(datasets, minority_max_fraction)
    first = datasets[0]
    rows: list[PlanRow] = []
    branches: list[tuple[str, str, _Branch]] = []  # (tier name, dataset, branch)
    for dataset in datasets:
        counts = _count(dataset)
        gate_owner = dataset is first and quality == "own"
        found, decisions = _plan_dataset(dataset, counts, minority_max_fraction, gate_owner)
        if not found:
            raise _nothing_to_decide(dataset, counts, decisions)
        name_of = {b.name: _tier_name(dataset, b.name, several=len(datasets) > 1) for b in found}
        name_of[GATE_TIER] = GATE_TIER
        branches += [(name_of[b.name], dataset.name, b) for b in found]
        for label, row in counts.items():
            tier, why = decisions[label]
            rows.append(replace(row, tier=None if tier is None else name_of[tier], why=why))
    gate_row = _gate_row(first, rows, quality, len(datasets))
    rows = [gate_row, *(row for row in rows if not _is_gate_label(row, first.name))]
    threads = max(1, (os.cpu_count() or 1) // (len(branches) + 1))
    gate = _gate_spec(first.name if quality == "own" else None, threads)
    tiers = [gate, *(_branch_spec(n, d, b, threads) for n, d, b in branches)]
    effective = f"{first.name}." if prefix is None else prefix
    try:
        topology = _topology(tiers).namespaced(effective)
    except pydantic.ValidationError as exc:
        raise ValidationError(f"the planned topology is invalid: {exc}") from exc
    return CascadePlan(topology=topology, rows=rows, prefix=effective)


def _check_arguments(datasets: Sequence[StoredDataset], minority_max_fraction: float) -> None:
    if not datasets:
        raise ValidationError("plan needs at least one stored dataset")
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise ValidationError(f"each dataset may be planned once, got {names}")
    if not 0.0 < minority_max_fraction < 1.0:
        raise ValidationError(
            f"minority_max_fraction must be in (0, 1), got {minority_max_fraction}"
        )
    for dataset in datasets:
        if not dataset.samples:
            raise ValidationError(f"dataset {dataset.name!r} has no samples: nothing to plan")
        unknown = [label for label in dataset.classes if label not in dataset.kinds]
        grouped = {label for members in dataset.groups.values() for label in members}
        unknown += sorted(grouped - {k for k, v in dataset.kinds.items() if v == "image"})
        if unknown:
            raise ValidationError(
                f"dataset {dataset.name!r} is inconsistent: {unknown} lack a kind, or are "
                "grouped but not image labels; import it again"
            )


def _count(dataset: StoredDataset) -> dict[str, PlanRow]:
    """Return a row per label with its counts and fractions, tier and why still empty."""
    images: Counter[str] = Counter()
    objects: Counter[str] = Counter()
    for sample in dataset.samples:
        images.update(sample.labels | {box.label for box in sample.boxes})
        objects.update(box.label for box in sample.boxes)
    n_images = len(dataset.samples)
    n_objects = sum(objects[c] for c in dataset.classes if dataset.kinds[c] == "object")
    rows = {}
    for label in dataset.classes:
        kind = dataset.kinds[label]
        object_fraction = None
        if kind == "object":
            object_fraction = objects[label] / n_objects if n_objects else 0.0
        rows[label] = PlanRow(
            dataset=dataset.name,
            label=label,
            kind=kind,
            images=images[label],
            objects=objects[label],
            image_fraction=images[label] / n_images,
            object_fraction=object_fraction,
            tier=None,
            why="",
        )
    return rows


def _plan_dataset(
    dataset: StoredDataset, counts: dict[str, PlanRow], cutoff: float, gate_owner: bool
) -> tuple[list[_Branch], dict[str, _Decision]]:
    """Return the branch tiers of one dataset and where each of its labels goes."""
    decisions = _plan_quality(dataset, gate_owner)
    branches, pooled = _plan_groups(dataset, counts, cutoff, decisions)
    grouped = {label for members in dataset.groups.values() for label in members}
    pooled += [
        (label, "")
        for label, row in counts.items()
        if row.kind == "image" and label not in grouped and label not in decisions
    ]
    branches += _plan_pool(counts, cutoff, pooled, decisions)
    branches += _plan_objects(counts, cutoff, decisions)
    return branches, decisions


def _plan_quality(dataset: StoredDataset, gate_owner: bool) -> dict[str, _Decision]:
    """Send ``clear``, and the other labels of a group holding it, to the gate."""
    if dataset.kinds.get(QUALITY_LABEL) != "image":
        return {}
    if gate_owner:
        why = "quality label: the gate trains on it"
    else:
        why = "quality label: the gate decides it, but is not trained on this dataset"
    decisions: dict[str, _Decision] = {QUALITY_LABEL: (GATE_TIER, why)}
    for group, members in dataset.groups.items():
        if QUALITY_LABEL in members:
            for label in members:
                decisions.setdefault(label, (GATE_TIER, f"{why} (the not-clear side of {group!r})"))
    return decisions


def _plan_groups(
    dataset: StoredDataset,
    counts: dict[str, PlanRow],
    cutoff: float,
    decisions: dict[str, _Decision],
) -> tuple[list[_Branch], list[tuple[str, str]]]:
    """Plan a classifier per group with a frequent label; return them and the pooled labels.

    Labels already decided (quality labels) are left out. The labels of a group without a
    frequent label are pooled, each with a note on its group for the ``labels`` tier's why.
    """
    branches = []
    pooled: list[tuple[str, str]] = []
    for group, members in dataset.groups.items():
        labels = [label for label in members if label not in decisions]
        frequent = [label for label in labels if counts[label].image_fraction > cutoff]
        if not frequent:
            pooled += [(label, f" (as is all of group {group!r})") for label in labels]
            continue
        _check_tier_name(dataset, group)
        branches.append(
            _Branch(group, "multilabel_cnn", labels, batch_size=8, groups={group: labels})
        )
        for label in labels:
            share = _share(counts[label].image_fraction, cutoff, "images")
            if label in frequent:
                why = f"{share}: frequent; its group {group!r} (exclusive labels) is classified"
            else:
                why = f"{share}: rare, classified with its group {group!r}"
                why += f" ({frequent[0]!r} is frequent)"
            decisions[label] = (group, why)
    return branches, pooled


def _plan_pool(
    counts: dict[str, PlanRow],
    cutoff: float,
    pooled: list[tuple[str, str]],
    decisions: dict[str, _Decision],
) -> list[_Branch]:
    """Plan the ``labels`` classifier: ungrouped labels and the labels of all-rare groups."""
    labels = []
    for label, note in pooled:
        row = counts[label]
        share = _share(row.image_fraction, cutoff, "images")
        if row.images == 0:
            decisions[label] = (None, "in no image: nothing to learn")
        elif row.image_fraction == 1.0:
            decisions[label] = (None, "in every image: no image-level decision to make")
        elif row.image_fraction > cutoff:
            decisions[label] = (LABELS_TIER, f"{share}: frequent image label{note}: classified")
        else:
            why = f"{share}: rare image label{note} without boxes: classified, nothing to detect"
            decisions[label] = (LABELS_TIER, why)
        if decisions[label][0] is not None:
            labels.append(label)
    return [_Branch(LABELS_TIER, "multilabel_cnn", labels, batch_size=8)] if labels else []


def _plan_objects(
    counts: dict[str, PlanRow], cutoff: float, decisions: dict[str, _Decision]
) -> list[_Branch]:
    """Plan the ``objects`` presence classifier and the ``rare`` detector."""
    present: list[str] = []
    rare: list[str] = []
    boxed = [row for row in counts.values() if row.kind == "object" and row.objects]
    for row in counts.values():
        if row.kind == "object" and not row.objects:
            decisions[row.label] = (None, "no boxes: nothing to detect or classify")
    for row in boxed:
        fraction = row.object_fraction or 0.0
        share = _share(fraction, cutoff, "objects")
        if fraction <= cutoff:
            rare.append(row.label)
            decisions[row.label] = (
                DETECTOR_TIER,
                f"{share}: rare object class: a detector finds its boxes",
            )
        elif row.image_fraction == 1.0:
            why = f"{share}: frequent, but in every image: no image-level decision to make"
            decisions[row.label] = (None, why)
        else:
            present.append(row.label)
            why = f"{share}: frequent object class: its presence in an image is classified"
            decisions[row.label] = (OBJECTS_TIER, why)
    if not rare:
        for row in boxed:
            tier, why = decisions[row.label]
            decisions[row.label] = (tier, f"{why}; no object class is rare: no detector tier")
    branches = []
    if present:
        branches.append(_Branch(OBJECTS_TIER, "multilabel_cnn", present, batch_size=8))
    if rare:
        branches.append(_Branch(DETECTOR_TIER, "torchvision_detector", rare, batch_size=4))
    return branches


def _share(fraction: float, cutoff: float, of: str) -> str:
    """Return e.g. ``"3.1% of objects <= 15%"``: a frequency against the cut-off."""
    sign = ">" if fraction > cutoff else "<="
    return f"{fraction:.1%} of {of} {sign} {cutoff:.0%}"


def _check_tier_name(dataset: StoredDataset, group: str) -> None:
    """Refuse a group name that cannot name a tier (its topic and consumer group)."""
    reserved = (GATE_TIER, LABELS_TIER, OBJECTS_TIER, DETECTOR_TIER)
    if group in reserved or not _TIER_NAME.fullmatch(group):
        raise ValidationError(
            f"group {group!r} of dataset {dataset.name!r} cannot name a tier: a group name "
            f"must use only letters, digits, '.', '_' and '-' and differ from {reserved}; "
            "rename the group and import the dataset again"
        )


def _tier_name(dataset: StoredDataset, name: str, *, several: bool) -> str:
    return f"{dataset.name}-{name}" if several else name


def _nothing_to_decide(
    dataset: StoredDataset, counts: dict[str, PlanRow], decisions: dict[str, _Decision]
) -> ValidationError:
    labels = "; ".join(
        f"{label} ({row.kind}, {decisions[label][1]})" for label, row in counts.items()
    )
    return ValidationError(
        f"nothing in dataset {dataset.name!r} needs deciding besides the quality gate; "
        f"its labels: {labels or 'none'}. Import labels or boxes that differ between images"
    )


def _gate_row(first: StoredDataset, rows: list[PlanRow], quality: str, n_datasets: int) -> PlanRow:
    """Return the gate's row: the first dataset's ``clear`` label, saying what trains it."""
    own = [row for row in rows if _is_gate_label(row, first.name)]
    if quality == "generic":
        why = f"the bundled generic gate (artifact {GENERIC_GATE_ARTIFACT!r}), not trained here"
    elif own:
        why = f"trained on {first.name!r}'s own {QUALITY_LABEL!r} labels"
    else:
        why = (
            f"{first.name!r} has no {QUALITY_LABEL!r} label: "
            "trained on synthetic degradations of its images"
        )
    if n_datasets > 1:
        trained = f", trained on the first ({first.name!r})" if quality == "own" else ""
        why += f"; one gate for all {n_datasets} datasets{trained}"
    # Without a clear label, the row stands for the gate and counts no image.
    stand_in = PlanRow(first.name, QUALITY_LABEL, "image", 0, 0, 0.0, None, GATE_TIER, "")
    return replace(own[0] if own else stand_in, why=f"quality gate, always: {why}")


def _is_gate_label(row: PlanRow, first: str) -> bool:
    """Whether ``row`` is the first dataset's ``clear`` image label, the gate's row."""
    return (row.dataset, row.label, row.kind) == (first, QUALITY_LABEL, "image")


def _gate_spec(dataset: str | None, threads: int) -> TierSpec:
    """Return the gate; ``dataset`` None is the bundled generic gate."""
    return TierSpec(
        name=GATE_TIER,
        role="gate",
        backend="quality_probe",
        artifact=GENERIC_GATE_ARTIFACT if dataset is None else f"{dataset}-{GATE_TIER}",
        input=SUBMITTED_TOPIC,
        group=f"phenocascade-{GATE_TIER}",
        result_topic=f"tier.{GATE_TIER}",
        routes={"pass": USABLE_TOPIC, "skip": SKIPPED_TOPIC},
        batch_size=8,
        threads=threads,
        labels=[QUALITY_LABEL],
        dataset=dataset,
    )


def _branch_spec(name: str, dataset: str, branch: _Branch, threads: int) -> TierSpec:
    """Return a branch tier called ``name`` that reads the usable images."""
    return TierSpec(
        name=name,
        role="branch",
        backend=branch.backend,
        artifact=f"{dataset}-{branch.name}",
        input=USABLE_TOPIC,
        group=f"phenocascade-{name}",
        result_topic=f"tier.{name}",
        batch_size=branch.batch_size,
        threads=threads,
        labels=branch.labels,
        groups=branch.groups,
        dataset=dataset,
    )


def _topology(tiers: list[TierSpec]) -> Topology:
    """Return the un-namespaced topology of ``tiers`` with every topic declared."""
    topics = [
        TopicSpec(name=SUBMITTED_TOPIC, partitions=4),
        TopicSpec(name=USABLE_TOPIC, partitions=4),
        TopicSpec(name=SKIPPED_TOPIC, partitions=4),
        *(TopicSpec(name=tier.result_topic, partitions=4) for tier in tiers),
        TopicSpec(name="annotate", partitions=4),
        TopicSpec(name="annotations", partitions=4, retention_ms=-1),
        TopicSpec(name="results", partitions=4),
        TopicSpec(name="deadletter", partitions=1, retention_ms=_THIRTY_DAYS_MS),
        TopicSpec(name="models", partitions=1, cleanup_policy="compact"),
    ]
    return Topology(
        submitted_topic=SUBMITTED_TOPIC,
        annotate_topic="annotate",
        dead_letter_topic="deadletter",
        annotations_topic="annotations",
        models_topic="models",
        topics=topics,
        tiers=tiers,
    )
