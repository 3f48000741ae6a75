"""Arrays encoded as in-memory PNG and TIFF files."""

from __future__ import annotations

import io

import numpy as np
import tifffile
from PIL import Image


def png(arr: np.ndarray) -> bytes:
    """Return ``arr`` as PNG bytes (Pillow)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    """Return ``arr`` as TIFF bytes (tifffile)."""
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()
