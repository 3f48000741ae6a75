"""Turn decoded microscopy pixels into network inputs.

Every backend sees the same conversion: grey becomes three identical channels, ``uint8`` is
divided by 255 and ``uint16`` is scaled per image between its 0.5th and 99.5th percentiles
(16-bit microscopy rarely uses its full range, so a fixed divisor would give near-black
inputs). Results are ``float32`` in ``[0, 1]``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812

FloatImage = npt.NDArray[np.float32]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_rgb(pixels: npt.NDArray[np.uint8] | npt.NDArray[np.uint16]) -> FloatImage:
    """Convert ``(H, W, C)`` ``uint8``/``uint16`` pixels to ``(H, W, 3)`` ``float32`` in [0, 1].

    Parameters
    ----------
    pixels : numpy.ndarray
        Shape ``(H, W, C)`` with ``C`` in {1, 3}, or ``(H, W)``; dtype ``uint8`` or ``uint16``.

    Returns
    -------
    numpy.ndarray
        Shape ``(H, W, 3)``, dtype ``float32``, values in ``[0, 1]``.

    Raises
    ------
    ValueError
        If the dtype or channel count is not supported.
    """
    arr = pixels[:, :, None] if pixels.ndim == 2 else pixels
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ValueError(f"expected (H, W, 1|3) pixels, got shape {pixels.shape}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.uint16:
        lo, hi = np.percentile(arr, (0.5, 99.5))
        scale = float(hi - lo) if hi > lo else 1.0
        out = np.clip((arr.astype(np.float32) - float(lo)) / scale, 0.0, 1.0)
    else:
        raise ValueError(f"expected uint8 or uint16 pixels, got {arr.dtype}")
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.float32)


def to_chw(image: FloatImage) -> torch.Tensor:
    """Return a ``(3, H, W)`` ``float32`` tensor from an ``(H, W, 3)`` array."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a ``(3, H, W)`` tensor to ``(3, size, size)`` with antialiasing.

    The aspect ratio is not kept: image-level labels (density, nucleus size class) depend
    on the whole field of view, which a crop would cut.
    """
    return F.interpolate(
        image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )[0]


def pad_to_min(image: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect-pad a ``(3, H, W)`` tensor so both sides are at least ``size``."""
    _, h, w = image.shape
    pad_h, pad_w = max(0, size - h), max(0, size - w)
    if pad_h == 0 and pad_w == 0:
        return image
    # Reflection needs the pad to be smaller than the side; tiny images fall back to edge.
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(image[None], (0, pad_w, 0, pad_h), mode=mode)[0]


def grid_crops(image: torch.Tensor, size: int, per_side: int) -> torch.Tensor:
    """Cut up to ``per_side**2`` evenly spaced ``size`` x ``size`` crops at native resolution.

    Parameters
    ----------
    image : torch.Tensor
        Shape ``(3, H, W)``.
    size : int
        Crop side in pixels.
    per_side : int
        Crops along each axis; fewer when the image is too small for distinct crops.

    Returns
    -------
    torch.Tensor
        Shape ``(n, 3, size, size)``.
    """
    image = pad_to_min(image, size)
    _, h, w = image.shape
    ys = np.unique(np.linspace(0, h - size, per_side).round().astype(int))
    xs = np.unique(np.linspace(0, w - size, per_side).round().astype(int))
    return torch.stack([image[:, y : y + size, x : x + size] for y in ys for x in xs])


def random_crops(
    image: torch.Tensor, size: int, count: int, rng: np.random.Generator
) -> torch.Tensor:
    """Cut ``count`` random ``size`` x ``size`` crops; returns ``(count, 3, size, size)``."""
    image = pad_to_min(image, size)
    _, h, w = image.shape
    ys = rng.integers(0, h - size + 1, count)
    xs = rng.integers(0, w - size + 1, count)
    return torch.stack([image[:, y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])


def augment_batch(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Randomly flip and rotate by multiples of 90 degrees a ``(N, C, S, S)`` batch.

    Microscopy has no preferred orientation, so the eight dihedral transforms keep labels.
    """
    out = batch.clone()
    flips = torch.rand(len(out), 2, generator=generator) < 0.5
    turns = torch.randint(0, 4, (len(out),), generator=generator)
    for i in range(len(out)):
        img = out[i]
        if flips[i, 0]:
            img = img.flip(-1)
        if flips[i, 1]:
            img = img.flip(-2)
        out[i] = torch.rot90(img, int(turns[i]), dims=(-2, -1))
    return out


def normalize(batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Subtract ``mean`` and divide by ``std`` per channel of an ``(N, 3, H, W)`` batch."""
    m = torch.tensor(mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
    return (batch - m) / s
