"""The pure join rule: tier results and expert answers of one image -> at most one new output.

Kept free of faust so it can be tested on its own; :mod:`phenocascade.consumers.joiner`
wraps it in a faust agent with a table.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from phenocascade.config import Topology
from phenocascade.domain import OutputStatus
from phenocascade.store.cassandra import versions_key
from phenocascade.streams import events


def merge(
    topology: Topology, state: Mapping[str, Any], result: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fold one ``TierResult`` into an image's join state.

    Parameters
    ----------
    topology : Topology
        Names the gate tiers (in order) and the branch tiers the output waits for.
    state : Mapping
        ``{"tiers": {tier: compact result}, "experts": {tier: compact annotation},
        "emitted": [emission keys already output]}``.
    result : Mapping
        A decoded ``TierResult``.

    Returns
    -------
    tuple of (dict, dict or None)
        The new state, and the ``ImageOutput`` to emit now, if any.

    Notes
    -----
    Results and annotations may arrive in any order and more than once. An output is
    emitted when:

    * a gate said ``SKIP`` -> ``unusable``;
    * a gate said ``ANNOTATE`` and the branches have not answered -> ``awaiting_annotation``
      (if an expert later marks the image clear, it re-enters on the usable topic, and a
      second output follows when both the expert's answer and the branches' are in);
    * every gate passed (or an expert passed it) and every branch answered -> ``analyzed``,
      or ``awaiting_annotation`` while a branch's question is unanswered;
    * an expert answers a tier's question (:func:`merge_annotation`) -> the output again,
      with that tier's open labels decided by the expert.

    An ``awaiting_annotation`` output is partial: its ``pending`` lists the labels the
    tiers left to experts, and every other label and box in it is final.

    The model versions of the tiers used and the annotations applied make each emission
    idempotent: a duplicate result or annotation produces no second output.
    """
    tiers = dict(state.get("tiers", {}))
    tiers[result["tier"]] = {
        "kind": result["kind"],
        "route": result["route"],
        "scores": dict(result["scores"]),
        "boxes": list(result["boxes"]),
        "model_version": result["model_version"],
        "study": result["study"],
        "uri": result["uri"],
        "pending": list(result.get("pending") or []),
        # A tile's output is folded into its slide's (consumers.tiles), not published.
        **({"tile": result["tile"]} if result.get("tile") else {}),
    }
    return _emit(topology, {**_state(state), "tiers": tiers}, result["image_id"])


def merge_annotation(
    topology: Topology, state: Mapping[str, Any], annotation: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fold one expert ``Annotation`` into an image's join state.

    The expert's answer decides what the tier's model left open: a gate's ``clear`` (any
    label passes the image, none makes it unusable), a classifier's pending labels
    (present when the expert gave them), a detector's pending classes (the expert's boxes
    replace the model's). What the model decided on its own stays. The newest answer of a
    tier wins; an answer for a tier of another topology is kept and ignored.

    Parameters
    ----------
    topology : Topology
        As for :func:`merge`.
    state : Mapping
        As for :func:`merge`.
    annotation : Mapping
        A decoded ``Annotation``.

    Returns
    -------
    tuple of (dict, dict or None)
        The new state, and the ``ImageOutput`` to emit now, if any.
    """
    experts = dict(state.get("experts", {}))
    known = experts.get(annotation["tier"])
    if known is not None and known["created_at"] > events.to_epoch_ms(annotation["created_at"]):
        return _state(state), None
    experts[annotation["tier"]] = {
        "annotation_id": annotation["annotation_id"],
        "annotator": annotation["annotator"],
        "labels": list(annotation["labels"]),
        "boxes": [{**b, "score": 1.0} for b in annotation["boxes"]],
        "created_at": events.to_epoch_ms(annotation["created_at"]),
    }
    return _emit(topology, {**_state(state), "experts": experts}, annotation["image_id"])


def _state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``state`` with every key (tables written before ``experts`` lack it)."""
    return {
        "tiers": dict(state.get("tiers", {})),
        "experts": dict(state.get("experts", {})),
        "emitted": list(state.get("emitted", [])),
    }


def _emit(
    topology: Topology, state: dict[str, Any], image_id: str
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Return ``state`` and the output it completes, if one is due and not yet emitted."""
    tiers, experts = state["tiers"], state["experts"]
    views = {name: _decided(tier, experts.get(name)) for name, tier in tiers.items()}
    branches = [t.name for t in topology.branch_tiers]
    all_branches = all(name in views for name in branches)
    used: list[str] = []
    status: OutputStatus | None = None
    for gate in topology.gate_tiers:
        seen = views.get(gate.name)
        if seen is None:
            return state, None
        used.append(gate.name)
        if seen["route"] == "SKIP":
            status = OutputStatus.UNUSABLE
            break
        if seen["route"] == "ANNOTATE":
            if all_branches:
                # The image re-entered, so an expert passed it: wait for that answer.
                return state, None
            status = OutputStatus.AWAITING_ANNOTATION
            break
    if status is None:
        if not all_branches:
            return state, None
        used += branches
        annotate = any(views[name]["route"] == "ANNOTATE" for name in branches)
        status = OutputStatus.AWAITING_ANNOTATION if annotate else OutputStatus.ANALYZED
    versions = {name: tiers[name]["model_version"] for name in used}
    answered = {
        name: experts[name]
        for name in used
        if name in experts and tiers[name]["route"] == "ANNOTATE"
    }
    key = versions_key(
        versions, {name: answer["annotation_id"] for name, answer in answered.items()}
    )
    if key in state["emitted"]:
        return state, None
    labels: dict[str, float] = {}
    boxes: list[dict[str, Any]] = []
    for name in used:
        if tiers[name]["kind"] == "classifier":
            labels.update(views[name]["scores"])
        elif tiers[name]["kind"] == "detector":
            boxes += views[name]["boxes"]
    pending = [label for name in used for label in _pending(views[name])]
    by_expert = [label for name in answered for label in views[name]["by_expert"]]
    first = tiers[used[0]]
    output = events.image_output(
        image_id,
        status=status,
        study=first["study"],
        uri=first["uri"],
        labels=labels,
        boxes=boxes,
        routes={name: tiers[name]["route"] for name in used},
        model_versions=versions,
        pending=list(dict.fromkeys(pending)),
        annotators={name: answer["annotator"] for name, answer in answered.items()},
        expert_labels=list(dict.fromkeys(by_expert)),
    )
    return {**state, "emitted": [*state["emitted"], key]}, output


def _decided(tier: Mapping[str, Any], expert: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a tier's result with the expert's answer applied to what it left open.

    The view has the result's ``route`` (``PASS``/``SKIP`` from an expert for a gate,
    ``PASS`` once an expert answered a branch), ``scores``, ``boxes``, ``pending`` and
    ``by_expert``: the labels the expert decided.
    """
    view = {**tier, "by_expert": []}
    if expert is None or tier["route"] != "ANNOTATE":
        return view
    asked = _pending(tier)
    if tier["kind"] == "gate":
        return {
            **view,
            "route": "PASS" if expert["labels"] else "SKIP",
            "pending": [],
            "by_expert": asked,
        }
    given = set(expert["labels"]) | {b["label"] for b in expert["boxes"]}
    scores = {**tier["scores"], **{label: float(label in given) for label in asked}}
    boxes = [b for b in tier["boxes"] if b["label"] not in asked]
    boxes += [b for b in expert["boxes"] if b["label"] in asked]
    return {
        **view,
        "route": "PASS",
        "scores": scores,
        "boxes": boxes,
        "pending": [],
        "by_expert": asked,
    }


def _pending(tier: Mapping[str, Any]) -> list[str]:
    """Return the labels a tier's result leaves to an expert.

    Those its worker listed; every label of the tier when it routed the image to
    annotation without a list (the state of a result from before per-label routing).
    """
    if tier["route"] != "ANNOTATE":
        return []
    listed = list(tier.get("pending") or [])
    return listed or [*tier["scores"], *(b["label"] for b in tier["boxes"])]
