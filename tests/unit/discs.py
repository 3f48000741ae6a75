"""Synthetic grey fields of bright discs with their instance label images."""

from __future__ import annotations

import cv2
import numpy as np


def disc_field(
    rng: np.random.Generator, side: int, count: int, radius: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return a ``(side, side, 1)`` uint8 field of up to ``count`` discs and its label image.

    Discs do not overlap; one that finds no free place in 50 draws is left out.
    """
    image = rng.normal(40, 6, (side, side))
    labels = np.zeros((side, side), np.uint16)
    for k in range(1, count + 1):
        for _ in range(50):
            cx, cy = (int(v) for v in rng.integers(radius + 1, side - radius - 1, 2))
            disc = np.zeros_like(labels)
            cv2.circle(disc, (cx, cy), radius, 1, -1)
            if not labels[disc > 0].any():
                labels[disc > 0] = k
                break
    image[labels > 0] = 200 + rng.normal(0, 6, int((labels > 0).sum()))
    return np.clip(image, 0, 255).astype(np.uint8)[:, :, None], labels
