"""The pure join rule: tier results of one image -> at most one new ``ImageOutput``.

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


def empty_state() -> dict[str, Any]:
    """Return the table value of an image nothing is known about."""
    return {"tiers": {}, "emitted": []}


def merge(
    topology: Topology, state: Mapping[str, Any], result: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fold one ``TierResult`` into an image's join state.

    Parameters
    ----------
    topology : Topology
        Names the gate tiers (in order) and the branch tiers the output waits for.
    state : Mapping
        ``{"tiers": {tier: compact result}, "emitted": [versions keys already output]}``.
    result : Mapping
        A decoded ``TierResult``.

    Returns
    -------
    tuple of (dict, dict or None)
        The new state, and the ``ImageOutput`` to emit now, if any.

    Notes
    -----
    Results may arrive in any order and more than once. An output is emitted when:

    * a gate said ``SKIP`` -> ``unusable``;
    * a gate said ``ANNOTATE`` and the branches have not all answered -> ``awaiting_annotation``
      (if an expert later marks the image clear, it re-enters on the usable topic and a
      second, ``analyzed`` output follows under a different versions key);
    * every gate passed (or the image re-entered) and every branch answered -> ``analyzed``,
      or ``awaiting_annotation`` when a branch routed it to annotation.

    An ``awaiting_annotation`` output is partial: its ``pending`` lists the labels the
    tiers left to experts, and every other label and box in it is final.

    The versions key of the tiers used makes each emission idempotent: a duplicate result
    produces no second output.
    """
    tiers = dict(state.get("tiers", {}))
    emitted = list(state.get("emitted", []))
    tiers[result["tier"]] = {
        "kind": result["kind"],
        "route": result["route"],
        "scores": dict(result["scores"]),
        "boxes": list(result["boxes"]),
        "model_version": result["model_version"],
        "study": result["study"],
        "uri": result["uri"],
        "pending": list(result.get("pending") or []),
    }
    new_state = {"tiers": tiers, "emitted": emitted}
    branches = [t.name for t in topology.branch_tiers]
    all_branches = all(name in tiers for name in branches)
    used: list[str] = []
    status: OutputStatus | None = None
    for gate in topology.gate_tiers:
        seen = tiers.get(gate.name)
        if seen is None:
            return new_state, None
        used.append(gate.name)
        if seen["route"] == "SKIP":
            status = OutputStatus.UNUSABLE
            break
        if seen["route"] == "ANNOTATE" and not all_branches:
            status = OutputStatus.AWAITING_ANNOTATION
            break
    if status is None:
        if not all_branches:
            return new_state, None
        used += branches
        annotate = any(tiers[name]["route"] == "ANNOTATE" for name in branches)
        status = OutputStatus.AWAITING_ANNOTATION if annotate else OutputStatus.ANALYZED
    versions = {name: tiers[name]["model_version"] for name in used}
    key = versions_key(versions)
    if key in emitted:
        return new_state, None
    emitted.append(key)
    labels: dict[str, float] = {}
    boxes: list[dict[str, Any]] = []
    for name in used:
        if tiers[name]["kind"] == "classifier":
            labels.update(tiers[name]["scores"])
        elif tiers[name]["kind"] == "detector":
            boxes += tiers[name]["boxes"]
    pending = [label for name in used for label in _pending(tiers[name])]
    first = tiers[used[0]]
    output = events.image_output(
        result["image_id"],
        status=status,
        study=first["study"],
        uri=first["uri"],
        labels=labels,
        boxes=boxes,
        routes={name: tiers[name]["route"] for name in used},
        model_versions=versions,
        pending=list(dict.fromkeys(pending)),
    )
    return new_state, output


def _pending(tier: Mapping[str, Any]) -> list[str]:
    """Return the labels a tier's result leaves to an expert.

    Those its worker listed; every label of the tier when it routed the image to
    annotation without a list (the state of a result from before per-label routing).
    """
    if tier["route"] != "ANNOTATE":
        return []
    listed = list(tier.get("pending") or [])
    return listed or [*tier["scores"], *(b["label"] for b in tier["boxes"])]
