"""Render an output over its image: majority labels in one colour, minority boxes in another."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from phenocascade.imaging import Pixels

LABEL_COLOUR = (0, 200, 255)  # majority, image-level labels: cyan
BOX_COLOUR = (255, 0, 200)  # minority, segment-level boxes: magenta


def to_display(pixels: Pixels, low_pct: float = 0.5, high_pct: float = 99.5) -> Image.Image:
    """Window an image to 8-bit RGB for display.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W, C)``, uint8 or uint16.
    low_pct, high_pct : float, default 0.5 and 99.5
        Percentiles mapped to black and white (16-bit images and dim fluorescence need it).
    """
    arr = pixels.astype(np.float32)
    lo, hi = np.percentile(arr, [low_pct, high_pct])
    scaled = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(scaled, 3, axis=2) if scaled.shape[2] == 1 else scaled
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def render_overlay(
    pixels: Pixels,
    labels: Mapping[str, float],
    boxes: Sequence[Mapping[str, Any]],
    *,
    status: str = "",
    min_label_score: float = 0.5,
    scale: float = 1.0,
) -> Image.Image:
    """Draw an ``ImageOutput`` over its image.

    Parameters
    ----------
    pixels : numpy.ndarray
        The original image, ``(H, W, C)``.
    labels : Mapping[str, float]
        Image-level majority labels and calibrated scores; those at or above
        ``min_label_score`` are listed in the top-left corner.
    boxes : Sequence of Mapping
        Minority boxes with ``x_min, y_min, x_max, y_max`` (pixels), ``label`` and ``score``.
    status : str, default ""
        The output status, written above the labels.
    min_label_score : float, default 0.5
        Labels below this score are not listed.
    scale : float, default 1.0
        Pixels of the boxes' image per pixel of ``pixels``: a slide is drawn downsampled
        (:meth:`~phenocascade.store.slides.Slide.thumbnail`), its boxes in level-0 pixels.
    """
    image = to_display(pixels)
    draw = ImageDraw.Draw(image)
    size = max(12, image.height // 40)
    font = ImageFont.load_default(size=size)
    for box in boxes:
        x_min, y_min = box["x_min"] / scale, box["y_min"] / scale
        xy = (
            x_min,
            y_min,
            max(x_min, box["x_max"] / scale - 1),
            max(y_min, box["y_max"] / scale - 1),
        )
        draw.rectangle(xy, outline=BOX_COLOUR, width=max(2, image.height // 300))
        draw.text(
            (x_min, max(0, y_min - size - 2)),
            f"{box['label']} {box['score']:.2f}",
            fill=BOX_COLOUR,
            font=font,
        )
    lines = [status] if status else []
    lines += [
        f"{label} {score:.2f}"
        for label, score in sorted(labels.items(), key=lambda kv: -kv[1])
        if score >= min_label_score
    ]
    y = 4.0
    for line in lines:
        draw.rectangle(
            (2, y - 1, 6 + draw.textlength(line, font=font), y + size + 1), fill=(0, 0, 0)
        )
        draw.text((4, y), line, fill=LABEL_COLOUR, font=font)
        y += size + 4
    return image
