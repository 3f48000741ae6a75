"""Instance segmentation targets, instances from probabilities, and the outlier rule on areas.

Every expected value here is worked out by hand on arrays small enough to read.
"""

from __future__ import annotations

import numpy as np
import pytest

from phenocascade.domain import Box, Sample
from phenocascade.errors import ConfigError
from phenocascade.models.backends.nucleus_mask_outlier import outlier_scores
from phenocascade.models.segmentation import (
    BACKGROUND,
    BOUNDARY,
    IGNORE,
    INTERIOR,
    box_targets,
    instances,
    mask_targets,
    sample_targets,
)

B, I, E = BOUNDARY, INTERIOR, BACKGROUND  # noqa: E741 (one letter keeps the maps legible)


def test_mask_targets_mark_outlines_and_contacts_as_boundary() -> None:
    labels = np.zeros((5, 7), np.int64)
    labels[0:5, 0:3] = 1  # a 5x3 object touching the image edge
    labels[1:4, 3:6] = 2  # a 3x3 object touching the first one
    expected = np.array(
        [
            # Image edges are not boundaries (nothing differs beyond them).
            [I, I, B, E, E, E, E],
            [I, I, B, B, B, B, E],
            [I, I, B, B, I, B, E],
            [I, I, B, B, B, B, E],
            [I, I, B, E, E, E, E],
        ]
    )
    assert (mask_targets(labels) == expected).all()


def test_box_targets_inscribe_an_ellipse_and_ignore_the_corners() -> None:
    target = box_targets((9, 9), [Box(1, 1, 8, 8, "object")])
    assert target[0].tolist() == [E] * 9 and target[:, 8].tolist() == [E] * 9
    assert target[4, 4] == INTERIOR
    assert target[1, 1] == IGNORE and target[7, 7] == IGNORE  # corners: outline unknown
    assert target[4, 1] == BOUNDARY and target[1, 4] == BOUNDARY  # ellipse's extremes
    assert set(np.unique(target[1:8, 1:8])) == {IGNORE, INTERIOR, BOUNDARY}


def test_sample_targets_refuse_a_mask_of_another_size(tmp_path) -> None:
    from PIL import Image

    path = tmp_path / "m.png"
    Image.fromarray(np.ones((4, 6), np.uint16)).save(path)
    sample = Sample("a", None, mask=path)
    assert sample_targets(sample, (4, 6)).shape == (4, 6)
    with pytest.raises(ConfigError, match="is 6x4 px, its image 5x4 px"):
        sample_targets(sample, (4, 5))
    boxes_only = Sample("b", None, boxes=(Box(0, 0, 3, 3, "object"),))
    assert sample_targets(boxes_only, (4, 5))[1, 1] == INTERIOR


def _probs(classes: np.ndarray) -> np.ndarray:
    """One-hot probabilities (3, H, W) of a class map, softened to 0.9 / 0.05 / 0.05."""
    probs = np.full((3, *classes.shape), 0.05)
    for c in (BACKGROUND, INTERIOR, BOUNDARY):
        probs[c][classes == c] = 0.9
    return probs


def test_touching_objects_split_at_the_boundary_and_grow_back() -> None:
    classes = np.array(
        [
            [E, B, B, B, B, B, B, E],
            [E, B, I, I, B, I, B, E],
            [E, B, I, I, B, I, B, E],
            [E, B, B, B, B, B, B, E],
        ]
    )
    found = sorted(instances(_probs(classes), grow=1, min_area=1), key=lambda o: o.box.x_min)
    assert len(found) == 2
    # Growing by one pixel gives each seed its ring of boundary; the shared column 4 goes
    # to the higher label (the dilation takes the maximum): 4 + 8 and 2 + 10 pixels.
    left, right = found
    assert (left.box.x_min, left.box.y_min, left.box.x_max, left.box.y_max) == (1, 0, 4, 4)
    assert left.area == 12
    assert (right.box.x_min, right.box.x_max) == (4, 7) and right.area == 12
    assert left.box.score == pytest.approx(0.95)  # interior + boundary probability


def test_speckle_below_min_area_is_dropped() -> None:
    classes = np.full((6, 6), E)
    classes[1, 1] = I
    classes[3:6, 3:6] = I
    found = instances(_probs(classes), grow=0, min_area=2)
    assert [o.area for o in found] == [9]


def test_outlier_scores_rise_through_the_rule_line() -> None:
    areas = [10, 10, 10, 10, 10, 16, 30, 60]
    # Median 10, the line at 3 x 10 = 30: returned above 15, one half on the line.
    scored = dict(outlier_scores(areas, ratio=3.0, min_objects=5, sharpness=4.0))
    assert set(scored) == {5, 6, 7}
    assert scored[6] == pytest.approx(0.5)
    assert scored[7] == pytest.approx(1 / (1 + 0.5**4))
    assert scored[5] == pytest.approx(1 / (1 + (30 / 16) ** 4))
    assert outlier_scores(areas[:4], ratio=3.0, min_objects=5, sharpness=4.0) == []
