"""The majority classifier: image-level phenotype labels, a softmax per exclusive group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from phenocascade.domain import StageKind
from phenocascade.models.backends._classifier import ImageClassifier, View
from phenocascade.models.base import register_backend


@register_backend("multilabel_cnn")
class MultiLabelCNN(ImageClassifier):
    """Multi-label classifier on the resized field of view and/or native crops; kind ``CLASSIFIER``.

    Each label has its own sigmoid output, trained with binary cross-entropy whose
    positives are weighted by ``n_negative / n_positive`` so rare labels still count;
    labels that exclude each other, one of them in every image, share a softmax instead
    (``softmax_groups``).
    ``backbone`` selects ``"resnet18"``, ``"resnet50"``, ``"mobilenet_v2"`` or
    ``"small_cnn"``. Parameters are those of :class:`~._classifier.ImageClassifier`.
    """

    kind = StageKind.CLASSIFIER
    model_name = "multilabel_cnn"

    def __init__(
        self,
        *,
        backbone: str = "resnet18",
        input_size: int = 224,
        view: View = "resize",
        crop_groups: Sequence[str] = (),
        crops_per_image: int = 4,
        grid_per_side: int = 3,
        pretrained: str | None = None,
        batch_size: int = 16,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        balance: bool = True,
        softmax_groups: Sequence[Sequence[str]] | None = None,
        declared_groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        super().__init__(
            backbone=backbone,
            input_size=input_size,
            view=view,
            crop_groups=crop_groups,
            crops_per_image=crops_per_image,
            grid_per_side=grid_per_side,
            pretrained=pretrained,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            balance=balance,
            softmax_groups=softmax_groups,
            declared_groups=declared_groups,
        )
