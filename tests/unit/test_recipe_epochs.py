"""A detector recipe trains a small set as many steps as a larger one (Recipe.min_images_seen)."""

from __future__ import annotations

from phenocascade.domain import StageKind
from phenocascade.recipes.bundled import recipe
from phenocascade.recipes.core import Recipe
from phenocascade.recipes.own import own_recipe


def test_epochs_grow_on_a_small_set_and_never_shrink() -> None:
    plan = Recipe("x", {}, max_epochs=6, patience=3, min_images_seen=1200)
    assert plan.epochs_for(40) == (30, 15)
    assert plan.epochs_for(100) == (12, 6)
    # A large set keeps the recipe's own epochs.
    assert plan.epochs_for(400) == (6, 3)
    assert plan.epochs_for(0) == (6, 3)
    assert Recipe("x", {}, max_epochs=6, patience=3).epochs_for(40) == (6, 3)


def test_a_callers_epoch_budget_is_kept_as_given() -> None:
    plan = Recipe("x", {}, max_epochs=6, patience=3, min_images_seen=1200)
    assert plan.epochs_for(40, 2) == (2, 3)
    assert plan.epochs_for(40, None) == (30, 15)


def test_the_few_shot_detector_recipes_budget_by_images_seen() -> None:
    for plan in (
        recipe("minority", "bootstrap", dataset="bccd"),
        own_recipe(StageKind.DETECTOR, "torchvision_detector", "bootstrap"),
    ):
        epochs, _ = plan.epochs_for(40)
        assert epochs * 40 >= 1200, plan
