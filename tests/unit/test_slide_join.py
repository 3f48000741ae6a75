"""The slide rule: one output per slide, from its tiles' outputs, duplicates merged."""

from __future__ import annotations

from typing import Any

from phenocascade.config import load_topology
from phenocascade.consumers.joining import merge
from phenocascade.consumers.tiles import merge_boxes, slide_emission, tile_of, tile_part
from phenocascade.store.join_state import empty_state
from phenocascade.streams import events
from phenocascade.streams.tiling import Tiling, routing_key, tile_submissions

TOPOLOGY = load_topology()
# A 1920 x 1000 slide at level 0 in tiles of 1024 with 128 of overlap: 2 x 1 tiles, the
# second starting at x = 896 (they overlap from 896 to 1024).
TILES = [
    t["tile"]
    for t in tile_submissions(
        events.image_submitted("slide", uri="/scans/slide.tif"),
        levels=[(1_920, 1_000, 1.0)],
        tiling=Tiling(size=1024, overlap=128),
    )
]


def box(x_min: float, y_min: float, x_max: float, y_max: float, **kw: Any) -> dict[str, Any]:
    return {"x_min": x_min, "y_min": y_min, "x_max": x_max, "y_max": y_max,
            "label": kw.get("label", "giant"), "score": kw.get("score", 0.9)}  # fmt: skip


def tile_output(index: int, status: str = "analyzed", **kw: Any) -> dict[str, Any]:
    return events.image_output(
        f"slide#tile-{index}",
        status=events.OutputStatus(status),
        study="s",
        uri="/scans/slide.tif",
        labels=kw.get("labels", {"bright": 0.2}),
        boxes=kw.get("boxes", []),
        routes=kw.get("routes", {"quality": "PASS", "majority": "PASS", "minority": "PASS"}),
        model_versions=kw.get("versions", {"quality": "v1", "majority": "v1", "minority": "v1"}),
        pending=kw.get("pending", []),
    )


def fold_tile(
    state: dict[str, Any], index: int, key: str, output: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What the joiner does with a tile's output: store it, then emit the slide's if due."""
    name, value = tile_part(TILES[index], key, output)
    state = {**state, "tile_outputs": {**state["tile_outputs"], name: value}}
    emission = slide_emission(state, TILES[index])
    if emission is None:
        return state, None
    return {**state, "emitted": [*state["emitted"], emission[0]]}, emission[1]


def fold_all(outputs: list[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    state, emitted = empty_state(), []
    for out in outputs:
        index = int(out["image_id"].rsplit("-", 1)[1])
        state, slide = fold_tile(state, index, f"k{index}", out)
        if slide is not None:
            emitted.append(slide)
    return state, emitted


def test_the_slide_has_one_output_once_every_tile_has_one() -> None:
    assert [t["x"] for t in TILES] == [0, 896] and TILES[0]["count"] == 2
    state, emitted = fold_all([tile_output(1)])
    assert emitted == []
    state, slide = fold_tile(state, 0, "k0", tile_output(0))
    assert slide is not None and slide["image_id"] == "slide" and slide["status"] == "analyzed"
    # A tile result delivered again writes the same value and emits nothing.
    again, none = fold_tile(state, 0, "k0", tile_output(0))
    assert none is None and again == state
    # A tile's newer output (an expert answered it) emits the slide again.
    _, newer = fold_tile(state, 0, "k0-expert", tile_output(0, labels={"bright": 1.0}))
    assert newer is not None and newer["labels"] == {"bright": 1.0}


V2 = {"quality": "v1", "majority": "v1", "minority": "v2"}


def test_a_slide_rescored_after_a_promotion_gets_one_output_at_its_last_tile() -> None:
    state, first = fold_all([tile_output(0), tile_output(1)])
    assert [o["model_versions"]["minority"] for o in first] == ["v1"]
    # Replayed: the first re-scored tile leaves the slide half old, half new: no output.
    state, half = fold_tile(state, 1, "k1-v2", tile_output(1, versions=V2, labels={}))
    assert half is None
    state, whole = fold_tile(state, 0, "k0-v2", tile_output(0, versions=V2, labels={}))
    assert whole is not None and whole["model_versions"] == V2 and whole["labels"] == {}
    # Replayed again with the same models: the tiles' outputs are unchanged, nothing new.
    assert fold_tile(state, 0, "k0-v2", tile_output(0, versions=V2, labels={}))[1] is None


def test_a_slide_first_scored_across_a_promotion_has_an_output_and_expert_updates() -> None:
    state, first = fold_all([tile_output(0), tile_output(1, versions=V2)])
    assert [o["model_versions"]["minority"] for o in first] == ["v1+v2"]
    # An expert answers tile 0: same versions, the slide's output is emitted again.
    _, answered = fold_tile(state, 0, "k0-expert", tile_output(0, labels={"bright": 1.0}))
    assert answered is not None and answered["model_versions"]["minority"] == "v1+v2"
    assert answered["labels"] == {"bright": 1.0}


def test_an_object_on_a_tile_border_is_one_box_in_slide_pixels() -> None:
    # Tile 0 sees the object cut at its right edge, tile 1 sees it whole (the overlap).
    cut = box(990, 100, 1024, 140, score=0.7)
    whole = box(990 - 896, 100, 1030 - 896, 140, score=0.8)
    elsewhere = box(100, 100, 140, 140)
    _, [slide] = fold_all([tile_output(0, boxes=[cut, elsewhere]), tile_output(1, boxes=[whole])])
    assert sorted((b["x_min"], b["x_max"], b["score"]) for b in slide["boxes"]) == [
        (100.0, 140.0, 0.9),
        (990.0, 1030.0, 0.8),
    ]


def test_boxes_of_one_tile_or_of_other_classes_are_never_merged() -> None:
    a, b = box(0, 0, 10, 10), box(1, 1, 11, 11, score=0.8)
    assert len(merge_boxes([(0, a), (0, b)])) == 2
    assert len(merge_boxes([(0, a), (1, {**b, "label": "other"})])) == 2
    [merged] = merge_boxes([(0, a), (1, b)])
    assert merged == box(0, 0, 11, 11)  # grown to cover both, the higher score kept


def test_slide_status_labels_and_routes_follow_the_tiles() -> None:
    skipped = tile_output(0, "unusable", labels={}, routes={"quality": "SKIP"},
                          versions={"quality": "v1"})  # fmt: skip
    _, [slide] = fold_all([skipped, tile_output(1, labels={"bright": 0.9})])
    assert slide["status"] == "analyzed" and slide["labels"] == {"bright": 0.9}
    assert slide["routes"] == {"quality": "PASS", "majority": "PASS", "minority": "PASS"}
    _, [all_skipped] = fold_all([skipped, {**skipped, "image_id": "slide#tile-1"}])
    assert all_skipped["status"] == "unusable" and all_skipped["labels"] == {}
    asked = tile_output(1, "awaiting_annotation", pending=["giant"],
                        routes={"quality": "PASS", "minority": "ANNOTATE"},
                        versions={"quality": "v2", "minority": "v1"})  # fmt: skip
    _, [waiting] = fold_all([tile_output(0), asked])
    assert waiting["status"] == "awaiting_annotation" and waiting["pending"] == ["giant"]
    assert waiting["routes"]["minority"] == "ANNOTATE"
    assert waiting["model_versions"]["quality"] == "v1+v2"  # a promotion mid-slide shows


def test_a_tile_result_keeps_its_tile_in_the_join_state() -> None:
    submitted = tile_submissions(
        events.image_submitted("slide", uri="/scans/slide.tif"),
        levels=[(1_920, 1_000, 1.0)],
        tiling=Tiling(size=1024, overlap=128),
    )[1]
    result = events.tier_result(
        submitted,
        tier="quality",
        kind=events.StageKind.GATE,
        route=events.Route.SKIP,
        output=events.StageOutput(scores={"clear": 0.01}),
        model_name="m",
        model_version="v1",
    )
    assert result["tile"] == submitted["tile"] and routing_key(result) == b"slide"
    state, output = merge(TOPOLOGY, empty_state(), result)
    assert output is not None and output["image_id"] == "slide#tile-1"
    assert tile_of(state) == TILES[1]
    plain, _ = merge(TOPOLOGY, empty_state(), {**result, "tile": None})
    assert tile_of(plain) is None and "tile" not in plain["tiers"]["quality"]
