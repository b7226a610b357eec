"""FRC, resolution and SSNR: ring geometry, exact identities and statistical expectations.

Statistical tolerances: for a ring of n Fourier pixels (pooled over N images, m = N*n real
samples), the FRC of independent noise has standard deviation 1/sqrt(m), and an FRC with true
value rho has about (1 - rho^2)/sqrt(m) (Fisher). Bounds are 4 standard deviations, so the
chance that any of ~30 rings exceeds them is about 0.2 %.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from cryosift.metrics import (
    FRC_CLEAN,
    FRC_HALVES,
    SSNR_MAX,
    frc,
    frc_resolution,
    half_bit_threshold,
    ring_counts,
    ring_frequencies,
    ring_index,
    snr_from_pairs,
    ssnr_from_frc,
    ssnr_from_pairs,
)

SEED = 7
frc_module = importlib.import_module("cryosift.metrics.frc")  # the package re-exports frc()


def _brute_frc(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image ring sums on the full fft2 grid, one boolean mask per ring (reference)."""
    box = a.shape[-1]
    rings = ring_index(box)
    fa, fb = np.fft.fft2(a), np.fft.fft2(b)
    cross, pa, pb = [], [], []
    for k in range(box // 2 + 1):
        m = rings == k
        cross.append(np.real(fa[:, m] * np.conj(fb[:, m])).sum(axis=1))
        pa.append((np.abs(fa[:, m]) ** 2).sum(axis=1))
        pb.append((np.abs(fb[:, m]) ** 2).sum(axis=1))
    return np.array(cross).T, np.array(pa).T, np.array(pb).T


def test_constants() -> None:
    assert FRC_CLEAN == 0.5
    assert FRC_HALVES == 0.143


def test_ring_index_hand_values() -> None:
    r = ring_index(8)
    assert r.shape == (8, 8) and r.dtype.kind == "i"
    assert r[0, 0] == 0
    assert r[0, 1] == r[1, 0] == r[0, 7] == r[7, 0] == 1  # +-1 on the unshifted grid
    assert r[1, 1] == 1  # sqrt(2) rounds to 1
    assert r[3, 4] == 5  # (3, -4): exactly 5
    assert r[4, 4] == 6  # sqrt(32) = 5.66
    assert np.fft.fftshift(r)[4, 4] == 0  # centre of the shifted layout
    np.testing.assert_array_equal(r, r.T)
    np.testing.assert_array_equal(ring_counts(8)[:3], [1, 8, 12])
    np.testing.assert_array_equal(ring_frequencies(8), [0, 0.125, 0.25, 0.375, 0.5])


@pytest.mark.parametrize("box", [15, 16])
def test_ring_counts_match_ring_index(box: int) -> None:
    counts = ring_counts(box)
    assert counts.shape == (box // 2 + 1,)
    np.testing.assert_array_equal(
        counts, [(ring_index(box) == k).sum() for k in range(counts.size)]
    )


@pytest.mark.parametrize("box", [15, 16])
def test_frc_matches_brute_force_full_grid(box: int) -> None:
    rng = np.random.default_rng(SEED)
    a = rng.normal(size=(3, box, box))
    b = 0.5 * a + rng.normal(size=a.shape)
    cross, pa, pb = _brute_frc(a, b)
    freq, none = frc(a, b, aggregate="none")
    np.testing.assert_allclose(freq, np.arange(box // 2 + 1) / box)
    np.testing.assert_allclose(none, cross / np.sqrt(pa * pb), atol=1e-12)
    np.testing.assert_allclose(frc(a, b, aggregate="mean")[1], none.mean(axis=0), atol=1e-12)
    pooled = cross.sum(0) / np.sqrt(pa.sum(0) * pb.sum(0))
    np.testing.assert_allclose(frc(a, b)[1], pooled, atol=1e-12)


def test_frc_single_images_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(SEED)
    a = rng.normal(size=(5, 16, 16))
    b = a + rng.normal(size=a.shape)
    whole_pool, whole_none = frc(a, b)[1], frc(a, b, "none")[1]
    monkeypatch.setattr(frc_module, "_CHUNK_PIXELS", 2 * 16 * 16)  # chunks of 2 images
    np.testing.assert_allclose(frc(a, b)[1], whole_pool, atol=1e-12)
    np.testing.assert_allclose(frc(a, b, "none")[1], whole_none, atol=1e-12)
    one = frc(a[0], b[0])[1]
    assert one.shape == (9,)
    np.testing.assert_allclose(one, whole_none[0], atol=1e-12)


def test_frc_float32_agrees_with_float64() -> None:
    rng = np.random.default_rng(SEED)
    a = rng.normal(size=(4, 32, 32))
    b = a + rng.normal(size=a.shape)
    c32 = frc(a.astype(np.float32), b.astype(np.float32))[1]
    assert c32.dtype == np.float64
    np.testing.assert_allclose(c32, frc(a, b)[1], atol=1e-5)
    # float32 round-off is not mistaken for zero power, nor zero power for signal
    assert np.all(np.abs(c32[1:]) > 0.1)


def test_frc_with_itself_is_one_and_zero_power_rings_are_zero() -> None:
    rng = np.random.default_rng(SEED)
    img = rng.normal(size=(2, 32, 32))
    np.testing.assert_allclose(frc(img, img)[1], 1.0, atol=1e-12)
    np.testing.assert_allclose(frc(img, -img, "none")[1], -1.0, atol=1e-12)
    # constant image: power only at ring 0
    curve = frc(np.full((16, 16), 2.0), np.full((16, 16), 3.0))[1]
    assert curve[0] == pytest.approx(1.0)
    np.testing.assert_array_equal(curve[1:], 0.0)
    # a pure cosine at 3 cycles/box: only rings 0 (zero here) and 3 carry power
    y, x = np.mgrid[:16, :16]
    wave = np.cos(2 * np.pi * 3 * x / 16)
    curve = frc(wave, 2.0 * wave)[1]
    expected = np.zeros(9)
    expected[3] = 1.0
    np.testing.assert_allclose(curve, expected, atol=1e-12)


def test_frc_of_independent_noise_is_zero_within_ring_statistics() -> None:
    rng = np.random.default_rng(SEED)
    n, box = 8, 64
    a = rng.normal(size=(n, box, box))
    b = rng.normal(size=(n, box, box))
    counts = ring_counts(box)[1:]
    z = frc(a, b)[1][1:] * np.sqrt(n * counts)  # pooled: n * count samples per ring
    assert np.max(np.abs(z)) < 4.0
    # the spread matches 1/sqrt(count): checks the normalisation, not only the sign
    assert 0.7 < np.sqrt(np.mean(z**2)) < 1.3
    z_single = frc(a[0], b[0])[1][1:] * np.sqrt(counts)
    assert np.max(np.abs(z_single)) < 4.0


def test_frc_of_signal_plus_noise_copies_is_s_over_s_plus_sigma2() -> None:
    rng = np.random.default_rng(SEED)
    n, box, s_var, n_var = 16, 32, 1.0, 2.0
    signal = rng.normal(scale=np.sqrt(s_var), size=(n, box, box))
    a = signal + rng.normal(scale=np.sqrt(n_var), size=signal.shape)
    b = signal + rng.normal(scale=np.sqrt(n_var), size=signal.shape)
    rho = s_var / (s_var + n_var)
    m = n * ring_counts(box)[1:]
    tol = 4.0 * (1 - rho**2) / np.sqrt(m)
    for aggregate in ("pool", "mean"):
        curve = frc(a, b, aggregate=aggregate)[1][1:]
        assert np.all(np.abs(curve - rho) < tol), aggregate
    # averaged over all rings the estimate is much tighter
    pooled = frc(a, b)[1][1:]
    assert abs(np.average(pooled, weights=m) - rho) < 4.0 * (1 - rho**2) / np.sqrt(m.sum())


def test_frc_input_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        frc(np.zeros((8, 10)), np.zeros((8, 10)))
    with pytest.raises(ValueError, match="aggregate"):
        frc(np.zeros((8, 8)), np.zeros((8, 8)), aggregate="median")  # type: ignore[arg-type]


def test_resolution_linear_curve_interpolated_exactly() -> None:
    box, px = 64, 2.0
    freq = ring_frequencies(box)
    curve = 1.0 - 2.5 * freq  # crosses 0.5 at f = 0.2 cycles/px, between rings 12 and 13
    assert frc_resolution(freq, curve, FRC_CLEAN, px) == pytest.approx(px / 0.2, rel=1e-12)
    assert frc_resolution(freq, curve, 0.5) == pytest.approx(5.0, rel=1e-12)  # pixels


def test_resolution_hand_curve_and_first_crossing() -> None:
    freq = ring_frequencies(16)
    curve = np.array([1.0, 0.9, 0.8, 0.6, 0.4, 0.6, 0.3, 0.2, 0.1])
    # first crossing of 0.5 is halfway between rings 3 and 4, not the later dips
    expected = 1.5 / (3.5 / 16)
    assert frc_resolution(freq, curve, 0.5, 1.5) == pytest.approx(expected, rel=1e-12)
    # a per-ring threshold works the same way
    thr = np.full(9, 0.5)
    assert frc_resolution(freq, curve, thr, 1.5) == pytest.approx(expected, rel=1e-12)
    # ring 0 is ignored even if it is low
    low_dc = curve.copy()
    low_dc[0] = 0.0
    assert frc_resolution(freq, low_dc, 0.5, 1.5) == pytest.approx(expected, rel=1e-12)


def test_resolution_edge_cases() -> None:
    freq = ring_frequencies(16)
    assert frc_resolution(freq, np.ones(9), 0.5, 1.2) == pytest.approx(2 * 1.2)  # Nyquist
    below = np.array([1.0, 0.3, 0.2, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0])
    assert frc_resolution(freq, below, 0.5, 1.2) == pytest.approx(16 * 1.2)  # ring 1
    with pytest.raises(ValueError):
        frc_resolution(freq, np.ones(5), 0.5)


def test_resolution_from_measured_frc_of_a_lowpassed_copy() -> None:
    """End to end: a copy with an ideal low-pass at ring 10 of 64 resolves 6.4 px."""
    rng = np.random.default_rng(SEED)
    img = rng.normal(size=(4, 64, 64))
    keep = ring_index(64) <= 10
    low = np.fft.ifft2(np.fft.fft2(img) * keep).real
    freq, curve = frc(low, img)
    res = frc_resolution(freq, curve, FRC_CLEAN, 1.0)
    assert 64 / 11 <= res <= 64 / 10


def test_half_bit_threshold() -> None:
    t = half_bit_threshold(64)
    assert t.shape == (33,)
    assert t[0] == pytest.approx(1.0, abs=1e-4)  # one pixel
    n = ring_counts(64)[20]
    s = np.sqrt(n)
    assert t[20] == pytest.approx((0.2071 + 1.9102 / s) / (1.2071 + 0.9102 / s), rel=1e-12)
    assert np.all(np.diff(t[1:]) < 0.05)  # essentially decreasing with ring size
    assert 0.1716 < t[-1] < 0.3


def test_ssnr_from_frc_hand_values() -> None:
    curve = np.array([0.0, 0.5, 0.9, -0.2, 1.0, 1.5, np.nan])
    out = ssnr_from_frc(curve)
    np.testing.assert_allclose(out[:4], [0.0, 1.0, 9.0, 0.0], rtol=1e-12)
    assert out[4] == SSNR_MAX and out[5] == SSNR_MAX
    assert np.isnan(out[6])


def test_snr_from_pairs_recovers_known_snr() -> None:
    rng = np.random.default_rng(SEED)
    n, box, s_var, n_var = 64, 32, 1.0, 4.0
    signal = rng.normal(scale=np.sqrt(s_var), size=(n, box, box))
    a = signal + rng.normal(scale=np.sqrt(n_var), size=signal.shape)
    b = signal + rng.normal(scale=np.sqrt(n_var), size=signal.shape)
    out = snr_from_pairs(a, b)
    assert set(out) == {"snr", "signal_var", "noise_var", "snr_mean_per_image"}
    assert all(type(v) is float for v in out.values())
    m = n * box * box
    snr = s_var / n_var
    rel_s = np.sqrt(2 + 2 / snr + 1 / snr**2) / np.sqrt(m)
    rel_n = np.sqrt(2 / m)
    assert out["signal_var"] == pytest.approx(s_var, rel=4 * rel_s)
    assert out["noise_var"] == pytest.approx(n_var, rel=4 * rel_n)
    assert out["snr"] == pytest.approx(snr, rel=4 * (rel_s + rel_n))
    assert out["snr_mean_per_image"] == pytest.approx(snr, rel=4 * (rel_s + rel_n))
    # symmetric in the two copies; identical copies have no noise
    assert snr_from_pairs(b, a)["snr"] == pytest.approx(out["snr"], rel=1e-12)
    assert snr_from_pairs(a, a)["noise_var"] == pytest.approx(0.0, abs=1e-12)


def test_ssnr_from_pairs_recovers_white_spectral_snr() -> None:
    rng = np.random.default_rng(SEED + 1)
    n, box, s_var, n_var = 32, 32, 1.0, 2.0
    signal = rng.normal(scale=np.sqrt(s_var), size=(n, box, box))
    a = signal + rng.normal(scale=np.sqrt(n_var), size=signal.shape)
    b = signal + rng.normal(scale=np.sqrt(n_var), size=signal.shape)
    freq, ssnr = ssnr_from_pairs(a, b)
    np.testing.assert_allclose(freq, ring_frequencies(box))
    # SSNR of one copy = S / sigma^2 = 0.5 at every ring; delta method: d ssnr / d rho =
    # 1 / (1 - rho)^2, rho = 1/3
    rho = s_var / (s_var + n_var)
    m = n * ring_counts(box)[1:]
    tol = 4.0 * (1 - rho**2) / np.sqrt(m) / (1 - rho) ** 2
    assert np.all(np.abs(ssnr[1:] - s_var / n_var) < tol)
