"""A classical focus measure: the power log-log slope (CellProfiler's ``PowerLogLogSlope``).

The radially summed power spectrum of a natural image falls off roughly as a power of the
spatial frequency; defocus removes high frequencies, so the slope of ``log(power)`` against
``log(frequency)`` becomes steeper (more negative). This is the measure of CellProfiler's
MeasureImageQuality module (Bray et al., J. Biomol. Screen. 2012), following its
``centrosome.radial_power_spectrum.rps``: the image is made intensity-invariant by dividing
by its median absolute deviation from the mean, the DC term and the first ring are
skipped, and only radii up to an eighth of the shorter side are used (to stay clear of
edge effects). It needs no training, so it is the baseline beside the learned gate.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def radial_power_spectrum(
    grey: npt.ArrayLike,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Sum the FFT magnitude and power over rings of integer radius.

    Parameters
    ----------
    grey : array_like
        ``(H, W)`` image of any numeric dtype.

    Returns
    -------
    radii, magnitude, power : numpy.ndarray
        Ring radii ``2 .. floor(min(H, W) / 8) - 1`` (``int64``, in frequency bins, the
        ring of radius ``r`` holds frequencies with ``floor(|f|) + 1 == r``), and per ring
        the summed magnitude and power (``float64``). All three are empty when the image
        is smaller than 24 pixels on a side.
    """
    img = np.asarray(grey, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"radial_power_spectrum needs an (H, W) image, got shape {img.shape}")
    h, w = img.shape
    radii2 = np.arange(h)[:, None] ** 2 + np.arange(w)[None, :] ** 2
    # Frequencies wrap around in an unshifted FFT: fold each axis onto its distance from 0.
    radii2 = np.minimum(radii2, np.flipud(radii2))
    radii2 = np.minimum(radii2, np.fliplr(radii2))
    if np.ptp(img) > 0:
        spread = float(np.median(np.abs(img - img.mean())))
        if spread > 0:
            img = img / spread
    magnitude = np.abs(np.fft.fft2(img - img.mean()))
    ring = (np.floor(np.sqrt(radii2)).astype(np.int64) + 1).ravel()
    labels = np.arange(2, int(np.floor(min(h, w) / 8.0)), dtype=np.int64)
    if labels.size == 0:
        return labels, np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.float64)
    size = int(labels[-1]) + 1
    mag_sum = np.bincount(ring, weights=magnitude.ravel(), minlength=size)[:size]
    power_sum = np.bincount(ring, weights=(magnitude**2).ravel(), minlength=size)[:size]
    return labels, mag_sum[labels].astype(np.float64), power_sum[labels].astype(np.float64)


def power_log_log_slope(pixels: npt.ArrayLike) -> float:
    """Return the slope of log power against log frequency (higher is sharper).

    Parameters
    ----------
    pixels : array_like
        ``(H, W)`` or ``(H, W, C)`` image of any numeric dtype; channels are averaged.

    Returns
    -------
    float
        The least-squares slope over the rings of :func:`radial_power_spectrum` with
        positive power; ``0.0`` for a flat image or one too small to have two rings
        (CellProfiler's value in those cases).
    """
    arr = np.asarray(pixels, dtype=np.float64)
    grey = arr.mean(axis=2) if arr.ndim == 3 else arr
    if np.ptp(grey) == 0:
        return 0.0
    radii, magnitude, power = radial_power_spectrum(grey)
    valid = (magnitude > 0) & (power > 0)
    if valid.sum() < 2:
        return 0.0
    x, y = np.log(radii[valid]), np.log(power[valid])
    slope, _ = np.polyfit(x, y, 1)
    return float(slope)
