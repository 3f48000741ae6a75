"""Per-study drift: a study whose images the shift detector flags far above its rate."""

from typing import Any

from phenocascade.consumers.drift import DRIFT_LEVEL, study_drift


def _result(image: str, study: str, novel: bool, tier: str = "majority") -> dict[str, Any]:
    return {
        "image_id": image,
        "tier": tier,
        "study": study,
        "route": "ANNOTATE" if novel else "PASS",
        "reason": "novel" if novel else None,
    }


def test_a_new_scanner_is_flagged_on_its_first_images_and_the_usual_study_is_not() -> None:
    usual = [_result(f"u{i}", "usual", novel=i == 0) for i in range(100)]  # 1 % novel
    scanner = [_result(f"s{i}", "new-scanner", novel=i < 3) for i in range(10)]
    drifts = study_drift([*usual, *scanner], {"majority": 0.02})
    flagged = [d for d in drifts if d.flagged]
    assert [(d.study, d.tier, d.images, d.novel) for d in flagged] == [
        ("new-scanner", "majority", 10, 3)
    ]
    # P(X >= 3) for X ~ Binomial(10, 0.02)
    assert abs(flagged[0].p_value - 0.000864) < 1e-5
    assert flagged[0].as_dict()["expected_novel"] == 0.2
    assert flagged[0].routes == {"ANNOTATE": 3, "PASS": 7}
    usual_drift = next(d for d in drifts if d.study == "usual")
    assert usual_drift.p_value > DRIFT_LEVEL and usual_drift.novel == 1


def test_duplicates_count_once_and_untested_tiers_are_left_out() -> None:
    results = [
        *[_result("a", "s", novel=True)] * 5,  # one image, redelivered
        _result("b", "s", novel=False),
        _result("a", "s", novel=True, tier="quality"),  # no alpha: not tested
    ]
    (drift,) = study_drift(results, {"majority": 0.02})
    assert (drift.tier, drift.images, drift.novel) == ("majority", 2, 1)
    assert not drift.flagged
