"""Decode microscopy images safely: 8/16-bit, grey or RGB, TIFF/PNG/JPEG.

Everything that can go wrong with an input image raises a
:class:`~phenocascade.errors.BadInputError` subclass naming the input, so workers can
dead-letter it and go on.

A multi-page TIFF (the z-slices or time points of one field) is one image per page: the
stream refuses it, and the dataset importers make each page a sample, decoded with
``page=``.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import imagecodecs
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
# Bit depth and colour type of a PNG, right after its signature, IHDR length, type and size.
_PNG_DEPTH_OFFSET = 24
# What Pillow, tifffile and imagecodecs raise on corrupt bytes, besides OSError and
# ValueError: tifffile on a short header (struct.error), an unknown tag value (KeyError),
# a zero RowsPerStrip (ZeroDivisionError) or samples of different bit depths without
# byte counts (TypeError); imagecodecs' codecs raise RuntimeErrors.
DECODER_ERRORS = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    LookupError,
    ArithmeticError,
    RuntimeError,
    TypeError,
    tifffile.TiffFileError,
)
# The widest pixel accepted: RGBA at 16 bits per sample (the alpha plane is dropped after
# decoding). A page whose declared samples decode to more bytes per allowed pixel is a bomb.
_MAX_BYTES_PER_PIXEL = 8
# A multi-page stack may decode to at most this many full-size images; larger stacks are
# refused even though only one page is decoded at a time.
_MAX_STACK_IMAGES = 64
# TIFF compressions whose segments are JPEG streams (JPEG, lossy JPEG): the codec allocates
# what a stream's frame header declares, whatever the page's size.
_TIFF_JPEG_COMPRESSIONS = (7, 34892)
# A JPEG frame header follows the stream's tables and APPn segments: look this far for it.
_JPEG_HEADER_BYTES = 1 << 20


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


@contextlib.contextmanager
def _opened(source: bytes | Path) -> Iterator[tuple[IO[bytes], str]]:
    """Yield a binary stream over ``source`` (bytes, or a file read lazily) and its format."""
    if isinstance(source, bytes):
        yield io.BytesIO(source), sniff_format(source)
        return
    try:
        handle = source.open("rb")
    except OSError as exc:
        raise CorruptImageError(f"{source}: cannot read file ({exc.strerror})") from exc
    with handle:
        fmt = sniff_format(handle.read(8))
        handle.seek(0)
        yield handle, fmt


def _check_tiff_size(plane: tifffile.TiffPage, pages: int, *, max_pixels: int, what: str) -> None:
    """Refuse a page, or its stack, whose declared size is over the limits.

    Every declared sample counts: planar samples, extra samples, volume depth and bit
    depth, which the page's ``shape[:2]`` alone does not show.
    """
    width, height, depth = plane.imagewidth, plane.imagelength, plane.imagedepth
    area = width * height * depth
    size = f"{width}x{height}" + (f"x{depth}" if depth > 1 else "")
    if area > max_pixels:
        raise DecompressionBombError(
            f"{what}: declared size {size} exceeds the limit of {max_pixels} pixels"
        )
    sample_bytes = -(-plane.bitspersample // 8)
    page_bytes = area * plane.samplesperpixel * sample_bytes
    budget = max_pixels * _MAX_BYTES_PER_PIXEL
    if page_bytes > budget:
        raise DecompressionBombError(
            f"{what}: declared {size} px of {plane.samplesperpixel} samples at "
            f"{plane.bitspersample} bits decode to {page_bytes} bytes, which exceeds the limit "
            f"of {budget} bytes ({max_pixels} pixels of {_MAX_BYTES_PER_PIXEL} bytes)"
        )
    # Pages of a stack share one shape; each page is checked exactly when it is decoded.
    if page_bytes * pages > budget * _MAX_STACK_IMAGES:
        raise DecompressionBombError(
            f"{what}: {pages} pages of {page_bytes} bytes exceed the limit of "
            f"{budget * _MAX_STACK_IMAGES} bytes for a stack; split it into smaller files"
        )
    # A tile is decoded whole, padding included, before it is cut to the page.
    tile_bytes = plane.tilewidth * plane.tilelength * plane.tiledepth * plane.samplesperpixel
    if plane.is_tiled and tile_bytes * sample_bytes > budget:
        raise DecompressionBombError(
            f"{what}: declared tiles of {plane.tilewidth}x{plane.tilelength} px decode to "
            f"{tile_bytes * sample_bytes} bytes each, which exceeds the limit of {budget} bytes"
        )


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """Return ``(width, height)`` from the frame header of a JPEG stream, ``None`` if none."""
    if not data.startswith(_JPEG_MAGIC[:2]):
        return None
    at = 2
    while at + 9 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0 to SOF15
            height, width = struct.unpack_from(">HH", data, at + 5)
            return width, height
        elif marker == 0xDA:  # a scan before any frame header
            return None
        else:
            at += 2 + struct.unpack_from(">H", data, at + 2)[0]
    return None


def _check_jpeg_segments(
    plane: tifffile.TiffPage, stream: IO[bytes], *, max_pixels: int, what: str
) -> None:
    """Refuse a JPEG-compressed TIFF page whose segments declare more than ``max_pixels``."""
    if plane.compression not in _TIFF_JPEG_COMPRESSIONS:
        return
    for offset, count in zip(plane.dataoffsets, plane.databytecounts, strict=False):
        if not count:
            continue
        stream.seek(offset)
        size = _jpeg_frame_size(stream.read(min(count, _JPEG_HEADER_BYTES)))
        if size is None:
            raise CorruptImageError(
                f"{what}: a JPEG segment at offset {offset} has no frame header in its first "
                f"{_JPEG_HEADER_BYTES} bytes; the file is corrupt"
            )
        if size[0] * size[1] > max_pixels:
            raise DecompressionBombError(
                f"{what}: a JPEG segment declares {size[0]}x{size[1]} px, which exceeds the "
                f"limit of {max_pixels} pixels"
            )


def _decode_tiff(
    stream: IO[bytes], *, max_pixels: int, what: str, page: int | None
) -> npt.NDArray[np.generic]:
    """Decode one page of a TIFF after checking its declared size."""
    with tifffile.TiffFile(stream) as tif:
        pages = len(tif.pages)
        if page is None and pages > 1:
            raise UnsupportedImageError(
                f"{what}: multi-page TIFF ({pages} pages) where one plane per image is "
                "expected; import the stack as a dataset (each page becomes a sample "
                "<stem>@p<k>) or submit its pages as separate images"
            )
        index = page or 0
        if not 0 <= index < pages:
            raise UnsupportedImageError(
                f"{what}: page {index} does not exist; the TIFF has {pages} page(s)"
            )
        plane = tif.pages.get(index).aspage()
        if isinstance(plane.bitspersample, tuple):  # tifffile's value when samples differ
            raise UnsupportedImageError(
                f"{what}: samples of different bit depths {plane.bitspersample}; save every "
                "sample at 8 or 16 bits"
            )
        _check_tiff_size(plane, pages, max_pixels=max_pixels, what=what)
        _check_jpeg_segments(plane, stream, max_pixels=max_pixels, what=what)
        if plane.imagedepth > 1:
            raise UnsupportedImageError(
                f"{what}: volumetric TIFF page (depth {plane.imagedepth}); submit 2-D planes"
            )
        arr: npt.NDArray[np.generic] = plane.asarray()
        if plane.planarconfig == tifffile.PLANARCONFIG.SEPARATE and plane.samplesperpixel > 1:
            arr = np.moveaxis(arr, 0, -1)  # (S, H, W) -> (H, W, S)
    return arr


def _is_16_bit_colour_png(stream: IO[bytes]) -> bool:
    """Whether a PNG holds 16-bit RGB(A) or grey+alpha, which Pillow cuts to 8 bits."""
    stream.seek(_PNG_DEPTH_OFFSET)
    depth, colour = stream.read(2)
    return depth == 16 and colour in (2, 4, 6)


def _decode_pil(stream: IO[bytes], *, max_pixels: int, what: str) -> npt.NDArray[np.generic]:
    """Decode a PNG or JPEG after checking its declared size."""
    with warnings.catch_warnings():
        # Pillow only warns between its two limits; any such size is over ours anyway.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(stream)
    with img:
        if img.width * img.height > max_pixels:
            raise DecompressionBombError(
                f"{what}: declared size {img.width}x{img.height} exceeds the limit of "
                f"{max_pixels} pixels"
            )
        if img.format == "PNG" and _is_16_bit_colour_png(stream):
            stream.seek(0)
            decoded: npt.NDArray[np.generic] = imagecodecs.png_decode(stream.read())
            return decoded
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img, dtype=np.uint16)
        if img.mode == "I":
            arr = np.asarray(img)
            if arr.min() < 0 or arr.max() > 65535:
                raise UnsupportedImageError(f"{what}: 32-bit integer image is not supported")
            return arr.astype(np.uint16)
        if img.mode in ("L", "RGB", "RGBA", "LA", "1"):
            return np.asarray(img)
        if img.mode in ("P", "CMYK", "YCbCr"):
            return np.asarray(img.convert("RGB"))
        raise UnsupportedImageError(f"{what}: image mode {img.mode} is not supported")


def _decode(source: bytes | Path, *, max_pixels: int, what: str, page: int | None) -> Pixels:
    """Decode ``source`` as :func:`decode_bytes` documents."""
    with _opened(source) as (stream, fmt):
        try:
            if fmt == "tiff":
                arr = _decode_tiff(stream, max_pixels=max_pixels, what=what, page=page)
            elif page:
                raise UnsupportedImageError(
                    f"{what}: page {page} does not exist; a {fmt.upper()} image has one page"
                )
            else:
                arr = _decode_pil(stream, max_pixels=max_pixels, what=what)
        except (CorruptImageError, DecompressionBombError, UnsupportedImageError):
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise DecompressionBombError(
                f"{what}: declared size exceeds the limit ({exc})"
            ) from exc
        except DECODER_ERRORS as exc:
            raise CorruptImageError(
                f"{what}: cannot decode {fmt} data ({exc}); the file is corrupt or truncated"
            ) from exc
    return _normalise(arr, what)


def decode_bytes(
    data: bytes, *, max_pixels: int, what: str = "image", page: int | None = None
) -> Pixels:
    """Decode image bytes.

    Parameters
    ----------
    data : bytes
        Encoded TIFF, PNG or JPEG.
    max_pixels : int
        Largest accepted ``width * height`` of the decoded plane. Larger declared sizes
        are refused before any pixel is decoded (decompression bombs), and so is a TIFF
        page whose declared samples (channels, planar or extra samples, bit depth)
        decode to more than ``8 * max_pixels`` bytes (RGBA at 16 bits), or a multi-page
        TIFF whose page count times that size exceeds 64 such images.
    what : str, default "image"
        Name of the input for error messages.
    page : int or None, default None
        Page of a multi-page TIFF to decode, from 0. ``None`` expects a single-plane
        image and refuses a multi-page TIFF; ``0`` is the only page of a PNG or JPEG.

    Returns
    -------
    numpy.ndarray
        ``(H, W, C)`` with ``C`` in {1, 3}, dtype ``uint8`` or ``uint16``.

    Raises
    ------
    CorruptImageError, DecompressionBombError, UnsupportedImageError
        With a message naming ``what``; a multi-page TIFF without ``page``, or a
        ``page`` that does not exist, is an :class:`UnsupportedImageError` naming the
        page count.
    """
    return _decode(data, max_pixels=max_pixels, what=what, page=page)


def decode_file(
    path: Path, *, max_pixels: int, what: str | None = None, page: int | None = None
) -> Pixels:
    """Decode an image file, reading only the parts of a TIFF that ``page`` needs.

    Parameters
    ----------
    path : pathlib.Path
        The image file (no root check; see :func:`read_image`).
    max_pixels : int
        As :func:`decode_bytes`.
    what : str or None, default None
        Name of the input for error messages; ``None`` uses ``path``.
    page : int or None, default None
        As :func:`decode_bytes`.

    Returns
    -------
    numpy.ndarray
        ``(H, W, C)`` with ``C`` in {1, 3}, dtype ``uint8`` or ``uint16``.

    Raises
    ------
    CorruptImageError, DecompressionBombError, UnsupportedImageError
        As :func:`decode_bytes`; an unreadable file is a :class:`CorruptImageError`.
    """
    return _decode(path, max_pixels=max_pixels, what=what or str(path), page=page)


def tiff_pages(data_or_path: bytes | Path) -> int:
    """Return the number of pages of a TIFF, or 1 for a PNG or JPEG (one plane each).

    Parameters
    ----------
    data_or_path : bytes or pathlib.Path
        Encoded image bytes, or an image file (only its page directory is read).

    Raises
    ------
    CorruptImageError
        If the input is not an image, the file cannot be read, or the TIFF's page
        directory is corrupt.
    """
    what = str(data_or_path) if isinstance(data_or_path, Path) else "image"
    with _opened(data_or_path) as (stream, fmt):
        if fmt != "tiff":
            return 1
        try:
            with tifffile.TiffFile(stream) as tif:
                return len(tif.pages)
        except DECODER_ERRORS as exc:
            raise CorruptImageError(
                f"{what}: cannot read the TIFF page directory ({exc}); the file is corrupt"
            ) from exc


def resolve_under_roots(path: str | Path, roots: Sequence[Path]) -> Path:
    """Resolve ``path`` and check that it lies under one of ``roots``.

    Symbolic links and ``..`` are resolved first, so neither can escape a root.

    Raises
    ------
    PathNotAllowedError
        If the resolved path is outside every root, or ``path`` cannot name a file (it
        holds a NUL byte or a lone surrogate).
    """
    raw = str(path)
    if raw.startswith("file://"):
        raw = raw[len("file://") :]
    try:
        resolved = Path(raw).resolve()
    except ValueError as exc:  # a NUL byte or a lone surrogate: no file can have this name
        raise PathNotAllowedError(f"{raw!r} is not a valid file path ({exc})") from exc
    for root in roots:
        if resolved.is_relative_to(root.resolve()):
            return resolved
    raise PathNotAllowedError(
        f"{raw} is outside the allowed roots {[str(r) for r in roots]}; "
        "add its folder to PHENOCASCADE_ALLOWED_ROOTS or send the bytes inline"
    )


def read_image(
    path: str | Path,
    *,
    roots: Sequence[Path],
    max_pixels: int,
    page: int | None = None,
    max_bytes: int | None = None,
) -> Pixels:
    """Read and decode an image file that must lie under ``roots``.

    Parameters
    ----------
    path : str or pathlib.Path
        The file, or a ``file://`` URI.
    roots : sequence of pathlib.Path
        Folders the resolved path must lie under.
    max_pixels : int
        As :func:`decode_bytes`.
    page : int or None, default None
        As :func:`decode_bytes`: ``None`` refuses a multi-page TIFF.
    max_bytes : int or None, default None
        Largest accepted file size (``PHENOCASCADE_MAX_FILE_BYTES``); ``None``: no cap.

    Raises
    ------
    PathNotAllowedError, CorruptImageError, DecompressionBombError, UnsupportedImageError
        As :func:`resolve_under_roots` and :func:`decode_bytes`; a file over ``max_bytes``
        is a :class:`DecompressionBombError`, refused before it is opened.
    """
    resolved = resolve_under_roots(path, roots)
    if max_bytes is not None:
        try:
            size = resolved.stat().st_size
        except OSError as exc:
            raise CorruptImageError(f"{path}: cannot be read ({exc.strerror})") from exc
        if size > max_bytes:
            raise DecompressionBombError(
                f"{path}: file of {size} bytes exceeds max_file_bytes={max_bytes}; raise "
                "PHENOCASCADE_MAX_FILE_BYTES if such files are expected"
            )
    return decode_file(resolved, max_pixels=max_pixels, page=page)
