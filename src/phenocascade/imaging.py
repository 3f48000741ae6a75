"""Decode microscopy images safely: 8/16-bit, grey or RGB, TIFF/PNG/JPEG.

Everything that can go wrong with an input image raises a
:class:`~phenocascade.errors.BadInputError` subclass naming the input, so workers can
dead-letter it and go on.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tifffile
from PIL import Image, UnidentifiedImageError

from phenocascade.errors import (
    CorruptImageError,
    DecompressionBombError,
    PathNotAllowedError,
    UnsupportedImageError,
)

Pixels = npt.NDArray[np.uint8] | npt.NDArray[np.uint16]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def sniff_format(data: bytes) -> str:
    """Return ``"tiff"``, ``"png"`` or ``"jpeg"`` from the magic bytes.

    Raises
    ------
    CorruptImageError
        If the bytes are empty or match none of the supported formats.
    """
    if not data:
        raise CorruptImageError("zero-byte image: the file or payload is empty")
    if data[:4] in _TIFF_MAGIC:
        return "tiff"
    if data[:8] == _PNG_MAGIC:
        return "png"
    if data[:3] == _JPEG_MAGIC:
        return "jpeg"
    raise CorruptImageError(
        f"not a TIFF, PNG or JPEG image (first bytes {data[:8]!r}); submit one of those formats"
    )


def _normalise(arr: npt.NDArray[np.generic], what: str) -> Pixels:
    """Bring an array to ``(H, W, C)``, ``C`` in {1, 3}, dtype uint8/uint16."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype not in (np.uint8, np.uint16):
        raise UnsupportedImageError(
            f"{what}: dtype {arr.dtype} is not supported; convert to 8- or 16-bit unsigned"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise UnsupportedImageError(
            f"{what}: shape {arr.shape} is not a single 2-D plane; submit one grey or RGB plane"
        )
    channels = arr.shape[2]
    if channels == 4:  # RGBA from PNG exports: the alpha plane carries no signal
        arr = arr[:, :, :3]
    elif channels == 2:  # grey + alpha
        arr = arr[:, :, :1]
    elif channels not in (1, 3):
        raise UnsupportedImageError(
            f"{what}: {channels} channels is not supported; submit grey (1) or RGB (3)"
        )
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise UnsupportedImageError(
            f"{what}: image of {arr.shape[1]}x{arr.shape[0]} px is too small"
        )
    return np.ascontiguousarray(arr)


def decode_bytes(data: bytes, *, max_pixels: int, what: str = "image") -> Pixels:
    """Decode image bytes.

    Parameters
    ----------
    data : bytes
        Encoded TIFF, PNG or JPEG.
    max_pixels : int
        Largest accepted ``width * height``; larger declared sizes are refused before
        any pixel is decoded (decompression bombs).
    what : str, default "image"
        Name of the input for error messages.

    Returns
    -------
    numpy.ndarray
        ``(H, W, C)`` with ``C`` in {1, 3}, dtype ``uint8`` or ``uint16``.

    Raises
    ------
    CorruptImageError, DecompressionBombError, UnsupportedImageError
        With a message naming ``what``.
    """
    fmt = sniff_format(data)
    try:
        if fmt == "tiff":
            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                if len(tif.pages) > 1:
                    raise UnsupportedImageError(
                        f"{what}: multi-page TIFF ({len(tif.pages)} pages); "
                        "submit one plane per image"
                    )
                page = tif.pages.first
                shape = page.shape
                if int(np.prod(shape[:2])) > max_pixels:
                    raise DecompressionBombError(
                        f"{what}: declared size {shape} exceeds the limit of {max_pixels} pixels"
                    )
                arr = page.asarray()
        else:
            with warnings.catch_warnings():
                # Pillow only warns between its two limits; any such size is over ours anyway.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
            with img:
                if img.width * img.height > max_pixels:
                    raise DecompressionBombError(
                        f"{what}: declared size {img.width}x{img.height} exceeds the limit of "
                        f"{max_pixels} pixels"
                    )
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L"):
                    arr = np.asarray(img, dtype=np.uint16)
                elif img.mode == "I":
                    arr = np.asarray(img)
                    if arr.min() < 0 or arr.max() > 65535:
                        raise UnsupportedImageError(
                            f"{what}: 32-bit integer image is not supported"
                        )
                    arr = arr.astype(np.uint16)
                elif img.mode in ("L", "RGB", "RGBA", "LA", "1"):
                    arr = np.asarray(img)
                elif img.mode in ("P", "CMYK", "YCbCr"):
                    arr = np.asarray(img.convert("RGB"))
                else:
                    raise UnsupportedImageError(f"{what}: image mode {img.mode} is not supported")
    except (DecompressionBombError, UnsupportedImageError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecompressionBombError(f"{what}: declared size exceeds the limit ({exc})") from exc
    except (
        UnidentifiedImageError,
        OSError,
        ValueError,
        SyntaxError,
        tifffile.TiffFileError,
    ) as exc:
        raise CorruptImageError(
            f"{what}: cannot decode {fmt} data ({exc}); the file is corrupt or truncated"
        ) from exc
    return _normalise(arr, what)


def resolve_under_roots(path: str | Path, roots: Sequence[Path]) -> Path:
    """Resolve ``path`` and check that it lies under one of ``roots``.

    Symbolic links and ``..`` are resolved first, so neither can escape a root.

    Raises
    ------
    PathNotAllowedError
        If the resolved path is outside every root.
    """
    raw = str(path)
    if raw.startswith("file://"):
        raw = raw[len("file://") :]
    resolved = Path(raw).resolve()
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise PathNotAllowedError(
        f"{raw} is outside the allowed roots {[str(r) for r in roots]}; "
        "add its folder to PHENOCASCADE_ALLOWED_ROOTS or send the bytes inline"
    )


def read_image(path: str | Path, *, roots: Sequence[Path], max_pixels: int) -> Pixels:
    """Read and decode an image file that must lie under ``roots``.

    Raises
    ------
    PathNotAllowedError, CorruptImageError, DecompressionBombError, UnsupportedImageError
        As :func:`resolve_under_roots` and :func:`decode_bytes`.
    """
    resolved = resolve_under_roots(path, roots)
    try:
        data = resolved.read_bytes()
    except OSError as exc:
        raise CorruptImageError(f"{resolved}: cannot read file ({exc.strerror})") from exc
    return decode_bytes(data, max_pixels=max_pixels, what=str(resolved))
