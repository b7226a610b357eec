"""Real-space filters: Gaussian and median against scipy, bilateral against its definition and
scikit-image, and the bilateral's edge preservation."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from skimage.restoration import denoise_bilateral

from cryosift.errors import CryosiftError
from cryosift.filters import bilateral_filter, estimate_noise_sigma, make_filter


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(1)
    return (rng.normal(size=(5, 40, 40)) * 3 + 10).astype(np.float32)


@pytest.mark.parametrize("sigma", [0.6, 1.0, 2.5, 9.0])
def test_gaussian_equals_scipy(images, sigma):
    out = make_filter("gaussian", sigma_px=sigma)(images)
    ref = ndi.gaussian_filter(images.astype(np.float64), sigma=(0, sigma, sigma))
    # float32 FFT of values ~10: rounding ~1e-6 relative
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max())


def test_gaussian_large_box_falls_back_to_scipy():
    img = np.random.default_rng(2).normal(size=(1, 520, 520)).astype(np.float32)
    out = make_filter("gaussian", sigma_px=1.5)(img)
    np.testing.assert_allclose(out, ndi.gaussian_filter(img, sigma=(0, 1.5, 1.5)), atol=1e-6)


@pytest.mark.parametrize("size", [3, 5])
def test_median_equals_scipy(images, size):
    out = make_filter("median", size_px=size)(images)
    np.testing.assert_array_equal(out, ndi.median_filter(images, size=(1, size, size)))


def test_median_3_exact_with_ties():
    rng = np.random.default_rng(5)
    imgs = rng.integers(0, 4, size=(6, 17, 17)).astype(np.float32)  # many equal values
    out = make_filter("median", size_px=3)(imgs)
    np.testing.assert_array_equal(out, ndi.median_filter(imgs, size=(1, 3, 3)))


def test_spatial_parameter_errors():
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(CryosiftError, match="positive"):
            make_filter("gaussian", sigma_px=bad)
    with pytest.raises(CryosiftError, match="odd"):
        make_filter("median", size_px=4)
    with pytest.raises(CryosiftError, match=">= 3"):
        make_filter("median", size_px=1)
    with pytest.raises(CryosiftError, match=">= 3"):
        make_filter("median", size_px=-3)
    with pytest.raises(CryosiftError, match="positive"):
        make_filter("bilateral", sigma_spatial_px=0)
    with pytest.raises(CryosiftError, match="positive"):
        make_filter("bilateral", sigma_range=-1)
    with pytest.raises(CryosiftError, match="odd"):
        make_filter("bilateral", window_px=6)


# ------------------------------------------------------------------------------------- bilateral


def _bilateral_reference(
    img: np.ndarray, sigma_s: float, sigma_r: float, radius: int
) -> np.ndarray:
    """The definition, directly: float64, numpy 'reflect' padding, square window."""
    x = img.astype(np.float64)
    n_rows, n_cols = x.shape
    p = np.pad(x, radius, mode="reflect")
    num = np.zeros_like(x)
    den = np.zeros_like(x)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            nb = p[radius + dy : radius + dy + n_rows, radius + dx : radius + dx + n_cols]
            w = np.exp(-(dy * dy + dx * dx) / (2 * sigma_s**2) - (nb - x) ** 2 / (2 * sigma_r**2))
            num += w * nb
            den += w
    return num / den


@pytest.mark.parametrize(("sigma_s", "window"), [(2.0, None), (1.2, 7), (0.8, 5)])
def test_bilateral_matches_definition(images, sigma_s, window):
    filt = make_filter("bilateral", sigma_spatial_px=sigma_s, sigma_range=1.5, window_px=window)
    out = filt(images)
    sigma_r = 1.5 * estimate_noise_sigma(images).numpy()
    radius = filt.window_px // 2
    ref = np.stack([
        _bilateral_reference(im, sigma_s, s, radius)
        for im, s in zip(images, sigma_r, strict=True)
    ])
    # float32 arithmetic on values ~10 with ~170 terms: ~1e-5 relative
    np.testing.assert_allclose(out, ref, atol=1e-4 * np.abs(ref).max())


def test_bilateral_default_window():
    assert make_filter("bilateral").window_px == 13  # 2 * ceil(3 * 2) + 1
    assert make_filter("bilateral", sigma_spatial_px=0.5).window_px == 5  # skimage's minimum


def test_bilateral_matches_skimage_range_kernel_and_padding(images):
    """skimage with a flat spatial kernel (its spatial lookup table is mis-indexed in 0.26,
    see cryosift.filters.bilateral) tests the range weights and the boundary handling.

    skimage needs non-negative images (images are shifted to min 0 — the filter is shift
    invariant) and quantises colour distances to bins of width Δ = max/bins; that changes each
    log-weight by at most max·Δ/σ_r², i.e. each weight by a factor within 1 ± ε, which moves a
    weighted mean of values spanning `max` by at most ~2ε·max.
    """
    sigma_s, window, bins = 1e4, 7, 1_000_000
    x = (images - images.min(axis=(1, 2), keepdims=True)).astype(np.float64)
    sigma_r = estimate_noise_sigma(x).numpy().astype(np.float64) * 1.5
    out = bilateral_filter(x, sigma_s, sigma_r, window // 2).numpy()
    for img, o, s in zip(x, out, sigma_r, strict=True):
        ref = denoise_bilateral(
            img, win_size=window, sigma_color=float(s), sigma_spatial=sigma_s, bins=bins,
            mode="reflect",
        )
        top = img.max()
        eps = top * (top / bins) / s**2
        assert np.abs(o - ref).max() <= 2 * eps * top + 1e-4
        assert np.corrcoef(o.ravel(), ref.ravel())[0, 1] > 0.9999


def test_bilateral_preserves_edges_better_than_gaussian():
    rng = np.random.default_rng(7)
    n, noise = 64, 0.2
    clean = np.zeros((8, n, n), np.float32)
    clean[:, :, n // 2 :] = 1.0  # vertical step edge between columns 31 and 32
    noisy = clean + rng.normal(scale=noise, size=clean.shape).astype(np.float32)
    bil = make_filter("bilateral", sigma_spatial_px=2.0, sigma_range=1.0)(noisy)
    gau = make_filter("gaussian", sigma_px=2.0)(noisy)

    def step(img: np.ndarray) -> float:
        """Jump of the row-averaged profile across the edge (1.0 for a perfect edge)."""
        prof = img.mean(axis=(0, 1))
        return float(prof[n // 2] - prof[n // 2 - 1])

    def flat_rms(img: np.ndarray) -> float:
        """Residual noise away from the edge and the image border."""
        return float((img - clean)[:, 4:-4, 4:24].std())

    assert step(bil) > 0.8 and step(gau) < 0.3, (step(bil), step(gau))
    # σ_r = 1 noise σ averages neighbours that differ by ~noise (weights ~exp(-1)): a moderate
    # reduction; a wider range kernel smooths more and still keeps a 5σ edge
    assert flat_rms(bil) < 0.7 * flat_rms(noisy), (flat_rms(bil), flat_rms(noisy))
    wide = make_filter("bilateral", sigma_spatial_px=2.0, sigma_range=2.0)(noisy)
    assert flat_rms(wide) < 0.5 * flat_rms(noisy) and step(wide) > 0.7, (
        flat_rms(wide), step(wide))


def test_noise_estimate_on_white_noise_with_smooth_signal():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:64, :64]
    smooth = 5 * np.exp(-((xx - 32) ** 2 + (yy - 32) ** 2) / 200.0) + 0.05 * xx
    imgs = smooth + rng.normal(scale=0.7, size=(20, 64, 64))
    est = estimate_noise_sigma(torch.as_tensor(imgs, dtype=torch.float32)).numpy()
    # the median of |M*I| over ~3800 pixels: a few % sampling error per image
    np.testing.assert_allclose(est.mean(), 0.7, rtol=0.03)


def test_bilateral_constant_image_unchanged():
    img = np.full((2, 16, 16), 3.25, np.float32)
    np.testing.assert_allclose(make_filter("bilateral")(img), img, rtol=1e-5)
