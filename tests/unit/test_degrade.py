import numpy as np
import pytest

from phenocascade.data import degrade
from phenocascade.errors import ValidationError


def _cells(dtype: type, channels: int, top: int) -> np.ndarray:
    """Bright discs on a dim background, like nuclei in fluorescence: sharp edges to blur."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.full((256, 256), top * 0.05)
    for cy, cx in rng.integers(12, 244, size=(25, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = top
    img += rng.normal(0, top * 0.01, img.shape)
    img = np.clip(img, 0, top).astype(dtype)
    return np.repeat(img[:, :, None], channels, axis=2)


@pytest.mark.parametrize("spec", [f"{k}:{lvl}" for k in degrade.KINDS for lvl in degrade.LEVELS])
@pytest.mark.parametrize(("dtype", "channels", "top"), [(np.uint8, 1, 200), (np.uint16, 3, 4000)])
def test_same_seed_same_output_and_dtype_kept(spec, dtype, channels, top):
    img = _cells(dtype, channels, top)
    before = img.copy()
    a = degrade.apply(img, spec, seed=7)
    b = degrade.apply(img, spec, seed=7)
    assert a.dtype == img.dtype
    assert a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(img, before)  # the input is never modified


@pytest.mark.parametrize("kind", ["gaussian_noise", "poisson_noise", "motion_blur"])
def test_random_degradations_depend_on_the_seed(kind):
    img = _cells(np.uint8, 1, 200)
    assert not np.array_equal(
        degrade.apply(img, f"{kind}:severe", 1), degrade.apply(img, f"{kind}:severe", 2)
    )


def test_defocus_sharpness_falls_with_severity():
    img = _cells(np.uint16, 1, 4000)
    values = [degrade.sharpness(img)] + [
        degrade.sharpness(degrade.apply(img, f"defocus:{lvl}", 0)) for lvl in degrade.LEVELS
    ]
    assert values == sorted(values, reverse=True)
    assert values[-1] < 0.2 * values[0]


@pytest.mark.parametrize("seed", range(4))
def test_severe_motion_blur_lowers_sharpness(seed):
    # The isotropic measure keeps edges across the motion, so it drops less than for defocus.
    img = _cells(np.uint8, 3, 200)
    blurred = degrade.apply(img, "motion_blur:severe", seed)
    assert degrade.sharpness(blurred) < 0.7 * degrade.sharpness(img)


def test_overexposure_saturates_and_underexposure_darkens():
    img = _cells(np.uint8, 1, 200)
    over = degrade.apply(img, "overexposure:severe", 0)
    under = degrade.apply(img, "underexposure:severe", 0)
    assert (over == 255).mean() >= 0.45
    assert under.mean() < 0.05 * img.mean()


def test_sixteen_bit_overexposure_clips_at_the_inferred_bit_depth():
    img = _cells(np.uint16, 1, 4000)  # 12-bit data in a 16-bit container
    assert degrade.apply(img, "overexposure:severe", 0).max() == 4095


def test_severe_specs_cover_every_kind():
    assert {degrade.parse_spec(s) for s in degrade.SEVERE} == {(k, "severe") for k in degrade.KINDS}


@pytest.mark.parametrize("spec", ["defocus", "defocus:extreme", "fog:severe", ""])
def test_unknown_spec_is_refused(spec):
    with pytest.raises(ValidationError, match="unknown degradation"):
        degrade.apply(_cells(np.uint8, 1, 200), spec, 0)


def test_wrong_array_is_refused():
    with pytest.raises(ValidationError, match=r"\(H, W, C\)"):
        degrade.apply(np.zeros((8, 8), dtype=np.uint8), "defocus:mild", 0)
    with pytest.raises(ValidationError, match="uint8/uint16"):
        degrade.apply(np.zeros((8, 8, 1), dtype=np.float32), "defocus:mild", 0)


def test_sharpness_is_gain_invariant_and_zero_for_flat_images():
    img = _cells(np.uint16, 1, 1000)
    assert degrade.sharpness(img * 4) == pytest.approx(degrade.sharpness(img), rel=1e-9)
    assert degrade.sharpness(np.full((32, 32, 1), 9, dtype=np.uint8)) == 0.0
