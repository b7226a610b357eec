"""RELION-style normalisation (against its definition and, when installed, relion_preprocess)
and contrast inversion."""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest

from cryosift.errors import CryosiftError
from cryosift.filters import make_filter
from cryosift.filters.normalize import background_mask, default_bg_radius

BOX = 48


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Noise with a particle-like blob, a background ramp and an offset, different per image."""
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    out = []
    for i in range(6):
        ramp = rng.normal() * 0.05 * xx + rng.normal() * 0.05 * yy
        blob = 3 * np.exp(-(xx**2 + yy**2) / 40.0)
        out.append(rng.normal(scale=rng.uniform(0.5, 3), size=(BOX, BOX)) + ramp + blob + 20 * i)
    return np.asarray(out, dtype=np.float32)


def _bg(img: np.ndarray, radius: float) -> np.ndarray:
    return img[background_mask(img.shape[-1], radius)]


@pytest.mark.parametrize("ramp", [True, False])
@pytest.mark.parametrize("radius", [None, 20.0, 10.5])
def test_background_mean_zero_std_one(images, ramp, radius):
    out = make_filter("normalize", radius_px=radius, ramp=ramp)(images)
    r = default_bg_radius(BOX) if radius is None else radius
    for img in out:
        bg = _bg(img.astype(np.float64), r)
        assert abs(bg.mean()) < 1e-5
        assert abs(bg.std() - 1.0) < 1e-5


def test_default_radius_is_relions():
    assert default_bg_radius(48) == 18  # ROUND(0.375 * 48)
    assert default_bg_radius(100) == 38  # 37.5 rounds half away from zero, as RELION's ROUND
    assert default_bg_radius(128) == 48


def test_mask_geometry():
    m = background_mask(8, 3)
    # pixel (row 4, col 4) is the centre (box//2); (4, 7) is 3 px away: not background (> r only)
    assert not m[4, 4] and not m[4, 7] and m[0, 0] and m[4, 0]


def test_ramp_is_removed(images):
    out = make_filter("normalize", ramp=True)(images)
    c = np.arange(BOX) - BOX // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    mask = background_mask(BOX, default_bg_radius(BOX))
    design = np.stack([xx[mask], yy[mask], np.ones(mask.sum())], axis=1)
    for img in out:
        coef = np.linalg.lstsq(design, img[mask].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(coef, 0.0, atol=1e-5)


def test_invert_and_normalize_invert(images):
    plain = make_filter("normalize")(images)
    inverted = make_filter("normalize", invert=True)(images)
    np.testing.assert_allclose(inverted, -plain, atol=1e-6)
    np.testing.assert_array_equal(make_filter("invert")(images), -images)


def test_normalize_refuses_bad_radius():
    with pytest.raises(CryosiftError, match="larger than half"):
        make_filter("normalize", radius_px=30)(np.zeros((1, BOX, BOX), np.float32))
    with pytest.raises(CryosiftError, match=">= 0"):
        make_filter("normalize", radius_px=-2)


def test_flat_background_is_not_scaled():
    img = np.zeros((1, 16, 16), np.float32)
    img[0, 8, 8] = 5.0  # only the centre is non-zero: background σ = 0
    np.testing.assert_array_equal(make_filter("normalize")(img), img)


@pytest.mark.skipif(shutil.which("relion_preprocess") is None, reason="RELION not installed")
@pytest.mark.parametrize("ramp", [True, False])
def test_matches_relion_preprocess(tmp_path, images, ramp):
    stack = tmp_path / "in.mrcs"
    with mrcfile.new(stack) as m:
        m.set_data(images)
        m.set_image_stack()
        m.voxel_size = 2.0
    cmd = ["relion_preprocess", "--operate_on", str(stack), "--operate_out",
           str(tmp_path / "relion.mrcs"), "--norm", "--bg_radius", "18"]
    if not ramp:
        cmd.append("--no_ramp")
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    relion = mrcfile.read(tmp_path / "relion.mrcs")
    ours = make_filter("normalize", ramp=ramp)(images)  # default radius: ROUND(0.375 * 48) = 18
    # RELION works in double and stores float32, as we do: float32 rounding only
    np.testing.assert_allclose(ours, relion, atol=1e-5)
