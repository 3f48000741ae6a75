import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from encoded import png, tiff
from PIL import Image

from phenocascade.errors import (
    CorruptImageError,
    DecompressionBombError,
    PathNotAllowedError,
    UnsupportedImageError,
)
from phenocascade.imaging import (
    decode_bytes,
    decode_file,
    read_image,
    resolve_under_roots,
    tiff_pages,
)

MAX = 10_000_000


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


def test_a_file_over_the_size_cap_is_refused_unopened(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(png(np.zeros((16, 16), np.uint8)))
    size = path.stat().st_size
    assert read_image(path, roots=[tmp_path], max_pixels=MAX, max_bytes=size).shape[:2] == (16, 16)
    with pytest.raises(DecompressionBombError, match=f"file of {size} bytes exceeds max_file"):
        read_image(path, roots=[tmp_path], max_pixels=MAX, max_bytes=size - 1)


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


# ------------------------------------------------------------ multi-page and planar TIFF


def _stack(pages: np.ndarray) -> bytes:
    """A multi-page TIFF: one grey page per leading index."""
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        for page in pages:
            tw.write(page, photometric="minisblack")
    return buf.getvalue()


def _pages_16_bit(count: int = 3) -> np.ndarray:
    """``count`` uint16 pages of 12x10 px whose values tell the pages apart (and need 16 bits)."""
    return np.stack([np.full((12, 10), 1000 * (k + 1), np.uint16) for k in range(count)])


def test_multi_page_tiff_without_a_page_names_the_page_count() -> None:
    with pytest.raises(UnsupportedImageError, match=r"multi-page TIFF \(3 pages\).*as a dataset"):
        decode_bytes(_stack(_pages_16_bit()), max_pixels=MAX, what="stack.tif")


def test_page_selects_one_page_of_a_16_bit_stack(tmp_path: Path) -> None:
    pages = _pages_16_bit()
    data = _stack(pages)
    path = tmp_path / "stack.tif"
    path.write_bytes(data)
    assert tiff_pages(data) == tiff_pages(path) == 3
    for k in range(3):
        for out in (
            decode_bytes(data, max_pixels=MAX, page=k),
            decode_file(path, max_pixels=MAX, page=k),
            read_image(path, roots=[tmp_path], max_pixels=MAX, page=k),
        ):
            assert out.dtype == np.uint16 and out.shape == (12, 10, 1)
            assert np.array_equal(out[:, :, 0], pages[k])


def test_a_page_that_does_not_exist_is_refused() -> None:
    with pytest.raises(UnsupportedImageError, match="page 3 does not exist; the TIFF has 3"):
        decode_bytes(_stack(_pages_16_bit()), max_pixels=MAX, page=3)
    one_png = png(np.zeros((16, 16), np.uint8))
    assert tiff_pages(one_png) == 1
    assert decode_bytes(one_png, max_pixels=MAX, page=0).shape == (16, 16, 1)
    with pytest.raises(UnsupportedImageError, match="a PNG image has one page"):
        decode_bytes(one_png, max_pixels=MAX, page=1)


def test_planar_rgb_tiff_decodes_to_hwc() -> None:
    planes = np.stack([np.full((16, 20), v, np.uint8) for v in (10, 20, 30)])
    buf = io.BytesIO()
    tifffile.imwrite(buf, planes, photometric="rgb", planarconfig="separate")
    out = decode_bytes(buf.getvalue(), max_pixels=MAX)
    assert out.shape == (16, 20, 3)
    assert out[0, 0].tolist() == [10, 20, 30]


def _one_planar_page(planes: np.ndarray, photometric: str) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, planes, photometric=photometric, planarconfig="separate")
    with tifffile.TiffFile(io.BytesIO(buf.getvalue())) as tif:
        assert len(tif.pages) == 1  # one page holding every plane as a sample
    return buf.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        # RGB planes of 100x100 px: the old rule counted shape[:2] = 3 x 100 px.
        pytest.param(_one_planar_page(np.zeros((3, 100, 100), np.uint8), "rgb"), id="planar-rgb"),
        # 40 grey 16-bit planes stacked as samples of one 32x32 page: 80 KiB decoded.
        pytest.param(
            _one_planar_page(np.zeros((40, 32, 32), np.uint16), "minisblack"), id="stacked"
        ),
    ],
)
def test_planar_and_stacked_tiff_count_every_sample_against_the_limit(data: bytes) -> None:
    with pytest.raises(DecompressionBombError, match="exceeds the limit"):
        decode_bytes(data, max_pixels=5000)


def test_a_stack_over_the_total_limit_is_refused_even_for_one_page() -> None:
    # 16x16 uint8 pages, 256 B each; max_pixels=256 allows 8 * 256 B a page, 64 times that.
    allowed = _stack(np.zeros((512, 16, 16), np.uint8))
    assert decode_bytes(allowed, max_pixels=256, page=511).shape == (16, 16, 1)
    with pytest.raises(DecompressionBombError, match="513 pages of 256 bytes"):
        decode_bytes(_stack(np.zeros((513, 16, 16), np.uint8)), max_pixels=256, page=0)
