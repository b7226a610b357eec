"""The fast bilateral filter (flat shifted layout, ± offset pairs sharing one range weight,
pre-scaled images) against a direct float64 evaluation of the definition on random images.

The straightforward definition: out(p) = Σ_o w(p, p+o) I(p+o) / Σ_o w(p, p+o) over all (2r+1)²
offsets of the square window, w = exp(-|o|²/(2σ_s²) - (I(p+o) - I(p))²/(2σ_r²)), numpy 'reflect'
padding. The fast path only reorders float32 arithmetic, so it must agree to float32 rounding:
each weight's exponent carries a relative error of a few 1e-7 (≲ 1e-5 absolute for exponents
up to ~40), and the weighted mean of values of magnitude M moves by at most ~1e-5 · M.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosift.filters import bilateral as bilateral_module
from cryosift.filters import bilateral_filter, estimate_noise_sigma, make_filter


def _definition(images: np.ndarray, sigma_s: float, sigma_r: np.ndarray, r: int) -> np.ndarray:
    """Every offset of the window, float64, vectorised over the batch only."""
    x = images.astype(np.float64)
    _, n_rows, n_cols = x.shape
    p = np.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")
    sr = np.asarray(sigma_r, dtype=np.float64).reshape(-1, 1, 1)
    inv = np.where(sr > 0, 1.0 / (2.0 * np.where(sr > 0, sr, 1.0) ** 2), 0.0)
    num = np.zeros_like(x)
    den = np.zeros_like(x)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            nb = p[:, r + dy : r + dy + n_rows, r + dx : r + dx + n_cols]
            w = np.exp(-(dy * dy + dx * dx) / (2.0 * sigma_s**2) - (nb - x) ** 2 * inv)
            num += w * nb
            den += w
    return num / den


def _tolerance(ref: np.ndarray) -> float:
    return 1e-5 * float(np.abs(ref).max()) + 1e-6


@pytest.mark.parametrize(
    ("shape", "sigma_s", "radius", "rel_sigma_r"),
    [
        ((7, 64, 64), 2.0, 6, 1.0),  # the seed-000 default at the 64 px working box
        ((50, 32, 32), 1.0, 3, 1.0),  # crosses a sub-batch boundary (45 images at 32 px)
        ((5, 48, 48), 1.5, 5, 1.5),
        ((4, 23, 37), 1.2, 4, 0.7),  # rectangular, odd sizes
        ((3, 9, 9), 2.0, 6, 1.0),  # window wider than the image: reflection wraps
        ((3, 16, 16), 0.8, 2, 0.2),  # narrow range kernel: strongly edge-preserving
    ],
)
def test_fast_path_equals_definition(shape, sigma_s, radius, rel_sigma_r):
    rng = np.random.default_rng(sum(shape) + radius)
    imgs = (rng.normal(size=shape) * 3 + 10).astype(np.float32)
    imgs[:, : shape[1] // 2] += 4.0  # an edge
    sigma_r = rel_sigma_r * estimate_noise_sigma(imgs).numpy()
    out = bilateral_filter(imgs, sigma_s, sigma_r, radius, workers=1).numpy()
    ref = _definition(imgs, sigma_s, sigma_r, radius)
    assert out.dtype == np.float32 and out.shape == imgs.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=_tolerance(ref))


def test_zero_range_sigma_is_a_gaussian_and_tiny_sigma_keeps_the_image():
    rng = np.random.default_rng(3)
    imgs = rng.normal(size=(4, 20, 20)).astype(np.float32)
    sigma_r = np.array([0.0, 1e-6, 0.5, 0.0], dtype=np.float32)
    out = bilateral_filter(imgs, 1.5, sigma_r, 4, workers=1).numpy()
    ref = _definition(imgs, 1.5, sigma_r, 4)  # σ_r = 0: flat range kernel
    np.testing.assert_allclose(out, ref, rtol=0, atol=_tolerance(ref))
    # every neighbour's weight underflows to 0 (near the border, reflection brings the pixel
    # itself into its window at full range weight)
    np.testing.assert_array_equal(out[1, 4:-4, 4:-4], imgs[1, 4:-4, 4:-4])
    const = np.full((2, 12, 12), 3.25, np.float32)
    np.testing.assert_allclose(bilateral_filter(const, 2.0, 0.0, 6).numpy(), const, rtol=1e-5)


def test_sub_batches_and_threads_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(4)
    imgs = rng.normal(size=(13, 24, 24)).astype(np.float32)
    sigma_r = estimate_noise_sigma(imgs)
    whole = bilateral_filter(imgs, 2.0, sigma_r, 6, workers=1)
    two = bilateral_filter(imgs, 2.0, sigma_r, 6, workers=2)
    monkeypatch.setattr(bilateral_module, "_SUB_BATCH_PIXELS", 1)  # one image per sub-batch
    single = bilateral_filter(imgs, 2.0, sigma_r, 6, workers=1)
    # images are independent and each is computed by the same operations in the same order
    torch.testing.assert_close(two, whole, rtol=0, atol=0)
    torch.testing.assert_close(single, whole, rtol=0, atol=0)


def test_filter_class_uses_the_fast_path_with_its_defaults():
    rng = np.random.default_rng(5)
    imgs = (rng.normal(size=(6, 64, 64)) + 2).astype(np.float32)
    out = make_filter("bilateral")(imgs)  # σ_s = 2 px, σ_r = 1 noise σ, 13 px window
    ref = _definition(imgs, 2.0, estimate_noise_sigma(imgs).numpy(), 6)
    np.testing.assert_allclose(out, ref, rtol=0, atol=_tolerance(ref))
