import itertools
from typing import Any

import pytest

from phenocascade.config import load_topology
from phenocascade.consumers.joining import merge, merge_annotation
from phenocascade.store.join_state import empty_state

TOPOLOGY = load_topology()


def result(tier: str, route: str, version: str = "v1", **kw: Any) -> dict[str, Any]:
    kind = {"quality": "gate", "majority": "classifier", "minority": "detector"}[tier]
    return {
        "image_id": "img",
        "tier": tier,
        "kind": kind,
        "route": route,
        "scores": kw.get("scores", {"x": 0.9}),
        "boxes": kw.get("boxes", []),
        "model_version": version,
        "study": "s1",
        "uri": "/a.png",
    }


def answer(
    tier: str, labels: list[str], boxes: list[dict[str, Any]] = (), **kw: Any
) -> dict[str, Any]:  # type: ignore[assignment]
    """An ``Annotation`` event as the UI publishes it."""
    return {
        "annotation_id": kw.get("annotation_id", f"a-{tier}"),
        "image_id": "img",
        "tier": tier,
        "annotator": kw.get("annotator", "alice"),
        "labels": labels,
        "boxes": [{**b, "score": 0.0} for b in boxes],
        "uri": "/a.png",
        "model_version": "v1",
        "created_at": kw.get("created_at", 1_000),
    }


def run(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    state, outputs = empty_state(), []
    for e in events:
        fold = merge_annotation if "annotation_id" in e else merge
        state, out = fold(TOPOLOGY, state, e)
        if out is not None:
            outputs.append(out)
    return outputs


BOX = {
    "x_min": 1.0,
    "y_min": 2.0,
    "x_max": 5.0,
    "y_max": 6.0,
    "label": "large_nucleus",
    "score": 0.97,
}


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_one_analyzed_output_in_any_order(order: tuple[int, ...]) -> None:
    rs = [
        result("quality", "PASS"),
        result("majority", "PASS", scores={"density:dense": 0.95}),
        result("minority", "PASS", boxes=[BOX], scores={"large_nucleus": 0.97}),
    ]
    outputs = run([rs[i] for i in order])
    assert len(outputs) == 1
    out = outputs[0]
    assert out["status"] == "analyzed"
    assert out["labels"] == {"density:dense": 0.95}
    assert out["boxes"] == [BOX]
    assert out["model_versions"] == {"quality": "v1", "majority": "v1", "minority": "v1"}
    assert out["routes"] == {"quality": "PASS", "majority": "PASS", "minority": "PASS"}


def test_duplicates_do_not_emit_twice() -> None:
    rs = [result("quality", "PASS"), result("majority", "PASS"), result("minority", "PASS")]
    assert len(run(rs + rs + rs[::-1])) == 1


def test_skip_is_unusable_and_annotate_is_awaiting() -> None:
    assert [o["status"] for o in run([result("quality", "SKIP")])] == ["unusable"]
    assert [o["status"] for o in run([result("quality", "ANNOTATE")])] == ["awaiting_annotation"]


def test_branch_annotate_makes_output_await_annotation() -> None:
    outs = run(
        [result("quality", "PASS"), result("majority", "ANNOTATE"), result("minority", "PASS")]
    )
    assert [o["status"] for o in outs] == ["awaiting_annotation"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_reentry_after_expert_marks_clear_gives_a_second_analyzed_output(
    order: tuple[int, ...],
) -> None:
    # The expert's answer and the re-entered image's branch results race each other.
    later = [answer("quality", ["clear"]), result("majority", "PASS"), result("minority", "PASS")]
    outs = run([result("quality", "ANNOTATE", scores={"clear": 0.6}), *(later[i] for i in order)])
    assert [o["status"] for o in outs] == ["awaiting_annotation", "analyzed"]
    assert outs[0]["pending"] == ["clear"] and outs[0]["annotators"] == {}
    final = outs[1]
    assert final["pending"] == []
    assert final["annotators"] == {"quality": "alice"}
    assert final["expert_labels"] == ["clear"]
    assert final["routes"]["quality"] == "ANNOTATE"


def test_expert_marking_an_image_unclear_makes_it_unusable() -> None:
    outs = run([result("quality", "ANNOTATE", scores={"clear": 0.4}), answer("quality", [])])
    assert [o["status"] for o in outs] == ["awaiting_annotation", "unusable"]
    assert outs[1]["annotators"] == {"quality": "alice"} and outs[1]["pending"] == []


def test_expert_answers_only_what_the_classifier_left_open() -> None:
    scores = {"density:dense": 0.55, "density:sparse": 0.4, "size:large": 0.99}
    outs = run(
        [
            result("quality", "PASS"),
            {
                **result("majority", "ANNOTATE", scores=scores),
                "pending": ["density:dense", "density:sparse"],
            },
            result("minority", "PASS"),
            # The expert's labels for the decided label do not override the model.
            answer("majority", ["density:sparse"]),
        ]
    )
    assert [o["status"] for o in outs] == ["awaiting_annotation", "analyzed"]
    assert outs[0]["pending"] == ["density:dense", "density:sparse"]
    assert outs[1]["labels"] == {"density:dense": 0.0, "density:sparse": 1.0, "size:large": 0.99}
    assert outs[1]["expert_labels"] == ["density:dense", "density:sparse"]
    assert outs[1]["annotators"] == {"majority": "alice"}


def test_expert_boxes_replace_the_detectors_boxes_of_the_classes_it_left_open() -> None:
    model_box = {**BOX, "score": 0.3}
    drawn = {**BOX, "x_min": 10.0, "x_max": 20.0}
    outs = run(
        [
            result("quality", "PASS"),
            result("majority", "PASS"),
            result("minority", "ANNOTATE", boxes=[model_box], scores={"large_nucleus": 0.3}),
            answer("minority", [], [drawn]),
        ]
    )
    assert [o["status"] for o in outs] == ["awaiting_annotation", "analyzed"]
    assert outs[0]["boxes"] == [model_box]
    assert outs[1]["boxes"] == [{**drawn, "score": 1.0}]
    assert outs[1]["expert_labels"] == ["large_nucleus"]


def test_an_answer_before_the_result_applies_when_the_result_arrives() -> None:
    outs = run(
        [
            answer("minority", []),
            result("quality", "PASS"),
            result("majority", "PASS"),
            result("minority", "ANNOTATE", boxes=[BOX], scores={"large_nucleus": 0.4}),
        ]
    )
    assert [o["status"] for o in outs] == ["analyzed"]
    assert outs[0]["boxes"] == [] and outs[0]["annotators"] == {"minority": "alice"}


def test_repeated_and_older_answers_emit_nothing_new() -> None:
    base = [result("quality", "ANNOTATE"), answer("quality", [], created_at=2_000)]
    assert len(run([*base, answer("quality", [], created_at=2_000)])) == 2
    older = answer("quality", ["clear"], annotation_id="old", created_at=1_000)
    assert len(run([*base, older])) == 2
    newer = answer("quality", ["clear"], annotation_id="new", annotator="bob", created_at=3_000)
    outs = run([*base, newer, result("majority", "PASS"), result("minority", "PASS")])
    assert [o["status"] for o in outs] == ["awaiting_annotation", "unusable", "analyzed"]
    assert outs[-1]["annotators"] == {"quality": "bob"}


def test_an_answer_to_a_tier_the_model_decided_changes_nothing() -> None:
    rs = [result("quality", "PASS"), result("majority", "PASS"), result("minority", "PASS")]
    assert len(run([*rs, answer("majority", ["x"])])) == 1


def test_new_model_versions_give_a_new_output() -> None:
    first = [result("quality", "PASS"), result("majority", "PASS"), result("minority", "PASS")]
    outs = run([*first, result("majority", "PASS", version="v2")])
    assert [o["model_versions"]["majority"] for o in outs] == ["v1", "v2"]


def test_branch_results_without_gate_wait() -> None:
    assert run([result("majority", "PASS"), result("minority", "PASS")]) == []
