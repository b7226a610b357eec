"""Denoising oracles: what the best linear filter does when it is told the true spectra.

Model: y_i = x_i + n_i, with x_i the clean image as imaged (projection convolved with the image's
own CTF) and n_i white noise of variance sigma^2, so E|N(k)|^2 = N = sigma^2 H W per coefficient.

`wiener_oracle` (the yardstick printed beside every denoiser) knows each image's own clean ring
power P_i(r) (mean |X_i(k)|^2 over the Fourier ring r) and applies h_i(k) = P_i / (P_i + N). For a
given image, the expected squared error of any filter that multiplies each ring by one number
(every low-pass of any shape and cutoff, every Gaussian blur) is sum_r (1-h)^2 P_i(r) n_r +
h^2 N n_r, which this h minimises ring by ring: no such filter can beat it on any image, so it
beats them in mean PSNR too (PSNR is per image, monotone in the image's error). The CTF is in
x_i, hence in P_i: the filter is CTF-aware by construction (up to astigmatism within a ring).

`wiener_ensemble` is the classic Wiener filter with the population spectrum: S(r) = the ring power
of the projections before the CTF, pooled over the stack (sum |X_i|^2 / sum c_i^2), and per image
h_i(k) = c_i(k)^2 S / (c_i(k)^2 S + N). It is the MMSE linear filter for a random image of the
stack (what covariance Wiener filtering estimates from data) and is weaker than the per-image one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cryosift.metrics.frc import ring_index

CtfFunction = Callable[[int, int], np.ndarray]  # (start, stop) -> CTF values on the rfft grid


def _rings(box: int) -> torch.Tensor:
    """Ring number of every coefficient on the rfft2 grid of a box x box image."""
    return torch.as_tensor(ring_index(box)[:, : box // 2 + 1].astype(np.int64))


def ring_power(
    clean: np.ndarray, ctf: CtfFunction | None = None, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per-ring power of the clean images before the CTF: (S per ring, number of rings).

    S(r) = sum over images and ring coefficients of |X|^2 / sum of c^2 (c = 1 without CTF).
    """
    n, box = clean.shape[0], clean.shape[-1]
    rings = _rings(box).reshape(-1)
    nr = int(rings.max()) + 1
    num = torch.zeros(nr, dtype=torch.float64)
    den = torch.zeros(nr, dtype=torch.float64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        ft = torch.fft.rfft2(torch.as_tensor(np.asarray(clean[start:stop], dtype=np.float32)))
        power = (ft.real**2 + ft.imag**2).double().reshape(stop - start, -1)
        weight = _rfft_weights(box).reshape(1, -1)
        num.index_add_(0, rings, (power * weight).sum(0))
        if ctf is None:
            c2 = torch.full_like(power, 1.0)
        else:
            c2 = (
                torch.as_tensor(ctf(start, stop), dtype=torch.float64).reshape(stop - start, -1)
                ** 2
            )
        den.index_add_(0, rings, (c2 * weight).sum(0))
    s = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
    return s.numpy(), np.asarray(nr)


def _rfft_weights(box: int) -> torch.Tensor:
    """Multiplicity of each rfft2 coefficient in the full spectrum (1 or 2, Hermitian pairs)."""
    w = torch.full((box, box // 2 + 1), 2.0, dtype=torch.float64)
    w[:, 0] = 1.0
    if box % 2 == 0:
        w[:, -1] = 1.0
    return w


def wiener_ensemble(
    noisy: np.ndarray,
    clean: np.ndarray,
    ctf: CtfFunction | None = None,
    noise_var: float | None = None,
    chunk: int = 512,
) -> np.ndarray:
    """Wiener filter with the population spectrum and each image's CTF (see module doc).

    noisy, clean: (N, box, box); ctf(start, stop) gives the CTF of images start..stop on the
    rfft2 grid (None: no CTF); noise_var defaults to the variance of noisy - clean.
    """
    noisy = np.asarray(noisy)
    n, box = noisy.shape[0], noisy.shape[-1]
    if noise_var is None:
        noise_var = _noise_var(noisy, clean, chunk)
    s, _ = ring_power(clean, ctf, chunk)
    s_grid = torch.as_tensor(s)[_rings(box)].float()
    noise_power = float(noise_var) * box * box
    out = np.empty((n, box, box), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        y = torch.fft.rfft2(torch.as_tensor(np.asarray(noisy[start:stop], dtype=np.float32)))
        c = 1.0 if ctf is None else torch.as_tensor(ctf(start, stop), dtype=torch.float32)
        sig = (c * c) * s_grid
        h = sig / (sig + noise_power)
        out[start:stop] = torch.fft.irfft2(y * h, s=(box, box)).numpy()
    return out


def _noise_var(noisy: np.ndarray, clean: np.ndarray, chunk: int) -> float:
    """Variance of noisy - clean over the stack (the white-noise level)."""
    n = len(noisy)
    total = 0.0
    for i in range(0, n, chunk):
        d = np.asarray(noisy[i : i + chunk], np.float64) - np.asarray(
            clean[i : i + chunk], np.float64
        )
        total += float(((d - d.mean()) ** 2).sum())
    return total / (n * noisy.shape[-1] * noisy.shape[-2])


def wiener_oracle(
    noisy: np.ndarray, clean: np.ndarray, noise_var: float | None = None, chunk: int = 512
) -> np.ndarray:
    """Per-image, per-ring Wiener filter from each image's own clean ring power (module doc)."""
    noisy = np.asarray(noisy)
    n, box = noisy.shape[0], noisy.shape[-1]
    if noise_var is None:
        noise_var = _noise_var(noisy, clean, chunk)
    rings = _rings(box)
    flat = rings.reshape(-1)
    nr = int(flat.max()) + 1
    weight = _rfft_weights(box).reshape(-1)
    count = torch.zeros(nr, dtype=torch.float64).index_add_(0, flat, weight)
    noise_power = float(noise_var) * box * box
    out = np.empty((n, box, box), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        x = torch.fft.rfft2(torch.as_tensor(np.asarray(clean[start:stop], dtype=np.float64)))
        power = (x.real**2 + x.imag**2).reshape(stop - start, -1) * weight
        ring_power = torch.zeros(stop - start, nr, dtype=torch.float64)
        ring_power.index_add_(1, flat, power)
        p = ring_power / count.clamp_min(1.0)
        h = (p / (p + noise_power).clamp_min(1e-300))[:, rings]
        y = torch.fft.rfft2(torch.as_tensor(np.asarray(noisy[start:stop], dtype=np.float64)))
        out[start:stop] = torch.fft.irfft2(y * h, s=(box, box)).numpy()
    return out
