"""What ``phenocascade train`` tells a lab about the routing its new model certified."""

from __future__ import annotations

from typing import Any

from phenocascade.cli.train import routing_summary


def _record(positive: float, negative: float, n_pos: int, n_neg: int, n: int) -> dict[str, Any]:
    """A ``ThresholdRecord.as_dict()`` as an artifact's ``thresholds`` stores it."""
    return {
        "positive": positive,
        "negative": negative,
        "target_precision": 0.95,
        "delta": 0.1,
        "achieved_precision_pos": 1.0,
        "achieved_precision_neg": 1.0,
        "n_pos": float(n_pos),
        "n_neg": float(n_neg),
        "coverage": (n_pos + n_neg) / n if n else 0.0,
        "n": float(n),
    }


def _calibration(
    labels: dict[str, tuple[int, int]], pooled: dict[str, Any] | None = None, starts: int = 1
) -> dict[str, Any]:
    """An artifact's ``metrics["calibration"]``; ``labels`` maps a label to (n, positives)."""
    return {
        "threshold_mode": "per_label" if pooled is None else "pooled",
        "starts": starts,
        "target_precision": 0.95,
        "delta": 0.1,
        "pooled": pooled,
        "groups": None,
        "labels": {
            label: {"n": n, "positives": positives, "calibrator": "platt"}
            for label, (n, positives) in labels.items()
        },
    }


HEADER = "routing certified at precision 0.95, guaranteed with probability 0.9:"


def test_a_certified_gate_shows_both_thresholds_and_what_they_decided() -> None:
    thresholds = {"clear": _record(0.7967758725754166, 0.2736913249892222, 213, 438, 660)}
    lines = routing_summary("gate", thresholds, _calibration({"clear": (660, 220)}))
    assert lines == [
        HEADER,
        "  clear: yes at p >= 0.797 (213 of 660 images); no at p <= 0.274 (438 of 660 images)",
    ]


def test_a_gate_on_too_few_images_says_how_many_more_a_certificate_needs() -> None:
    # 45 error-free decisions certify 0.95 at delta 0.1; the commoner kind has 12 of 18.
    thresholds = {"clear": _record(1.0, 0.0, 0, 0, 18)}
    lines = routing_summary("gate", thresholds, _calibration({"clear": (18, 6)}))
    assert lines[1] == (
        "  clear: nothing certified, every image goes to a person; a certificate needs at "
        "least 45 right decisions of one kind, and calibration had 6 positive and 12 "
        "negative images: at least 33 more images are needed"
    )
    # Two start points test each at delta / 2: 59 error-free decisions.
    lines = routing_summary("gate", thresholds, _calibration({"clear": (18, 6)}, starts=2))
    assert "needs at least 59 right decisions" in lines[1] and "at least 47 more" in lines[1]


def test_enough_images_that_certified_nothing_blame_the_scores_not_the_count() -> None:
    thresholds = {"clear": _record(1.0, 0.0, 0, 0, 80)}
    (_, line) = routing_summary("gate", thresholds, _calibration({"clear": (80, 30)}))
    blame = "50 negative images: enough, but the scores did not separate them cleanly enough"
    assert line.endswith(blame)


def test_a_detector_speaks_of_boxes_and_of_absence_on_images() -> None:
    granule = _record(0.91, 0.05, 40, 120, 300) | {"absent": 0.03, "absent_images": 52.0}
    empty = _record(1.0, 0.0, 0, 0, 14) | {"absent": 0.0, "absent_images": 0.0}
    thresholds = {"granule": granule, "vesicle": empty}
    calibration = _calibration({"granule": (300, 90), "vesicle": (14, 2)})
    assert routing_summary("detector", thresholds, calibration)[1:] == [
        "  granule: confident box at p >= 0.910 (40 of 300 boxes); box dropped at p <= 0.050 "
        "(120 of 300 boxes); absent at best box <= 0.030 (52 images)",
        "  vesicle: nothing certified, every image goes to a person; a certificate needs at "
        "least 45 right decisions of one kind, and calibration had 2 positive and 12 negative "
        "boxes: at least 33 more boxes are needed",
    ]


def test_pooled_labels_report_the_shared_certificate_once() -> None:
    labels = {"density:dense": (12, 4), "density:sparse": (12, 3)}
    thresholds = {label: _record(1.0, 0.0, 0, 0, 12) for label in labels}
    pooled = _record(1.0, 0.0, 0, 0, 24)
    assert routing_summary("classifier", thresholds, _calibration(labels, pooled)) == [
        HEADER,
        "  one pair shared by all labels, on 24 label decisions",
        "  nothing certified, every image goes to a person; a certificate needs at least 45 "
        "right decisions of one kind, and calibration had 7 positive and 17 negative label "
        "decisions: at least 28 more label decisions (14 images) are needed",
        "  density:dense: nothing decided automatically",
        "  density:sparse: nothing decided automatically",
    ]
    # Certified as a pool, a label the shared pair decides nothing for says so alone.
    thresholds["density:dense"] = _record(0.96, 0.25, 3, 8, 12)
    pooled = _record(0.96, 0.25, 4, 45, 24)
    lines = routing_summary("classifier", thresholds, _calibration(labels, pooled))
    assert lines[2:] == [
        "  density:dense: yes at p >= 0.960 (3 of 12 images); no at p <= 0.250 (8 of 12 images)",
        "  density:sparse: nothing decided automatically",
    ]


def test_a_gate_on_too_few_usable_images_says_it_skips_nothing_on_its_own() -> None:
    # 85 clear and 170 degraded out-of-fold images of a lab's 105 fields: k = floor(86 *
    # 0.01) = 0 usable images may fall below the skip cap, so the gate never skips.
    thresholds = {"clear": _record(0.97, 0.0, 70, 0, 255)}
    lines = routing_summary(
        "gate", thresholds, _calibration({"clear": (255, 85)}) | {"discard_rate": 0.01}
    )
    assert lines[1:] == [
        "  clear: yes at p >= 0.970 (70 of 255 images)",
        "  clear: skips nothing on its own: keeping the usable images it discards to 1% "
        "takes at least 99 usable calibration images, and it had 85",
    ]
    enough = _calibration({"clear": (660, 220)}) | {"discard_rate": 0.01}
    assert len(routing_summary("gate", thresholds, enough)) == 2
