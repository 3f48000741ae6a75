"""Read whole-slide and large microscopy images lazily, one region at a time.

A slide is a TIFF (pyramidal or OME-TIFF, its reduced levels in SubIFDs or in pages) that
is too large to decode whole, or an OME-Zarr image folder (its multiscale levels). Both
read a region of any pyramid level by decoding only the TIFF tiles (or strips), or the Zarr
chunks, that the region touches, so a worker holds a few of them in memory, never the
slide: :class:`Slide` reads TIFFs, :class:`ZarrSlide` OME-Zarr folders (with the optional
``zarr`` package, ``pip install 'phenocascade[zarr]'``); :func:`open_slide` picks one.

Only the first series' first plane is read: a slide of one grey or RGB plane per level
(axes ``YX`` or ``YXS``), 8 or 16 bits, samples stored contiguously; anything else is
refused with an :class:`~phenocascade.errors.UnsupportedImageError` that says how to
convert it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, cast

import numpy as np
import tifffile

from phenocascade.config import Settings

if TYPE_CHECKING:
    import zarr
from phenocascade.errors import (
    BadInputError,
    CorruptImageError,
    DecompressionBombError,
    UnsupportedImageError,
)

# The frame-header reader of the decoder's own JPEG check: one parser of JPEG headers.
from phenocascade.imaging import (
    _TIFF_JPEG_COMPRESSIONS,
    DECODER_ERRORS,
    Pixels,
    _jpeg_frame_size,
    resolve_under_roots,
    sniff_format,
)

# The largest TIFF segment (tile or strip) decoded while reading a region: a file stored in
# strips spanning its whole width would otherwise make every region read the whole row band.
MAX_SEGMENT_BYTES = 64 * 1024**2
_AXES = ("YX", "YXS")


@dataclass(frozen=True, slots=True)
class Level:
    """One pyramid level of a slide.

    Attributes
    ----------
    width, height : int
        Size of the level in its own pixels.
    downsample : float
        Level-0 pixels per pixel of this level (1.0 for level 0), along x.
    """

    width: int
    height: int
    downsample: float


class SlideReader(ABC):
    """An open slide, read region by region (a context manager).

    Attributes
    ----------
    path : pathlib.Path
        The slide's file or folder.
    levels : list of Level
        Its pyramid levels, level 0 (full resolution) first.
    """

    path: Path
    levels: list[Level]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @abstractmethod
    def close(self) -> None:
        """Release the slide's file."""

    @abstractmethod
    def read(self, level: int, x: int, y: int, width: int, height: int) -> Pixels:
        """Decode one region of a level, touching only the parts of the file it overlaps.

        Parameters
        ----------
        level : int
            Pyramid level, 0 is full resolution.
        x, y : int
            Top-left corner of the region, in pixels of the level.
        width, height : int
            Size of the region; it must lie inside the level.

        Returns
        -------
        numpy.ndarray
            ``(height, width, C)``, ``C`` in ``{1, 3}``, the slide's dtype.

        Raises
        ------
        UnsupportedImageError
            If the region leaves the level, or one stored segment (TIFF tile or strip,
            Zarr chunk) decodes to more than :data:`MAX_SEGMENT_BYTES`.
        CorruptImageError
            If a segment does not decode.
        """

    def level(self, index: int) -> Level:
        """Return pyramid level ``index``.

        Raises
        ------
        UnsupportedImageError
            If the slide has no such level.
        """
        if not 0 <= index < len(self.levels):
            raise UnsupportedImageError(
                f"{self.path}: pyramid level {index} does not exist; the slide has "
                f"{len(self.levels)} level(s), 0 to {len(self.levels) - 1}"
            )
        return self.levels[index]

    def _region(self, level: int, x: int, y: int, width: int, height: int) -> Level:
        """Return level ``level`` once the region is checked to lie inside it."""
        size = self.level(level)
        if min(x, y) < 0 or min(width, height) <= 0:
            raise UnsupportedImageError(
                f"{self.path}: empty or negative region {x, y, width, height}"
            )
        if x + width > size.width or y + height > size.height:
            raise UnsupportedImageError(
                f"{self.path}: region {width}x{height} at ({x}, {y}) leaves level {level} of "
                f"{size.width}x{size.height} px"
            )
        return size

    def _check_segment(self, level: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        """Refuse a level stored in segments of ``shape`` too large to read part of."""
        if math.prod(shape) * dtype.itemsize > MAX_SEGMENT_BYTES:
            raise UnsupportedImageError(
                f"{self.path}: level {level} is stored in segments of {shape} px, too large to "
                "read a region of; save the slide tiled (e.g. tifffile.imwrite(..., "
                "tile=(512, 512)), or Zarr chunks of 512 x 512)"
            )

    def thumbnail(self, max_side: int) -> tuple[Pixels, float]:
        """Return the slide downsampled so that its longer side is at most about ``max_side``.

        The smallest level whose longer side is at least ``max_side`` is read (the smallest
        level, if none is), region by region, and reduced by striding; memory stays near
        the result's size plus one region.

        Returns
        -------
        tuple of (numpy.ndarray, float)
            The pixels, ``(H, W, C)``, and level-0 pixels per thumbnail pixel.
        """
        candidates = [i for i, lv in enumerate(self.levels) if max(lv.width, lv.height) >= max_side]
        index = candidates[-1] if candidates else len(self.levels) - 1
        lv = self.levels[index]
        step = max(1, math.ceil(max(lv.width, lv.height) / max_side))
        band = max(step, (1024 // step) * step)
        rows = []
        for top in range(0, lv.height, band):
            region = self.read(index, 0, top, lv.width, min(band, lv.height - top))
            rows.append(region[::step, ::step])
        return cast(Pixels, np.concatenate(rows, axis=0)), lv.downsample * step


class Slide(SlideReader):
    """An open TIFF slide, read region by region (a context manager).

    Parameters
    ----------
    path : pathlib.Path
        A TIFF file (OME-TIFF, pyramidal TIFF or a plain tiled TIFF).

    Raises
    ------
    CorruptImageError
        If the file is not a readable TIFF.
    UnsupportedImageError
        If its first series is not one grey or RGB plane of 8 or 16 bits per sample.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
        except DECODER_ERRORS as exc:
            raise CorruptImageError(f"{path}: not a readable TIFF slide ({exc})") from exc
        try:
            self._pages = self._level_pages()
        except BaseException:
            self._tif.close()
            raise
        width0 = self._pages[0].imagewidth
        self.levels = [
            Level(p.imagewidth, p.imagelength, width0 / p.imagewidth) for p in self._pages
        ]

    def _level_pages(self) -> list[tifffile.TiffPage]:
        series = self._tif.series[0] if self._tif.series else None
        if series is None:
            raise CorruptImageError(f"{self.path}: the TIFF holds no image")
        if series.axes not in _AXES:
            raise UnsupportedImageError(
                f"{self.path}: slide axes {series.axes} (shape {series.shape}); tiling reads "
                "one grey or RGB plane per level (YX or YXS): save each channel, z-slice or "
                "time point as its own slide"
            )
        pages = []
        for level in series.levels:
            page = level.keyframe
            if page.dtype not in (np.uint8, np.uint16):
                raise UnsupportedImageError(
                    f"{self.path}: dtype {page.dtype} is not supported; convert the slide to "
                    "8- or 16-bit unsigned"
                )
            if page.samplesperpixel > 1 and page.planarconfig != tifffile.PLANARCONFIG.CONTIG:
                raise UnsupportedImageError(
                    f"{self.path}: samples stored in separate planes; save the slide with "
                    "contiguous samples (tifffile's planarconfig='contig')"
                )
            pages.append(page)
        return pages

    def close(self) -> None:
        """Close the file."""
        self._tif.close()

    def read(self, level: int, x: int, y: int, width: int, height: int) -> Pixels:
        """Decode one region of a level, touching only the TIFF tiles or strips it overlaps.

        As :meth:`SlideReader.read`.
        """
        size = self._region(level, x, y, width, height)
        page = self._pages[level]
        seg_h, seg_w = (
            (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, size.width)
        )
        seg_h = min(seg_h, size.height)
        samples, dtype = page.samplesperpixel, np.dtype(page.dtype)  # checked at open
        self._check_segment(level, (seg_h, seg_w, samples), dtype)
        out = np.zeros((height, width, samples), dtype)
        across = math.ceil(size.width / seg_w)
        handle = self._tif.filehandle
        for row in range(y // seg_h, math.ceil((y + height) / seg_h)):
            for col in range(x // seg_w, math.ceil((x + width) / seg_w)):
                index = row * across + col
                top, left = row * seg_h, col * seg_w
                segment = self._segment(page, handle, index, level)
                if segment is None:  # a segment never written reads as zeros
                    continue
                ys = slice(max(y, top), min(y + height, top + segment.shape[0]))
                xs = slice(max(x, left), min(x + width, left + segment.shape[1]))
                out[ys.start - y : ys.stop - y, xs.start - x : xs.stop - x] = segment[
                    ys.start - top : ys.stop - top, xs.start - left : xs.stop - left
                ]
        if samples == 4:  # RGBA: the alpha plane carries no signal
            out = out[:, :, :3]
        elif samples == 2:  # grey + alpha
            out = out[:, :, :1]
        return np.ascontiguousarray(out)

    def _segment(
        self, page: tifffile.TiffPage, handle: tifffile.FileHandle, index: int, level: int
    ) -> np.ndarray | None:
        """Decode segment ``index`` of ``page`` to ``(rows, columns, samples)``."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        try:
            handle.seek(offset)
            data = handle.read(count)
            self._check_frame(page, data, index, level)
            decoded, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except DECODER_ERRORS as exc:
            raise CorruptImageError(
                f"{self.path}: segment {index} of level {level} does not decode ({exc}); the "
                "file is corrupt"
            ) from exc
        if decoded is None:
            return None
        return np.asarray(decoded).reshape(decoded.shape[-3:])

    def _check_frame(self, page: tifffile.TiffPage, data: bytes, index: int, level: int) -> None:
        """Refuse a JPEG segment whose stream declares more pixels than the segment holds.

        The JPEG codec allocates what the stream's frame header says, whatever the TIFF
        declares: a forged header would be a decompression bomb.
        """
        if page.compression not in _TIFF_JPEG_COMPRESSIONS:
            return
        frame = _jpeg_frame_size(data)
        rows = page.tilelength if page.is_tiled else page.rowsperstrip
        columns = page.tilewidth if page.is_tiled else page.imagewidth
        if frame is not None and frame[0] * frame[1] > rows * columns:
            raise DecompressionBombError(
                f"{self.path}: JPEG segment {index} of level {level} declares "
                f"{frame[0]}x{frame[1]} px in a segment of {columns}x{rows}; the file is forged "
                "or corrupt"
            )


class ZarrSlide(SlideReader):
    """An open OME-Zarr image folder, read region by region (a context manager).

    Its levels are the datasets of its first ``multiscales`` entry (OME-NGFF 0.4, Zarr v2,
    or 0.5, Zarr v3), largest first. Every axis but ``y`` and ``x`` must have one element,
    except a channel axis ``c`` of 1 (grey) or 3 (read as RGB).

    Parameters
    ----------
    path : pathlib.Path
        The image's folder (``*.ome.zarr``, or the image group inside one).

    Raises
    ------
    UnsupportedImageError
        If the ``zarr`` package is not installed, or the image is not one grey or RGB
        plane of 8 or 16 bits.
    CorruptImageError
        If the folder is no readable OME-Zarr image.
    """

    _arrays: list[zarr.Array[Any]]

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            import zarr  # optional: pip install 'phenocascade[zarr]'
        except ImportError:
            raise UnsupportedImageError(
                f"{path}: reading OME-Zarr slides needs the zarr package; install it "
                "(pip install 'phenocascade[zarr]') or convert the slide to a tiled OME-TIFF"
            ) from None
        try:
            group = zarr.open_group(str(path), mode="r")
            attrs: dict[str, Any] = dict(group.attrs.asdict())
            multiscale = (attrs.get("ome") or attrs)["multiscales"][0]
            axes = [a["name"] if isinstance(a, dict) else str(a) for a in multiscale["axes"]]
            found = [group[d["path"]] for d in multiscale["datasets"]]
        except (*DECODER_ERRORS, TypeError) as exc:
            raise CorruptImageError(
                f"{path}: not a readable OME-Zarr image (multiscales metadata: {exc!r})"
            ) from exc
        self._arrays = [a for a in found if isinstance(a, zarr.Array)]
        if not found or len(self._arrays) != len(found):
            raise CorruptImageError(f"{path}: its multiscales datasets are not all Zarr arrays")
        self._axes = axes
        self._check_axes(axes, self._arrays[0].shape, np.dtype(self._arrays[0].dtype))
        x, y = axes.index("x"), axes.index("y")
        width0 = self._arrays[0].shape[x]
        self.levels = [Level(a.shape[x], a.shape[y], width0 / a.shape[x]) for a in self._arrays]

    def _check_axes(self, axes: Sequence[str], shape: Sequence[int], dtype: np.dtype[Any]) -> None:
        extra = {a: n for a, n in zip(axes, shape, strict=True) if a not in ("y", "x")}
        if not {"y", "x"} <= set(axes) or any(
            n != 1 and not (a == "c" and n == 3) for a, n in extra.items()
        ):
            raise UnsupportedImageError(
                f"{self.path}: slide axes {''.join(axes)} (shape {tuple(shape)}); tiling reads "
                "one grey or RGB plane per level: save each channel, z-slice or time point as "
                "its own slide"
            )
        if dtype not in (np.uint8, np.uint16):
            raise UnsupportedImageError(
                f"{self.path}: dtype {dtype} is not supported; convert the slide to 8- or "
                "16-bit unsigned"
            )

    def close(self) -> None:
        """Nothing to release: Zarr opens a chunk's file only while it reads it."""

    def read(self, level: int, x: int, y: int, width: int, height: int) -> Pixels:
        """Decode one region of a level, touching only the Zarr chunks it overlaps.

        As :meth:`SlideReader.read`.
        """
        self._region(level, x, y, width, height)
        array = self._arrays[level]
        self._check_segment(level, tuple(array.chunks), np.dtype(array.dtype))
        where = {"y": slice(y, y + height), "x": slice(x, x + width), "c": slice(None)}
        try:
            region = np.asarray(array[tuple(where.get(a, 0) for a in self._axes)])
        except (*DECODER_ERRORS, RuntimeError) as exc:
            raise CorruptImageError(
                f"{self.path}: level {level} region {width}x{height} at ({x}, {y}) does not "
                f"decode ({exc}); a chunk is corrupt"
            ) from exc
        kept = [a for a in self._axes if a in where]  # the order the axes came out in
        if "c" not in kept:
            region, kept = region[..., None], [*kept, "c"]
        return np.ascontiguousarray(region.transpose([kept.index(a) for a in ("y", "x", "c")]))


def is_zarr(path: Path) -> bool:
    """Whether ``path`` is a Zarr folder (v2 or v3 metadata)."""
    return path.is_dir() and any(
        (path / name).is_file() for name in ("zarr.json", ".zattrs", ".zgroup")
    )


def _open(path: Path) -> SlideReader:
    """Open a slide file (TIFF) or folder (OME-Zarr)."""
    return ZarrSlide(path) if path.is_dir() else Slide(path)


def pyramid(path: Path) -> list[tuple[int, int, float]]:
    """Return ``(width, height, downsample)`` of each level of a slide, level 0 first.

    Reads the file's header only.

    Raises
    ------
    CorruptImageError, UnsupportedImageError
        As :class:`Slide`.
    """
    with _open(path) as slide:
        return [(lv.width, lv.height, lv.downsample) for lv in slide.levels]


def open_slide(
    path: str | Path, *, roots: Sequence[Path], max_bytes: int | None = None
) -> SlideReader:
    """Open a slide that must lie under ``roots``: a TIFF file, or an OME-Zarr folder.

    Parameters
    ----------
    path : str or pathlib.Path
        The file or folder, or a ``file://`` URI.
    roots : sequence of pathlib.Path
        Folders the resolved path must lie under (``PHENOCASCADE_ALLOWED_ROOTS``).
    max_bytes : int or None, default None
        Largest accepted file size (``PHENOCASCADE_MAX_FILE_BYTES``); ``None``: no cap.

    Raises
    ------
    PathNotAllowedError, CorruptImageError, UnsupportedImageError, DecompressionBombError
        As :func:`~phenocascade.imaging.resolve_under_roots`, :class:`Slide` and
        :class:`ZarrSlide`; a file over ``max_bytes`` is refused unopened (a Zarr folder's
        chunks are bounded by :data:`MAX_SEGMENT_BYTES` instead).
    """
    resolved = resolve_under_roots(path, roots)
    try:
        size = resolved.stat().st_size
    except OSError as exc:
        raise CorruptImageError(f"{path}: cannot be read ({exc.strerror})") from exc
    if max_bytes is not None and size > max_bytes and not resolved.is_dir():
        raise DecompressionBombError(
            f"{path}: file of {size} bytes exceeds max_file_bytes={max_bytes}; raise "
            "PHENOCASCADE_MAX_FILE_BYTES if such slides are expected"
        )
    return _open(resolved)


def read_tile(uri: str | None, tile: Mapping[str, Any], *, settings: Settings, what: str) -> Pixels:
    """Read one tile of a slide: only the slide's segments under the tile.

    Parameters
    ----------
    uri : str or None
        The slide's path or ``file://`` URI (an ``ImageSubmitted``'s ``uri``).
    tile : Mapping
        The submission's ``tile`` record: ``level``, ``x``, ``y``, ``width``, ``height``.
    settings : Settings
        The allowed roots and the limits: a file over ``max_file_bytes``, or a tile over
        ``max_image_pixels`` (the decode limit of one image), is refused.
    what : str
        Names the tile in errors (its image id).

    Raises
    ------
    BadInputError
        Any reason the tile cannot be read (the subclasses of :func:`open_slide` and
        :meth:`Slide.read`), its message starting with ``tile <what>:``.
    """
    max_pixels = settings.max_image_pixels
    try:
        if uri is None:
            raise CorruptImageError("no uri of its slide")
        if tile["width"] * tile["height"] > max_pixels:
            raise DecompressionBombError(
                f"{tile['width']}x{tile['height']} px exceed the limit of {max_pixels} pixels; "
                "submit the slide with a smaller --tile-size"
            )
        with open_slide(uri, roots=settings.roots(), max_bytes=settings.max_file_bytes) as slide:
            return slide.read(tile["level"], tile["x"], tile["y"], tile["width"], tile["height"])
    except BadInputError as exc:  # a dead letter names the slide: name the tile
        raise type(exc)(f"tile {what}: {exc}") from exc


def is_slide(path: Path, *, max_pixels: int) -> bool:
    """Whether ``path`` is a slide to tile: a pyramidal or large TIFF, or a Zarr folder.

    A TIFF is a slide when it has a pyramid or more than ``max_pixels``. Reads the file's
    header only. Any other file (PNG, JPEG, a small flat TIFF, or one that does not open)
    is an ordinary image, scored whole.
    """
    if is_zarr(path):
        return True
    try:
        with path.open("rb") as handle:
            if sniff_format(handle.read(8)) != "tiff":
                return False
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            page = series.levels[0].keyframe
            return len(series.levels) > 1 or page.imagewidth * page.imagelength > max_pixels
    except (*DECODER_ERRORS, CorruptImageError):
        return False
