"""The classical focus measure (power log-log slope)."""

from __future__ import annotations

import numpy as np
import pytest

from phenocascade.data.degrade import apply
from phenocascade.models.focus import power_log_log_slope, radial_power_spectrum


def _spots(seed: int, size: int = 256) -> np.ndarray:
    """Bright sharp-edged disks on a dark background, like nuclei, ``(size, size, 1)`` uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size), 10.0)
    for cy, cx, r in zip(
        rng.uniform(0, size, 40), rng.uniform(0, size, 40), rng.uniform(3, 9, 40), strict=True
    ):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 200.0
    return img.astype(np.uint8)[:, :, None]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blur_makes_the_slope_steeper(seed: int) -> None:
    sharp = _spots(seed)
    blurred = apply(sharp, "defocus:severe", seed=0)
    assert power_log_log_slope(blurred) < power_log_log_slope(sharp) - 1.0


def test_slope_of_a_known_power_law() -> None:
    # A field whose Fourier amplitude is |f|**-1.5 has power |f|**-3; ring sums add the
    # ring circumference (~ 2 pi r), so the ring power falls as r**-2.
    size = 256
    f = np.fft.fftfreq(size) * size
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    radius[0, 0] = 1.0
    phases = np.exp(2j * np.pi * np.random.default_rng(0).random((size, size)))
    field = np.real(np.fft.ifft2(radius**-1.5 * phases))
    assert power_log_log_slope(field) == pytest.approx(-2.0, abs=0.25)


def test_slope_is_invariant_to_gain_and_flat_images_give_zero() -> None:
    img = _spots(3).astype(np.float64)
    assert power_log_log_slope(img * 7.0 + 3.0) == pytest.approx(power_log_log_slope(img))
    assert power_log_log_slope(np.full((64, 64), 5.0)) == 0.0
    radii, _, _ = radial_power_spectrum(np.random.default_rng(0).random((20, 20)))
    assert radii.size == 0
