"""Contrast transfer function: RELION 3.1's sign and formula, checked against an independent
numpy implementation of the textbook CTF, its zeros, and the electron wavelength."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosift.simulate.ctf import Optics, ctf_2d, ctf_zero_radii, electron_wavelength


def _ctf(kx, ky, du, dv, angle, optics, **kw) -> np.ndarray:
    """ctf_2d on numpy frequency grids for one image -> numpy (G,)."""
    out = ctf_2d(
        torch.as_tensor(np.asarray(kx, dtype=np.float64)),
        torch.as_tensor(np.asarray(ky, dtype=np.float64)),
        torch.tensor([du]),
        torch.tensor([dv]),
        torch.tensor([angle]),
        optics,
        **kw,
    )
    return out[0].numpy()


def codata_wavelength(voltage_kv: float) -> float:
    """lambda = h / sqrt(2 m0 e V (1 + e V / (2 m0 c^2))) in Å, CODATA 2018 constants."""
    e, m0, c, h = 1.602176634e-19, 9.1093837015e-31, 299792458.0, 6.62607015e-34
    v = voltage_kv * 1e3
    return float(h / np.sqrt(2 * m0 * e * v * (1 + e * v / (2 * m0 * c**2))) * 1e10)


def textbook_ctf(kx, ky, du, dv, angle_deg, lam, cs_mm, q0, bfactor=0.0, phase_deg=0.0):
    """Weak-phase/weak-amplitude transfer in the textbook form (underfocus positive):

    gamma(k) = pi lambda df(k) |k|^2 - pi/2 Cs lambda^3 |k|^4, with the astigmatic defocus the
    quadratic form df(k)|k|^2 = dU k_u^2 + dV k_v^2, k_u along the U axis at `angle` from the image
    x axis (columns), k_v perpendicular; CTF = sqrt(1 - Q0^2) sin(gamma + phi) + Q0 cos(gamma +
    phi), times exp(-B |k|^2 / 4). This is RELION's -sin(chi) with chi = -(gamma + phi + atan(Q0 /
    sqrt(1 - Q0^2))): sin(x + K3) = cos K3 sin x + sin K3 cos x, cos K3 = sqrt(1 - Q0^2).

    `lam` is passed in: RELION's rounded constants differ from CODATA by 6e-6 relative, which at
    chi ~ 400 rad (|k| = 0.57 Å^-1, df = 2 µm) is 2.5e-3 rad; the wavelength has its own test.
    """
    a = np.deg2rad(angle_deg)
    ku = kx * np.cos(a) + ky * np.sin(a)
    kv = -kx * np.sin(a) + ky * np.cos(a)
    k2 = kx**2 + ky**2
    gamma = np.pi * lam * (du * ku**2 + dv * kv**2) - np.pi / 2 * cs_mm * 1e7 * lam**3 * k2**2
    g = gamma + np.deg2rad(phase_deg)
    out = np.sqrt(1 - q0**2) * np.sin(g) + q0 * np.cos(g)
    return out * np.exp(-bfactor * k2 / 4)


def test_electron_wavelength():
    """Relativistic de Broglie wavelength: 0.019687 Å at 300 kV, 0.025079 Å at 200 kV; RELION's
    constants agree with CODATA 2018 to 6.4e-6 relative (bound 1e-5)."""
    assert electron_wavelength(300) == pytest.approx(0.019687, abs=2e-6)
    assert electron_wavelength(200) == pytest.approx(0.025079, abs=2e-6)
    for kv in (80, 100, 120, 200, 300):
        assert electron_wavelength(kv) == pytest.approx(codata_wavelength(kv), rel=1e-5)


@pytest.mark.parametrize("q0", [0.0, 0.07, 0.1, 0.3])
def test_ctf_at_zero_frequency_is_plus_amplitude_contrast(q0):
    """RELION's sign: CTF(0) = -sin(-K3) = Q0 (positive density -> positive low-pass image)."""
    val = _ctf([0.0], [0.0], 15000.0, 14000.0, 30.0, Optics(300, 2.7, q0))
    assert val[0] == pytest.approx(q0, abs=1e-6)


def test_ctf_zeros_and_extrema_for_ideal_lens():
    """Cs = 0, Q0 = 0, no astigmatism: CTF = sin(pi lambda df k^2), zero at k_m = sqrt(m /
    (lambda df)) and +-1 halfway (in k^2) between zeros, the first maximum positive. float32
    output and float64 phase: |CTF(k_m)| < 1e-5 is ~100x the rounding."""
    optics = Optics(voltage=300.0, cs=0.0, amplitude_contrast=0.0)
    df = 20000.0
    zeros = ctf_zero_radii(df, optics, 8)
    assert zeros.shape == (8,)
    assert np.all(np.diff(zeros) > 0)
    for theta in (0.0, 0.7, 2.0):  # any direction: isotropic
        kx, ky = zeros * np.cos(theta), zeros * np.sin(theta)
        assert np.abs(_ctf(kx, ky, df, df, 0.0, optics)).max() < 1e-5
    k_mid = np.sqrt((np.arange(1, 9) - 0.5) / (electron_wavelength(300) * df))
    mid = _ctf(k_mid, 0 * k_mid, df, df, 0.0, optics)
    np.testing.assert_allclose(mid, (-1.0) ** np.arange(8), atol=1e-5)
    # a dense radial line changes sign exactly once between consecutive zeros
    k = np.linspace(1e-4, zeros[-1] - 1e-4, 20000)
    vals = _ctf(k, 0 * k, df, df, 0.0, optics)
    assert int(np.sum(np.diff(np.sign(vals)) != 0)) == 7
    assert np.abs(vals).max() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("du", "dv", "angle", "optics", "bfactor", "phase"),
    [
        (21000.0, 17000.0, 30.0, Optics(300.0, 2.7, 0.1), 0.0, 0.0),
        (12000.0, 12500.0, 115.0, Optics(200.0, 2.0, 0.07), 80.0, 0.0),
        (8000.0, 6000.0, -40.0, Optics(300.0, 0.01, 0.0), 0.0, 90.0),
    ],
)
def test_ctf_matches_textbook_formula_with_astigmatism(du, dv, angle, optics, bfactor, phase):
    """Agreement to 1e-5 (float32 output of a float64 phase) on a full 2D grid up to 1/2.5 Å^-1,
    which also fixes the astigmatism angle: dU is the defocus along `angle` from the x axis."""
    n, pix = 96, 1.25
    f = np.fft.fftfreq(n, pix)
    kx, ky = np.meshgrid(f, f)  # kx varies along columns (x), ky along rows (y)
    got = _ctf(kx, ky, du, dv, angle, optics, bfactor=bfactor, phase_shift=phase)
    lam = electron_wavelength(optics.voltage)
    q0 = optics.amplitude_contrast
    ref = textbook_ctf(kx, ky, du, dv, angle, lam, optics.cs, q0, bfactor, phase)
    assert got.shape == (n, n)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    # the test can tell the angle convention apart: swapping x and y, or U and V, breaks it
    swapped = textbook_ctf(kx, ky, dv, du, angle, lam, optics.cs, q0, bfactor, phase)
    assert np.abs(got - swapped).max() > 0.1


def test_ctf_batch_broadcasts_per_image_parameters():
    """(B,) parameters give (B, *G) images, each equal to its own single evaluation."""
    optics = Optics()
    f = np.fft.fftfreq(32, 2.0)
    kx, ky = np.meshgrid(f, f)
    du = torch.tensor([10000.0, 20000.0, 30000.0])
    dv = torch.tensor([9000.0, 20000.0, 29000.0])
    ang = torch.tensor([0.0, 45.0, 170.0])
    bf = torch.tensor([0.0, 50.0, 100.0])
    out = ctf_2d(torch.as_tensor(kx), torch.as_tensor(ky), du, dv, ang, optics, bfactor=bf)
    assert out.shape == (3, 32, 32)
    for i in range(3):
        one = _ctf(kx, ky, float(du[i]), float(dv[i]), float(ang[i]), optics, bfactor=float(bf[i]))
        np.testing.assert_allclose(out[i].numpy(), one, atol=1e-6)
    # float32 grids (what the simulator passes) give float32 and agree to float32 phase rounding:
    # chi <= ~300 rad here, eps32 * 300 ~ 2e-5 rad
    out32 = ctf_2d(
        torch.as_tensor(kx, dtype=torch.float32),
        torch.as_tensor(ky, dtype=torch.float32),
        du,
        dv,
        ang,
        optics,
        bfactor=bf,
    )
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), out.numpy(), atol=1e-4)
