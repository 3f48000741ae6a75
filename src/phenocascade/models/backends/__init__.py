"""Built-in backends; importing this package registers each of them by name."""

from phenocascade.models.backends import (
    morphometric,
    multilabel_cnn,
    nucleus_mask_outlier,
    nucleus_outlier,
    quality_cnn,
    quality_probe,
    torchvision_detector,
    yolo,
)

__all__ = [
    "morphometric",
    "multilabel_cnn",
    "nucleus_mask_outlier",
    "nucleus_outlier",
    "quality_cnn",
    "quality_probe",
    "torchvision_detector",
    "yolo",
]
