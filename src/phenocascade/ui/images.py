"""The pixels of a task's image, and their display windowing for the browser.

Pixels come only from the task's stored inline bytes or from its URI resolved under
``settings.roots()``; a URI anywhere else is refused. A task of a slide's tile shows the
tile, read from the slide. The browser gets an 8-bit PNG windowed
on the server (``low`` -> black, ``high`` -> white in raw units), so 16-bit images keep their
full depth until the moment they are shown.
"""

from __future__ import annotations

import functools
import io
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from phenocascade.config import Settings
from phenocascade.errors import BadInputError, NotFoundError
from phenocascade.imaging import Pixels, decode_bytes, read_image
from phenocascade.store.slides import read_tile
from phenocascade.streams.serde import EventCodec
from phenocascade.streams.tiling import submission_tile


def window(pixels: Pixels, low: float, high: float) -> npt.NDArray[np.uint8]:
    """Map raw intensities linearly to 8 bits: ``low`` -> 0, ``high`` -> 255, clipped.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W, C)``, uint8 or uint16, as decoded.
    low, high : float
        The display window in raw units, ``low < high``.

    Returns
    -------
    numpy.ndarray
        ``(H, W, C)`` uint8.

    Notes
    -----
    A lookup table over every raw value (256 or 65536 entries) maps the pixels in one
    indexing pass, so no float copy of the image is made: the peak is the 8-bit result.
    """
    top = 255 if pixels.dtype == np.uint8 else 65535
    raw = np.arange(top + 1, dtype=np.float64)
    lut = np.clip(np.rint((raw - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
    return lut[pixels]


def windowed_png(pixels: Pixels, low: float, high: float) -> bytes:
    """Return :func:`window` of ``pixels`` encoded as an 8-bit grey or RGB PNG."""
    arr = window(pixels, low, high)
    image = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_info(pixels: Pixels) -> dict[str, Any]:
    """Describe an image for the viewer.

    Returns
    -------
    dict
        ``width, height, channels, dtype ("uint8" | "uint16"), max_value`` (255 or 65535),
        ``data_min, data_max`` and a default window ``window_low, window_high``: the full
        range for 8-bit images (shown as acquired), the 0.5th and 99.5th percentiles for
        16-bit ones (whose signal often fills a small part of the range), widened by one
        unit when they coincide.
    """
    max_value = int(np.iinfo(pixels.dtype).max)
    if pixels.dtype == np.uint8:
        lo, hi = 0.0, float(max_value)
    else:
        lo, hi = (float(v) for v in np.percentile(pixels, [0.5, 99.5]))
    if hi <= lo:
        lo, hi = max(0.0, lo - 1), min(float(max_value), hi + 1)
    return {
        "width": int(pixels.shape[1]),
        "height": int(pixels.shape[0]),
        "channels": int(pixels.shape[2]),
        "dtype": str(pixels.dtype),
        "max_value": max_value,
        "data_min": int(pixels.min()),
        "data_max": int(pixels.max()),
        "window_low": lo,
        "window_high": hi,
    }


def task_pixels(settings: Settings, task: Mapping[str, Any]) -> Pixels:
    """Decode the image of an annotation task (of a slide's tile: that tile, read lazily).

    Raises
    ------
    NotFoundError
        If the task has neither inline bytes nor a URI.
    BadInputError
        If the URI is outside ``settings.roots()`` or the bytes do not decode.
    """
    what = f"image {task['image_id']}"
    tile = submission_tile(_codec(), task.get("submitted"))
    if tile is not None:
        return read_tile(task["uri"], tile, settings=settings, what=task["image_id"])
    if task["inline"] is not None:
        if len(task["inline"]) > settings.max_inline_bytes:
            raise BadInputError(
                f"{what}: inline image of {len(task['inline'])} bytes exceeds max_inline_bytes="
                f"{settings.max_inline_bytes}"
            )
        return decode_bytes(task["inline"], max_pixels=settings.max_image_pixels, what=what)
    if task["uri"]:
        return read_image(
            task["uri"],
            roots=settings.roots(),
            max_pixels=settings.max_image_pixels,
            max_bytes=settings.max_file_bytes,
        )
    raise NotFoundError(f"{what} has neither inline bytes nor a URI; its pixels are not stored")


@functools.cache
def _codec() -> EventCodec:
    return EventCodec()


class PixelCache:
    """A small thread-safe LRU of decoded task images, keyed by ``(tier, image_id)``.

    The viewer asks for the same image at each window change; decoding once per image
    keeps slider moves cheap. It holds at most ``size`` images and ``max_bytes`` of pixels;
    an image larger than ``max_bytes`` is decoded for each request and never kept.

    Parameters
    ----------
    settings : Settings
        Allowed roots and decoding limits.
    size : int, default 8
        Images kept.
    max_bytes : int, default 256 MiB
        Pixel bytes kept.
    """

    def __init__(self, settings: Settings, size: int = 8, max_bytes: int = 256 * 1024**2) -> None:
        self.settings = settings
        self.size = size
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], Pixels] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, task: Mapping[str, Any]) -> Pixels:
        """Return the decoded image of ``task`` (see :func:`task_pixels`)."""
        key = (task["tier"], task["image_id"])
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        pixels = task_pixels(self.settings, task)
        if pixels.nbytes > self.max_bytes:
            return pixels
        with self._lock:
            self._items[key] = pixels
            while (
                len(self._items) > self.size
                or sum(p.nbytes for p in self._items.values()) > self.max_bytes
            ):
                self._items.popitem(last=False)
        return pixels
