"""Early stopping waits until the validation figure has moved at least once."""

from __future__ import annotations

import torch

from phenocascade.models.training import fit_loop


def _run(val_figures: list[float], patience: int) -> int:
    model = torch.nn.Linear(1, 1)
    figures = iter(val_figures)
    result = fit_loop(
        model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        epoch_batches=lambda epoch: [torch.zeros(1, 1)],
        train_step=lambda batch: model(batch).sum() * 0.0,
        val_loss=lambda: next(figures),
        max_epochs=len(val_figures),
        patience=patience,
    )
    return len(result.val_loss)


def test_a_figure_that_never_moved_is_no_plateau() -> None:
    # 1 - AP50 at 1.0 for five epochs, then the detector finds its first objects.
    assert _run([1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.7], patience=2) == 7


def test_patience_counts_once_the_figure_has_improved() -> None:
    assert _run([1.0, 0.5, 0.6, 0.7, 0.4, 0.3], patience=2) == 4
