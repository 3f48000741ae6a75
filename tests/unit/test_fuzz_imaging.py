"""Fuzz the image decoder: every input decodes cleanly or raises a BadInputError subclass.

A worker decodes whatever bytes arrive (``decode_bytes``) or whatever file a URI names
(``read_image``); anything else than a clean ``(H, W, C)`` array or a
:class:`~phenocascade.errors.BadInputError` would kill it instead of dead-lettering the
image. Declared sizes over ``max_pixels`` are refused before any pixel is decoded, so a
bomb costs no more time than a tiny image.
"""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from fuzzing import example_dir, fuzz, outcome, png_header
from hypothesis import example, given
from hypothesis import strategies as st

from phenocascade.errors import (
    CorruptImageError,
    DecompressionBombError,
    PathNotAllowedError,
    UnsupportedImageError,
)
from phenocascade.imaging import decode_bytes, decode_file, read_image, tiff_pages

MAX_PIXELS = 4096
DECODE_ERRORS = (CorruptImageError, DecompressionBombError, UnsupportedImageError)
# A bomb must be refused about as fast as a tiny image decodes: from its header alone.
BOMB_SECONDS = 1.0


def encode(arr: np.ndarray, fmt: str) -> bytes:
    """Encode ``arr`` (H, W) or (H, W, C) as TIFF, PNG or JPEG."""
    if fmt == "tiff":
        buf = io.BytesIO()
        tifffile.imwrite(buf, arr, photometric="rgb" if arr.ndim == 3 else "minisblack")
        return buf.getvalue()
    # OpenCV writes 16-bit RGB(A) PNGs, which Pillow cannot; it stores channels as BGR(A).
    if arr.ndim == 3:
        order = [2, 1, 0, 3][: arr.shape[2]]
        arr = arr[:, :, order]
    ok, buf = cv2.imencode(".png" if fmt == "png" else ".jpg", arr)
    assert ok
    return bytes(buf.tobytes())


@st.composite
def images(draw: st.DrawFn) -> tuple[np.ndarray, str]:
    """Draw a small grey, RGB or RGBA array, 8- or 16-bit, and a format that can hold it."""
    fmt = draw(st.sampled_from(["tiff", "png", "jpeg"]))
    dtype = np.uint8 if fmt == "jpeg" else draw(st.sampled_from([np.uint8, np.uint16]))
    channels = draw(st.sampled_from([1, 3] if fmt == "jpeg" else [1, 3, 4]))
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**32 - 1))
    arr = np.random.default_rng(seed).integers(
        0, np.iinfo(dtype).max, (height, width, channels), dtype=dtype, endpoint=True
    )
    return (arr[:, :, 0] if channels == 1 else arr), fmt


RGB16 = np.arange(16 * 16 * 3, dtype=np.uint16).reshape(16, 16, 3) * 1000


@given(drawn=images())
# Regression: Pillow decoded 16-bit RGB(A) PNGs to 8 bits, silently dropping the low byte.
@example(drawn=(RGB16, "png"))
@example(drawn=(np.dstack([RGB16, RGB16[:, :, :1]]), "png"))
@fuzz(60)
def test_every_valid_image_decodes_to_its_pixels_or_is_too_small(
    drawn: tuple[np.ndarray, str],
) -> None:
    arr, fmt = drawn
    got = outcome(lambda: decode_bytes(encode(arr, fmt), max_pixels=MAX_PIXELS), DECODE_ERRORS)
    if min(arr.shape[:2]) < 8:
        assert isinstance(got, UnsupportedImageError)
        assert "too small" in str(got)
        return
    assert isinstance(got, np.ndarray)
    expected = arr.reshape(*arr.shape[:2], -1)[:, :, : 3 if arr.ndim == 3 else 1]
    assert got.shape == expected.shape
    assert got.dtype == arr.dtype
    if fmt != "jpeg":  # lossless: every sample survives, 16-bit RGB included
        assert np.array_equal(got, expected)


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """Draw a valid encoded image, then flip, drop, insert or cut some of its bytes."""
    arr, fmt = draw(images())
    data = bytearray(encode(arr, fmt))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at:]
        if not data:
            break
    return bytes(data)


MAGICS = [b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]


@given(
    data=damaged()
    | st.binary(max_size=64)
    | st.tuples(st.sampled_from(MAGICS), st.binary(max_size=256)).map(b"".join)
)
@example(data=b"")
@example(data=b"II*\x00")
@fuzz(200)
def test_damaged_or_random_bytes_decode_or_raise_a_bad_input_error(data: bytes) -> None:
    got = outcome(lambda: decode_bytes(data, max_pixels=MAX_PIXELS, what="img-1"), DECODE_ERRORS)
    if isinstance(got, BaseException):
        if any(data.startswith(magic) for magic in MAGICS):  # past the format sniffing
            assert "img-1" in str(got)
    else:
        assert got.ndim == 3 and got.shape[2] in (1, 3)
        assert got.dtype in (np.uint8, np.uint16)
        assert got.shape[0] * got.shape[1] <= MAX_PIXELS
    outcome(lambda: tiff_pages(data), (CorruptImageError,))


# TIFF tags a decoder reads, with the TIFF type of their value (SHORT 3, LONG 4).
TIFF_TAGS = {
    "ImageWidth": (256, 4),
    "ImageLength": (257, 4),
    "BitsPerSample": (258, 3),
    "Compression": (259, 3),
    "Photometric": (262, 3),
    "StripOffsets": (273, 4),
    "SamplesPerPixel": (277, 3),
    "RowsPerStrip": (278, 4),
    "StripByteCounts": (279, 4),
    "PlanarConfig": (284, 3),
    "Predictor": (317, 3),
    "TileWidth": (322, 4),
    "TileLength": (323, 4),
    "TileOffsets": (324, 4),
    "TileByteCounts": (325, 4),
    "ExtraSamples": (338, 3),
    "SampleFormat": (339, 3),
    "ImageDepth": (32997, 4),
}
EDGE_VALUES = [0, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 255, 256, 32773, 34712, 50000, 65535, 2**32 - 1]


def tiff_with_tags(tags: dict[str, int | tuple[int, ...]], pixels: bytes) -> bytes:
    """Write a little-endian TIFF: header, ``pixels`` at offset 8, then one IFD of ``tags``.

    A tuple is a tag of several values (e.g. one BitsPerSample per sample), stored after
    the IFD when it does not fit in the entry.
    """
    ifd_offset = 8 + len(pixels) + len(pixels) % 2
    ifd_size = 2 + 12 * len(tags) + 4
    entries, extra = [], b""
    for name, value in sorted(tags.items(), key=lambda kv: TIFF_TAGS[kv[0]][0]):
        tag, kind = TIFF_TAGS[name]
        values = value if isinstance(value, tuple) else (value,)
        fmt = "<" + ("H" if kind == 3 else "I") * len(values)
        packed = struct.pack(fmt, *(v & (0xFFFF if kind == 3 else 0xFFFFFFFF) for v in values))
        if len(packed) <= 4:
            field = packed.ljust(4, b"\x00")
        else:
            field = struct.pack("<I", ifd_offset + ifd_size + len(extra))
            extra += packed
        entries.append(struct.pack("<HHI", tag, kind, len(values)) + field)
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + struct.pack("<I", 0)
    padding = b"\x00" * (len(pixels) % 2)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + pixels + padding + ifd + extra


def grey_tiff(
    width: int, height: int, bits: int, pixels: bytes, **overrides: int | tuple[int, ...]
) -> bytes:
    """Write a one-strip grey TIFF of ``pixels``, with some tags set to ``overrides``."""
    tags = {
        "ImageWidth": width,
        "ImageLength": height,
        "BitsPerSample": bits,
        "Compression": 1,
        "Photometric": 1,
        "StripOffsets": 8,
        "SamplesPerPixel": 1,
        "RowsPerStrip": height,
        "StripByteCounts": len(pixels),
    }
    return tiff_with_tags(tags | overrides, pixels)


@st.composite
def crafted_tiffs(draw: st.DrawFn) -> bytes:
    """Draw a valid one-strip TIFF, then set a few of its tags to edge or random values."""
    width, height = draw(st.integers(1, 32)), draw(st.integers(1, 32))
    bits = draw(st.sampled_from([8, 16]))
    pixels = draw(st.binary(min_size=width * height * bits // 8, max_size=width * height * 2))
    overrides = draw(
        st.dictionaries(
            st.sampled_from(sorted(TIFF_TAGS)),
            st.sampled_from(EDGE_VALUES) | st.integers(0, 2**32 - 1),
            max_size=4,
        )
    )
    return grey_tiff(width, height, bits, pixels, **overrides)


GARBAGE = bytes(range(7, 256, 3)) * 2
# RGB samples of 8, 16 and 8 bits, and no StripByteCounts for tifffile to read.
MIXED_BITS: dict[str, int | tuple[int, ...]] = {
    "ImageWidth": 8,
    "ImageLength": 8,
    "BitsPerSample": (8, 16, 8),
    "SamplesPerPixel": 3,
    "Photometric": 2,
    "StripOffsets": 8,
}


@given(data=crafted_tiffs())
# Regressions: each raised another type than CorruptImageError (struct.error, KeyError,
# ZeroDivisionError, imagecodecs' RuntimeErrors) and would have killed a worker.
@example(data=b"II*\x00")
@example(data=grey_tiff(8, 8, 8, GARBAGE[:64], Predictor=0))
@example(data=grey_tiff(8, 8, 8, GARBAGE[:64], RowsPerStrip=0))
@example(data=grey_tiff(8, 8, 8, GARBAGE[:64], Compression=5))  # LZW
@example(data=grey_tiff(8, 8, 8, GARBAGE[:64], Compression=7))  # JPEG
@example(data=grey_tiff(8, 8, 8, GARBAGE[:64], Compression=8))  # Deflate
@example(data=grey_tiff(8, 8, 8, GARBAGE[:64], Compression=4))  # CCITT group 4
# Regressions: samples of different bit depths made tifffile's and our own size
# arithmetic raise TypeError on the tuple of bit depths.
@example(data=grey_tiff(8, 8, 8, GARBAGE[:96], SamplesPerPixel=3, BitsPerSample=(8, 16, 8)))
@example(data=tiff_with_tags(MIXED_BITS, GARBAGE[:96]))
@fuzz(200)
def test_tiffs_with_odd_tags_decode_or_raise_a_bad_input_error(data: bytes) -> None:
    got = outcome(lambda: decode_bytes(data, max_pixels=MAX_PIXELS), DECODE_ERRORS)
    if isinstance(got, np.ndarray):
        assert got.shape[0] * got.shape[1] <= MAX_PIXELS
        assert got.dtype in (np.uint8, np.uint16)


def jpeg_claiming(width: int, height: int) -> bytes:
    """Return a valid 16x16 JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(encode(np.zeros((16, 16), np.uint8), "jpeg"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


dims = st.integers(1, 2**31 - 1)
HUGE_TILES = {"TileWidth": 2**32 - 1, "TileLength": 1, "TileOffsets": 8, "TileByteCounts": 64}


@st.composite
def bombs(draw: st.DrawFn) -> bytes:
    """Draw a small PNG, JPEG or TIFF whose header declares more than MAX_PIXELS pixels."""
    kind = draw(st.sampled_from(["png", "jpeg", "tiff", "tiff-jpeg", "tiff-tiles"]))
    if kind in ("jpeg", "tiff-jpeg"):
        width = draw(st.integers(MAX_PIXELS // 65535 + 1, 65535))
        height = draw(st.integers(MAX_PIXELS // width + 1, 65535))
        if kind == "jpeg":
            return jpeg_claiming(width, height)
        return grey_tiff(8, 8, 8, jpeg_claiming(width, height), Compression=7)
    if kind == "tiff-tiles":  # a tiny page in one tile larger than the pixel budget
        tile_width = draw(st.integers(1, 2**20))
        tile_length = draw(st.integers(8 * MAX_PIXELS // tile_width + 1, 2**20))
        tiles = {"TileWidth": tile_width, "TileLength": tile_length, "TileOffsets": 8}
        compression = draw(st.sampled_from([1, 2, 5, 8, 32773]))
        return grey_tiff(8, 8, 8, GARBAGE[:64], Compression=compression, TileByteCounts=64, **tiles)
    width = draw(dims)
    height = draw(st.integers(MAX_PIXELS // width + 1, 2**31 - 1))
    if kind == "png":
        pixel_format = [(8, 0), (16, 0), (8, 2), (16, 2), (8, 6), (16, 6), (1, 0)]
        bit_depth, colour = draw(st.sampled_from(pixel_format))
        return png_header(width, height, bit_depth, colour)
    compression = draw(st.sampled_from([1, 5, 8, 32773]))
    return grey_tiff(width, height, 8, GARBAGE[:64], Compression=compression)


@given(data=bombs())
@example(data=png_header(2**31 - 1, 2**31 - 1, 16, 6))
@example(data=png_header(65, 64, 8, 0))
@example(data=jpeg_claiming(65535, 65535))
# Regressions: a tiny TIFF page made the codec allocate what a huge tile, or the frame
# header of a JPEG segment, declared (4 GiB and more, killed by the OOM killer).
@example(data=grey_tiff(8, 8, 8, jpeg_claiming(65535, 65535), Compression=7, Photometric=6))
@example(data=grey_tiff(8, 8, 8, GARBAGE[:64], Compression=2, **HUGE_TILES))
@fuzz(60)
def test_a_declared_size_over_the_limit_is_refused_from_the_header(data: bytes) -> None:
    start = time.perf_counter()
    got = outcome(lambda: decode_bytes(data, max_pixels=MAX_PIXELS), DECODE_ERRORS)
    elapsed = time.perf_counter() - start
    # PNG widths over 2**31 - 1 are invalid: Pillow may refuse them as corrupt instead.
    assert isinstance(got, DecompressionBombError | CorruptImageError), got
    assert elapsed < BOMB_SECONDS, f"refusing a bomb took {elapsed:.2f} s"


def test_a_real_size_bomb_under_the_default_limit_is_refused_quickly() -> None:
    start = time.perf_counter()
    with pytest.raises(DecompressionBombError, match="exceeds the limit of 64000000 pixels"):
        decode_bytes(png_header(8001, 8000, 8, 0), max_pixels=64_000_000)
    assert time.perf_counter() - start < BOMB_SECONDS


uris = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "file://", "/", "..", "file:///etc/passwd", "a\x00b", "file://\x00"]
)


@given(uri=uris, inside=st.booleans())
@example(uri="a\x00b.png", inside=True)
@fuzz(100)
def test_any_submitted_uri_reads_or_raises_a_bad_input_error(
    tmp_path: Path, uri: str, inside: bool
) -> None:
    with example_dir(tmp_path) as root:
        (root / "ok.png").write_bytes(encode(np.zeros((8, 8), np.uint8), "png"))
        target = str(root / uri) if inside else uri
        got = outcome(
            lambda: read_image(target, roots=[root], max_pixels=MAX_PIXELS, max_bytes=1 << 20),
            (*DECODE_ERRORS, PathNotAllowedError),
        )
        if isinstance(got, np.ndarray):
            assert got.shape == (8, 8, 1)


@given(data=damaged())
@fuzz(40)
def test_a_damaged_file_decodes_like_its_bytes(tmp_path: Path, data: bytes) -> None:
    with example_dir(tmp_path) as folder:
        path = folder / "image.bin"
        path.write_bytes(data)
        from_file = outcome(lambda: decode_file(path, max_pixels=MAX_PIXELS), DECODE_ERRORS)
        from_bytes = outcome(lambda: decode_bytes(data, max_pixels=MAX_PIXELS), DECODE_ERRORS)
    if isinstance(from_bytes, np.ndarray):
        assert isinstance(from_file, np.ndarray)
        assert np.array_equal(from_file, from_bytes)
    else:
        assert type(from_file) is type(from_bytes)
