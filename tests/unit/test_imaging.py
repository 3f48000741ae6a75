import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from phenocascade.errors import (
    CorruptImageError,
    DecompressionBombError,
    PathNotAllowedError,
    UnsupportedImageError,
)
from phenocascade.imaging import decode_bytes, read_image, resolve_under_roots

MAX = 10_000_000


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def tiff(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize(
    "arr, channels",
    [
        (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64), 1),
        (np.full((48, 64), 7, np.uint8), 1),
        (np.zeros((48, 64, 3), np.uint8), 3),
        (np.zeros((48, 64, 4), np.uint8), 3),
    ],
)
def test_png_and_tiff_keep_dtype_and_give_hwc(arr: np.ndarray, channels: int) -> None:
    for data in (png(arr), tiff(arr)):
        out = decode_bytes(data, max_pixels=MAX)
        assert out.shape == (48, 64, channels)
        assert out.dtype == arr.dtype
        assert np.array_equal(out[..., 0], arr if arr.ndim == 2 else arr[..., 0])


def test_jpeg_rgb() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(buf, format="JPEG")
    out = decode_bytes(buf.getvalue(), max_pixels=MAX)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_zero_bytes() -> None:
    with pytest.raises(CorruptImageError, match="zero-byte"):
        decode_bytes(b"", max_pixels=MAX)


def test_non_image_bytes() -> None:
    with pytest.raises(CorruptImageError, match="not a TIFF, PNG or JPEG"):
        decode_bytes(b"%PDF-1.7 not an image at all", max_pixels=MAX)


def test_truncated_png() -> None:
    data = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(CorruptImageError, match="corrupt or truncated"):
        decode_bytes(data[: len(data) // 2], max_pixels=MAX)


def test_truncated_tiff() -> None:
    data = tiff(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    with pytest.raises(CorruptImageError):
        decode_bytes(data[:40], max_pixels=MAX)


def _png_header_claiming(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    with pytest.raises(DecompressionBombError, match="exceeds the limit"):
        decode_bytes(_png_header_claiming(100_000, 100_000), max_pixels=MAX)


def test_float_tiff_is_unsupported() -> None:
    with pytest.raises(UnsupportedImageError, match="dtype float32"):
        decode_bytes(tiff(np.zeros((32, 32), np.float32)), max_pixels=MAX)


def test_five_channel_tiff_is_unsupported() -> None:
    buf = io.BytesIO()
    tifffile.imwrite(
        buf, np.zeros((32, 32, 5), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    with pytest.raises(UnsupportedImageError, match="5 channels"):
        decode_bytes(buf.getvalue(), max_pixels=MAX)


def test_multi_page_tiff_is_unsupported() -> None:
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for _ in range(3):
            tw.write(np.zeros((32, 32), np.uint8), photometric="minisblack")
    with pytest.raises(UnsupportedImageError, match="multi-page TIFF"):
        decode_bytes(buf.getvalue(), max_pixels=MAX)


def test_paths_outside_roots_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    outside.write_bytes(png(np.zeros((16, 16), np.uint8)))
    (root / "link.png").symlink_to(outside)
    with pytest.raises(PathNotAllowedError, match="outside the allowed roots"):
        read_image(outside, roots=[root], max_pixels=MAX)
    with pytest.raises(PathNotAllowedError):
        read_image(root / "link.png", roots=[root], max_pixels=MAX)
    with pytest.raises(PathNotAllowedError):
        resolve_under_roots(str(root / ".." / "secret.png"), [root])
    inside = root / "ok.png"
    inside.write_bytes(png(np.zeros((16, 16), np.uint8)))
    assert read_image(f"file://{inside}", roots=[root], max_pixels=MAX).shape == (16, 16, 1)
