"""A CellProfiler-style classical baseline for the DSB 2018 majority groups.

The pipeline of a CellProfiler ``IdentifyPrimaryObjects`` module with global Otsu
thresholding, no declumping, and the dataset's own cut-offs:

1. **One nucleus channel, nuclei bright:** the luminance (the mean of R, G and B; the grey
   value of grey images), inverted when the background is bright, i.e. when the median
   pixel lies above the Otsu threshold (most pixels "foreground"): brightfield and
   H&E-like stains show nuclei dark on a light field, as CellProfiler users handle with
   ``ImageMath`` invert. On the val split the red channel of colour images (hematoxylin
   absorbs red, eosin hardly) scored no better than luminance (size macro-F1 0.40 against
   0.43 on the colour-stained images), so one rule serves every modality.
2. **Otsu's threshold** on that channel (256-bin histogram of the 8-bit image).
3. **Connected components** (8-connected) of the foreground, with holes filled; objects
   under ``MIN_AREA`` pixels are noise (CellProfiler's size filter).
4. **Median object area and object count** through the cut-offs of
   ``dsb2018/derived_stage2_labels.csv`` (the dataset README): median area below 164 px is
   small, up to 456 medium, from 457 large; fewer than 20 nuclei is sparse, up to 42
   medium, from 43 dense.

A benchmark helper, not part of the library; :mod:`models` runs it beside the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2  # installed with ultralytics, a declared dependency
import numpy as np
import numpy.typing as npt

from phenocascade.models.preprocess import to_unit_rgb

SIZE_CUTS = (164, 457)  # median nucleus area in pixels: small < 164 <= medium < 457 <= large
COUNT_CUTS = (20, 43)  # nucleus count: sparse < 20 <= medium < 43 <= dense
MIN_AREA = 10  # objects smaller than this (pixels) are noise, not nuclei
GROUPS = {"nucleus_size": ("small", "medium", "large"), "density": ("sparse", "medium", "dense")}


@dataclass(frozen=True)
class Objects:
    """What the classical pipeline finds in one image.

    Attributes
    ----------
    count : int
        Objects kept (at least ``MIN_AREA`` pixels).
    median_area : float
        Their median area in pixels; 0.0 when none is kept.
    """

    count: int
    median_area: float


def nucleus_channel(pixels: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Return the 8-bit channel in which nuclei are bright (see the module docstring).

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W, C)``, ``uint8`` or ``uint16``, grey or RGB(A).

    Returns
    -------
    numpy.ndarray
        ``(H, W)``, ``uint8``.
    """
    luminance = to_unit_rgb(pixels).mean(axis=2)
    grey = np.clip(np.round(luminance * 255.0), 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return 255 - grey if float(np.median(grey)) > threshold else grey


def find_objects(pixels: npt.NDArray[Any]) -> Objects:
    """Otsu-threshold the nucleus channel and measure its connected components.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W, C)``, ``uint8`` or ``uint16``.

    Returns
    -------
    Objects
        Object count and median object area.
    """
    grey = nucleus_channel(pixels)
    _, binary = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = _fill_holes(np.asarray(binary, dtype=np.uint8))
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]  # row 0 is the background
    areas = areas[areas >= MIN_AREA]
    return Objects(len(areas), float(np.median(areas)) if len(areas) else 0.0)


def _fill_holes(mask: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """Fill background regions of a 0/255 mask that do not touch the border."""
    padded = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    flood = padded.copy()
    cv2.floodFill(flood, None, (0, 0), 255)
    holes = cv2.bitwise_not(flood)[1:-1, 1:-1]
    return np.asarray(cv2.bitwise_or(mask, holes), dtype=np.uint8)


def group_labels(objects: Objects) -> dict[str, str]:
    """Map measurements to one ``group:value`` label per group with the dataset's cut-offs.

    Parameters
    ----------
    objects : Objects
        From :func:`find_objects`.

    Returns
    -------
    dict of str to str
        ``{"nucleus_size": "nucleus_size:<value>", "density": "density:<value>"}``.
    """
    size = GROUPS["nucleus_size"][int(np.searchsorted(SIZE_CUTS, objects.median_area, "right"))]
    density = GROUPS["density"][int(np.searchsorted(COUNT_CUTS, objects.count, "right"))]
    return {"nucleus_size": f"nucleus_size:{size}", "density": f"density:{density}"}
