"""Histogram equalisation (global, batched) and CLAHE against scikit-image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from skimage.exposure import equalize_adapthist, equalize_hist

from cryosift.errors import CryosiftError
from cryosift.filters import make_filter


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[:48, :48]
    blob = 4 * np.exp(-((xx - 24) ** 2 + (yy - 20) ** 2) / 60.0)
    imgs = rng.normal(size=(6, 48, 48)) * rng.uniform(0.5, 5, (6, 1, 1)) + blob
    imgs[3] = rng.exponential(size=(48, 48))  # skewed histogram
    return (imgs + rng.uniform(-100, 100, (6, 1, 1))).astype(np.float32)


@pytest.mark.parametrize("nbins", [256, 64])
def test_histeq_equals_skimage(images, nbins):
    out = make_filter("histeq", nbins=nbins)(images)
    ref = np.stack([equalize_hist(im, nbins=nbins) for im in images])
    # same bins, counts and interpolation: float rounding only, far below 1/nbins
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert out.dtype == np.float32 and out.min() > 0 and out.max() <= 1


def test_histeq_output_is_uniform(images):
    out = make_filter("histeq")(images)
    for raw, eq in zip(images, out, strict=True):
        # a pixel of bin i is mapped into [cdf[i-1], cdf[i]] while its rank/n lies in the same
        # interval, so the output's CDF is uniform to within the largest bin's share of pixels
        largest_bin = np.histogram(raw, bins=256)[0].max() / raw.size
        d_eq = stats.kstest(eq.ravel(), "uniform").statistic
        d_raw = stats.kstest((raw.ravel() - raw.min()) / np.ptp(raw), "uniform").statistic
        assert d_eq <= largest_bin + 1.0 / raw.size, (d_eq, largest_bin)
        assert d_raw > 5 * d_eq, (d_eq, d_raw)


def test_histeq_constant_image_like_skimage():
    img = np.full((1, 8, 8), 7.0, np.float32)
    np.testing.assert_allclose(make_filter("histeq")(img)[0], equalize_hist(img[0]))


@pytest.mark.parametrize(("clip", "kernel"), [(0.01, None), (0.03, 12)])
def test_clahe_equals_skimage(images, clip, kernel):
    out = make_filter("clahe", clip_limit=clip, kernel_size=kernel)(images)
    ref = np.stack([
        equalize_adapthist((im - im.min()) / (im.max() - im.min()), kernel_size=kernel,
                           clip_limit=clip)
        for im in images.astype(np.float64)
    ])
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_histogram_parameter_errors():
    with pytest.raises(CryosiftError, match="clip"):
        make_filter("clahe", clip_limit=0)
    with pytest.raises(CryosiftError, match="clip"):
        make_filter("clahe", clip_limit=2)
    with pytest.raises(CryosiftError, match="kernel_size"):
        make_filter("clahe", kernel_size=-4)
    with pytest.raises(CryosiftError, match="larger than"):
        make_filter("clahe", kernel_size=64)(np.zeros((1, 32, 32), np.float32))
    with pytest.raises(CryosiftError, match="nbins"):
        make_filter("histeq", nbins=1)
