"""Denoising oracles: what the best linear filter does when it is told the true spectra.

Model: y_i = x_i + n_i, with x_i the clean image as imaged (projection convolved with the image's
own CTF c_i) and n_i white noise of variance sigma^2. With S(r) the rotationally averaged power of
the projections before the CTF, the MMSE linear estimate per Fourier coefficient is

    x^_i(k) = c_i(k)^2 S(r) / (c_i(k)^2 S(r) + N) * y_i(k),   N = sigma^2 * H * W,

(N: expected |DFT of the noise|^2). S is estimated per ring from the clean stack as
sum_i |X_i(k)|^2 / sum_i c_i(k)^2, and sigma^2 from the difference of the noisy and clean stacks,
so no simulation parameter is needed beyond the CTF. No linear, rotationally symmetric filter
(low-pass of any kind and cutoff, Gaussian blur) can reach a lower expected squared error.
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


def wiener_oracle(
    noisy: np.ndarray,
    clean: np.ndarray,
    ctf: CtfFunction | None = None,
    noise_var: float | None = None,
    chunk: int = 512,
) -> np.ndarray:
    """Wiener-filtered copy of `noisy` with the true signal and noise spectra (see module doc).

    noisy, clean: (N, box, box); ctf(start, stop) gives the CTF of images start..stop on the
    rfft2 grid (None: no CTF); noise_var defaults to the variance of noisy - clean.
    """
    noisy = np.asarray(noisy)
    n, box = noisy.shape[0], noisy.shape[-1]
    if noise_var is None:
        noise_var = float(
            np.mean(
                [
                    np.var(
                        np.asarray(noisy[i : i + chunk], np.float64)
                        - np.asarray(clean[i : i + chunk], np.float64)
                    )
                    for i in range(0, n, chunk)
                ]
            )
        )
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
