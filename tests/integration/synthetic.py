"""Generated electron-microscopy-like slices with per-class foreground masks.

A stand-in for a lab's own data in the format labs have: 8-bit grey TIFF slices and one
folder of 8-bit foreground masks (0/255) per organelle class. Two classes are frequent and
in every slice (mitochondria, vesicles); one is rare and large (dense-core granules, a few
percent of all objects, in about a third of the slices).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

CLASSES = ("dense_core_granule", "mitochondrion", "vesicle")


def write_em_like(root: Path, n: int = 12, size: int = 512, seed: int = 0) -> dict[str, int]:
    """Write ``root/images/slice_XXX.tif`` and ``root/masks/<class>/slice_XXX.tif``.

    Returns the number of objects written per class.
    """
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for cls in CLASSES:
        (root / "masks" / cls).mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(CLASSES, 0)
    for k in range(n):
        texture = cv2.GaussianBlur(rng.normal(0, 25, (size, size)), (0, 0), 3)
        image = np.clip(150 + texture + rng.normal(0, 8, (size, size)), 0, 255)
        masks = {cls: np.zeros((size, size), np.uint8) for cls in CLASSES}
        for _ in range(8):
            centre = tuple(int(c) for c in rng.integers(30, size - 30, 2))
            axes = (int(rng.integers(14, 24)), int(rng.integers(6, 10)))
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(masks["mitochondrion"], centre, axes, angle, 0, 360, 255, -1)
        for _ in range(14):
            centre = tuple(int(c) for c in rng.integers(10, size - 10, 2))
            cv2.circle(masks["vesicle"], centre, int(rng.integers(3, 5)), 255, -1)
        if k % 3 == 0:
            centre = tuple(int(c) for c in rng.integers(60, size - 60, 2))
            cv2.circle(masks["dense_core_granule"], centre, int(rng.integers(28, 40)), 255, -1)
        for cls, shade in (("mitochondrion", 85), ("vesicle", 60), ("dense_core_granule", 35)):
            image[masks[cls] > 0] = shade + rng.normal(0, 6, int((masks[cls] > 0).sum()))
            counts[cls] += cv2.connectedComponents(masks[cls], connectivity=8)[0] - 1
        name = f"slice_{k:03d}.tif"
        tifffile.imwrite(root / "images" / name, np.clip(image, 0, 255).astype(np.uint8))
        for cls in CLASSES:
            tifffile.imwrite(root / "masks" / cls / name, masks[cls])
    return counts
