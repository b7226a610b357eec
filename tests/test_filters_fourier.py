"""Fourier low-pass / high-pass filters: transfer functions measured on white noise, units and
errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryosift.errors import CryosiftError
from cryosift.filters import BatchContext, make_filter
from cryosift.metrics.image import psnr

BOX = 64


@pytest.fixture(scope="module")
def white_noise() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(200, BOX, BOX)).astype(np.float32)


def _radius_px(n: int) -> np.ndarray:
    """|k| in Fourier pixels on the rfft2 grid."""
    ky = np.fft.fftfreq(n, 1.0 / n)[:, None]
    kx = np.fft.rfftfreq(n, 1.0 / n)[None, :]
    return np.hypot(kx, ky)


def _measured_gain(inp: np.ndarray, out: np.ndarray) -> np.ndarray:
    """sqrt(<|F_out|^2> / <|F_in|^2>) per rfft2 frequency, averaged over the stack."""
    fi = np.fft.rfft2(inp.astype(np.float64))
    fo = np.fft.rfft2(out.astype(np.float64))
    return np.sqrt((np.abs(fo) ** 2).mean(0) / (np.abs(fi) ** 2).mean(0))


def _ring(gain: np.ndarray, lo: float, hi: float) -> np.ndarray:
    k = _radius_px(gain.shape[0])
    return gain[(k >= lo) & (k < hi)]


# cutoff at 1/4 of Nyquist = 8 Fourier pixels on a 64 box: grid points (0, 8) and (8, 0) lie on it
KC_FRAC, KC_PX = 0.25, 8.0


@pytest.mark.parametrize(
    ("kind", "at_cutoff"), [("gaussian", 0.5), ("butterworth", 1 / math.sqrt(2)), ("hard", 1.0)]
)
def test_lowpass_gain_at_cutoff(white_noise, kind, at_cutoff):
    out = make_filter("lowpass", cutoff_frac=KC_FRAC, kind=kind)(white_noise)
    gain = _measured_gain(white_noise, out)
    on_cutoff = gain[np.isclose(_radius_px(BOX), KC_PX)]
    assert on_cutoff.size >= 2
    np.testing.assert_allclose(on_cutoff, at_cutoff, rtol=0.02)


@pytest.mark.parametrize("kind", ["gaussian", "butterworth", "hard"])
def test_lowpass_keeps_below_removes_above(white_noise, kind):
    out = make_filter("lowpass", cutoff_frac=KC_FRAC, kind=kind)(white_noise)
    gain = _measured_gain(white_noise, out)
    low, high = _ring(gain, 0, KC_PX / 2), _ring(gain, 2 * KC_PX, np.inf)
    # Gaussian: H(kc/2) = 0.5**0.25 = 0.84, H(2kc) = 0.5**4; Butterworth order 8: 1/sqrt(1+4^-8)
    # and 1/sqrt(1+2^16)
    expected_low = {"gaussian": 0.5**0.25, "butterworth": 0.9999, "hard": 1.0}[kind]
    expected_high = {"gaussian": 0.5**4, "butterworth": 2.0**-8, "hard": 0.0}[kind]
    assert low.min() >= expected_low * 0.999
    assert high.max() <= expected_high * 1.001 + 1e-6


@pytest.mark.parametrize(
    ("kind", "at_cutoff"), [("gaussian", 0.5), ("butterworth", 1 / math.sqrt(2)), ("hard", 0.0)]
)
def test_highpass_gain(white_noise, kind, at_cutoff):
    out = make_filter("highpass", cutoff_frac=KC_FRAC, kind=kind)(white_noise)
    gain = _measured_gain(white_noise, out)
    on_cutoff = gain[np.isclose(_radius_px(BOX), KC_PX)]
    np.testing.assert_allclose(on_cutoff, at_cutoff, rtol=0.02, atol=1e-6)
    assert gain[0, 0] < 1e-6  # the mean is removed
    assert _ring(gain, 3 * KC_PX, np.inf).min() > 0.99
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-5)


def test_cutoff_in_angstrom_matches_fraction_of_nyquist(white_noise):
    px = 2.5  # Nyquist 5 Å: a 20 Å cutoff is a quarter of Nyquist
    ctx = BatchContext(pixel_size=px)
    for kind in ("gaussian", "butterworth", "hard"):
        a = make_filter("lowpass", cutoff_A=20.0, kind=kind)(white_noise[:10], ctx)
        b = make_filter("lowpass", cutoff_frac=0.25, kind=kind)(white_noise[:10], ctx)
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_lowpass_raises_psnr_on_smooth_signal():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:BOX, :BOX]
    clean = np.zeros((20, BOX, BOX))
    for i in range(20):
        for _ in range(4):
            cx, cy, w = rng.uniform(16, 48), rng.uniform(16, 48), rng.uniform(3, 6)
            clean[i] += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w * w))
    noisy = (clean + rng.normal(scale=0.3, size=clean.shape)).astype(np.float32)
    out = make_filter("lowpass", cutoff_frac=0.2)(noisy)
    before, after = psnr(noisy, clean).mean(), psnr(out, clean).mean()
    assert after > before + 6.0, (before, after)


def test_lowpass_refuses_beyond_nyquist_and_bad_parameters():
    f = make_filter("lowpass", cutoff_A=4.0)
    with pytest.raises(CryosiftError, match="Nyquist"):
        f(np.zeros((1, 16, 16), np.float32), BatchContext(pixel_size=2.5))
    f(np.zeros((1, 16, 16), np.float32), BatchContext(pixel_size=2.0))  # exactly Nyquist: fine
    with pytest.raises(CryosiftError, match="pixel size"):
        f(np.zeros((1, 16, 16), np.float32), BatchContext(pixel_size=None))
    with pytest.raises(CryosiftError, match="Nyquist"):
        make_filter("lowpass", cutoff_frac=1.5)
    with pytest.raises(CryosiftError, match="exactly one"):
        make_filter("lowpass", cutoff_A=10, cutoff_frac=0.5)
    with pytest.raises(CryosiftError, match="exactly one"):
        make_filter("highpass")
    with pytest.raises(CryosiftError, match="positive"):
        make_filter("lowpass", cutoff_A=-3)
    with pytest.raises(CryosiftError, match="kind"):
        make_filter("lowpass", cutoff_frac=0.5, kind="box")
    with pytest.raises(CryosiftError, match="order"):
        make_filter("lowpass", cutoff_frac=0.5, kind="butterworth", order=0)


def test_make_filter_unknown_name_and_parameter():
    with pytest.raises(CryosiftError, match=r"unknown filter 'sharpen' \(choose from .*lowpass"):
        make_filter("sharpen")
    with pytest.raises(CryosiftError, match="no parameter 'sigma'"):
        make_filter("gaussian", sigma=2)
