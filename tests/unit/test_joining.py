import itertools
from typing import Any

import pytest

from phenocascade.config import load_topology
from phenocascade.consumers.joining import empty_state, merge

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


def run(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    state, outputs = empty_state(), []
    for r in results:
        state, out = merge(TOPOLOGY, state, r)
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


def test_reentry_after_expert_marks_clear_gives_a_second_analyzed_output() -> None:
    outs = run(
        [result("quality", "ANNOTATE"), result("majority", "PASS"), result("minority", "PASS")]
    )
    assert [o["status"] for o in outs] == ["awaiting_annotation", "analyzed"]


def test_new_model_versions_give_a_new_output() -> None:
    first = [result("quality", "PASS"), result("majority", "PASS"), result("minority", "PASS")]
    outs = run([*first, result("majority", "PASS", version="v2")])
    assert [o["model_versions"]["majority"] for o in outs] == ["v1", "v2"]


def test_branch_results_without_gate_wait() -> None:
    assert run([result("majority", "PASS"), result("minority", "PASS")]) == []
