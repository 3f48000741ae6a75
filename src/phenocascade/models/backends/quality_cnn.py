"""The quality gate: is a field in focus and usable ("clear") or not."""

from __future__ import annotations

from typing import Literal

from phenocascade.domain import StageKind
from phenocascade.models.backends._classifier import ImageClassifier
from phenocascade.models.base import register_backend


@register_backend("quality_cnn")
class QualityCNN(ImageClassifier):
    """Binary focus/usability classifier on native-resolution crops; kind ``GATE``.

    Its single label is ``gate_label`` (``"clear"``): a sample whose ``labels`` contain it
    is usable, one with empty labels is not. Crops at native resolution keep the fine
    texture that defocus and noise destroy; the image score is the mean logit over a grid
    of crops. Parameters are those of :class:`~._classifier.ImageClassifier`.
    """

    kind = StageKind.GATE
    model_name = "quality_cnn"
    gate_label = "clear"

    def __init__(
        self,
        *,
        backbone: str = "small_cnn",
        input_size: int = 96,
        view: Literal["resize", "crops"] = "crops",
        crops_per_image: int = 4,
        grid_per_side: int = 3,
        pretrained: str | None = None,
        batch_size: int = 32,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        balance: bool = True,
    ) -> None:
        super().__init__(
            backbone=backbone,
            input_size=input_size,
            view=view,
            crops_per_image=crops_per_image,
            grid_per_side=grid_per_side,
            pretrained=pretrained,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            balance=balance,
        )
