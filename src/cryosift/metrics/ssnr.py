"""Signal-to-noise ratio without ground truth, from two independent noisy copies of one signal.

Model: a = s + n1, b = s + n2 with n1, n2 independent, zero mean, variance sigma^2 each and
independent of s. Then per Fourier ring, with S the signal power,

    FRC(a, b) = S / (S + sigma^2) = SSNR / (1 + SSNR),  so  SSNR = FRC / (1 - FRC),

where SSNR = S / sigma^2 is the spectral SNR of *one* copy (not of their average, which is
twice as large). In real space, cov(a, b) = var(s) and (var(a) + var(b))/2 - cov(a, b) =
sigma^2, as in ``restore`` (Palovcak et al. 2020, ``get_variances``), which gives the scalar SNR
in SPEC's convention (variance of the clean image over the whole box / noise variance).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from cryosift.metrics._arrays import as_pair
from cryosift.metrics.frc import Aggregate, frc

__all__ = ["SSNR_MAX", "ssnr_from_frc", "snr_from_pairs", "ssnr_from_pairs"]

SSNR_MAX = 1e12
"""Finite stand-in for an infinite SSNR (FRC >= 1): keeps JSON and log-scale plots working."""


def ssnr_from_frc(curve: ArrayLike) -> np.ndarray:
    """SSNR = FRC / (1 - FRC) per ring, for an FRC between two independent noisy copies.

    Clipped to >= 0 (a negative FRC is noise around zero signal). FRC >= 1 (identical copies,
    no noise) gives `SSNR_MAX` = 1e12 instead of inf or a negative value; NaN stays NaN. The
    result estimates the SSNR of one copy (see module docstring).
    """
    c = np.asarray(curve, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = c / (1.0 - c)
    out = np.where(c >= 1.0, SSNR_MAX, out)
    out = np.minimum(np.where(c <= 0.0, 0.0, out), SSNR_MAX)
    return np.where(np.isnan(c), np.nan, out)


def snr_from_pairs(a: ArrayLike, b: ArrayLike) -> dict[str, float]:
    """Scalar SNR of one copy from two independent noisy copies of the same images.

    Per image (variances over the whole box, each image centred on its own mean):
    ``var_S = cov(a, b)``, ``var_N = (var(a) + var(b)) / 2 - var_S`` (= half the variance of
    a - b). Returned as plain floats:

    * ``snr``: pooled over the stack, mean(var_S) / mean(var_N) — SPEC's convention (clean
      variance averaged over the stack / noise variance) and the lower-variance estimate;
    * ``signal_var``, ``noise_var``: mean(var_S), mean(var_N) over the stack;
    * ``snr_mean_per_image``: the average of the per-image ratios var_S / var_N (noisier and
      biased for small boxes; for comparison).

    For N images of P pixels with white signal and noise, the relative standard error of
    ``noise_var`` is about sqrt(2 / (N P)) and of ``signal_var`` about
    sqrt(2 + 2/SNR + 1/SNR^2) / sqrt(N P).
    """
    x, y = as_pair(a, b, names=("a", "b"))
    axes = (1, 2)
    xm = x.mean(axis=axes, dtype=np.float64)
    ym = y.mean(axis=axes, dtype=np.float64)
    xc = x - xm.astype(x.dtype)[:, None, None]
    yc = y - ym.astype(y.dtype)[:, None, None]
    var_s = np.mean(xc * yc, axis=axes, dtype=np.float64)
    var_n = 0.5 * np.mean(np.square(xc - yc), axis=axes, dtype=np.float64)
    s_mean, n_mean = float(var_s.mean()), float(var_n.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        per_image = var_s / var_n
        pooled = s_mean / n_mean if n_mean != 0 else (np.inf if s_mean > 0 else np.nan)
    return {
        "snr": float(pooled),
        "signal_var": s_mean,
        "noise_var": n_mean,
        "snr_mean_per_image": float(np.mean(per_image)),
    }


def ssnr_from_pairs(
    a: ArrayLike, b: ArrayLike, aggregate: Aggregate = "pool"
) -> tuple[np.ndarray, np.ndarray]:
    """Spectral SNR of one copy per Fourier ring from two noisy copies: (frequency, SSNR).

    ``ssnr_from_frc(frc(a, b, aggregate))``; frequency in cycles/pixel for rings 0 .. box//2.
    Ring 0 (the mean) is included but meaningless for zero-mean images.
    """
    freq, curve = frc(a, b, aggregate=aggregate)
    return freq, ssnr_from_frc(curve)
