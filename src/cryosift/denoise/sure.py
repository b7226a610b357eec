"""Stein's unbiased risk estimate (SURE) of any denoiser, and a SURE-fitted output stage.

Why: a network trained elsewhere (the shipped general model) or on few images can do worse than
a well-tuned linear filter at very low SNR, and nothing in a user's stack says so, since there
are no clean images to compare with. With white Gaussian noise of variance sigma^2, SURE gives
the mean squared error against the unseen clean images x from the noisy images y alone:

    E |h(y) - x|^2 = E |h(y) - y|^2 - N sigma^2 + 2 sigma^2 E[div h(y)]        (N pixels)

The divergence of a black-box network is estimated with one random probe per image
(Monte-Carlo SURE, Ramani, Blu & Unser 2008): div h(y) ~ b.(h(y + eps b) - h(y)) / eps with
b ~ N(0, I); over thousands of pixels per image and hundreds of images its error is negligible.

The output stage (:class:`SureBlend`): in each radial frequency band j the output is
``a_j P_j f(y) + c_j P_j y`` (P_j: orthogonal projection on the band, f: the network). Bands are
orthogonal, so SURE splits into one quadratic in (a_j, c_j) per band, minimised by a 2 x 2
linear solve (a SURE-LET estimator, Luisier, Blu & Unser 2007). a = 1, c = 0 everywhere is the
network itself; a = 0 is the best radial linear filter of the stack (an empirical Wiener filter);
the fitted mix is estimated to be at least as good as either on this stack. The band width (in
Fourier pixels) is chosen among :data:`BAND_WIDTHS` by two-fold cross-validation of SURE, so no
setting is tuned to one dataset. Measured on 300 GroEL images of 128 px (no CTF) with the general
model: SNR 0.01: network 16.85 dB, blend 18.88 (the Wiener filter with the true spectra: 19.02);
SNR 0.1: 22.13 -> 22.35 (Wiener oracle 21.97).

Assumes the noise is white and Gaussian with one variance over the stack (SPEC's simulation
model; the variance is estimated from the image corners when not given). Coloured noise (a
detector's MTF, ice) would bias the estimate: :func:`noise_colour` measures how far the corners'
noise power falls or rises across the high frequencies, where no particle signal reaches them,
and ``denoise apply`` fits the stage by default only when that is within
:data:`WHITE_TOLERANCE` (a detector's falling noise power spectrum fails the test; noise
coloured at low frequency only would pass unseen).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from cryosift.errors import CryosiftError

#: width of the rings in which per-image statistics are gathered (Fourier pixels); bands are
#: unions of consecutive rings
RING_WIDTH = 0.5
#: band widths (Fourier pixels) among which two-fold cross-validated SURE chooses
BAND_WIDTHS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: probe step relative to the noise standard deviation: small enough to measure the network's
#: local slope, large enough to stay far above float32 rounding
PROBE_STEP = 0.05
#: images per forward pass while fitting
FIT_CHUNK = 64
#: the noise counts as white when its power in the corners at 0.4-0.5 cycles/px is within this
#: fraction of the power at 0.3-0.4 cycles/px (:func:`noise_colour`)
WHITE_TOLERANCE = 0.1

Denoise = Callable[[np.ndarray], np.ndarray]


@lru_cache(maxsize=8)
def _rfft_rings(box: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ring index of each rfft2 frequency, its weight in Parseval's sum, number of rings)."""
    ky = torch.fft.fftfreq(box, d=1.0 / box).abs()
    kx = torch.fft.rfftfreq(box, d=1.0 / box)
    radius = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    ring = torch.floor(radius / RING_WIDTH).long()
    weight = torch.full((box, box // 2 + 1), 2.0, dtype=torch.float64)
    weight[:, 0] = 1.0
    if box % 2 == 0:
        weight[:, -1] = 1.0  # the Nyquist column has no mirror image in rfft2
    return ring, weight, int(ring.max()) + 1


def _ring_sums(values: torch.Tensor, box: int) -> torch.Tensor:
    """Per-image sums over rings of (B, box, box//2+1) real values (Parseval-weighted, / N)."""
    ring, weight, n_rings = _rfft_rings(box)
    flat = (values.double() * weight).reshape(len(values), -1)
    out = torch.zeros(len(values), n_rings, dtype=torch.float64)
    out.index_add_(1, ring.reshape(-1), flat)
    return out / (box * box)


@dataclass(frozen=True)
class RingStatistics:
    """Per-image, per-ring inner products of the network output f, the noisy image y and the
    probe's response, from which SURE of any band-wise mix follows (arrays (images, rings))."""

    ff: np.ndarray
    fy: np.ndarray
    yy: np.ndarray
    div: np.ndarray  # <P b, f(y + eps b) - f(y)> / eps: the network's divergence per ring
    count: np.ndarray  # frequencies per ring (the divergence of P y), (rings,)

    def bands(self, rings_per_band: int, rows: np.ndarray | slice = slice(None)) -> tuple:
        """(ff, fy, yy, div, count) summed over ``rows`` and over bands of rings."""
        n_rings = self.count.shape[0]
        band = np.arange(n_rings) // rings_per_band
        n_bands = int(band[-1]) + 1

        def pool(a: np.ndarray) -> np.ndarray:
            return np.bincount(band, weights=a, minlength=n_bands)

        n = len(np.arange(len(self.ff))[rows])
        return (pool(self.ff[rows].sum(0)), pool(self.fy[rows].sum(0)),
                pool(self.yy[rows].sum(0)), pool(self.div[rows].sum(0)), pool(self.count) * n)


def gather_statistics(
    denoise: Denoise, images: np.ndarray, noise_var: float, seed: int = 0
) -> RingStatistics:
    """Run ``denoise`` on ``images`` and on ``images + eps * probe`` and gather the per-ring
    statistics of :class:`RingStatistics` (chunks of :data:`FIT_CHUNK` images)."""
    images = np.asarray(images, dtype=np.float32)
    box = images.shape[-1]
    eps = PROBE_STEP * math.sqrt(noise_var)
    rng = np.random.default_rng(seed)
    parts: list[list[torch.Tensor]] = [[], [], [], []]  # ff, fy, yy, div per ring
    for start in range(0, len(images), FIT_CHUNK):
        y = images[start : start + FIT_CHUNK]
        probe = rng.standard_normal(y.shape).astype(np.float32)
        f0 = np.asarray(denoise(y), dtype=np.float64)
        f1 = np.asarray(denoise(y + np.float32(eps) * probe), dtype=np.float64)
        yf = torch.fft.rfft2(torch.from_numpy(y.astype(np.float64)))
        ff = torch.fft.rfft2(torch.from_numpy(f0))
        df = torch.fft.rfft2(torch.from_numpy((f1 - f0) / eps))
        bf = torch.fft.rfft2(torch.from_numpy(probe.astype(np.float64)))
        for part, val in zip(parts, (ff.abs() ** 2, (ff * yf.conj()).real, yf.abs() ** 2,
                                     (bf * df.conj()).real), strict=True):
            part.append(_ring_sums(val, box))
    ring, weight, n_rings = _rfft_rings(box)
    count = np.bincount(ring.reshape(-1).numpy(), weights=weight.reshape(-1).numpy(),
                        minlength=n_rings)
    ff, fy, yy, div = (torch.cat(p).numpy() for p in parts)
    return RingStatistics(ff, fy, yy, div, count)


def _solve(ff, fy, yy, div, count, noise_var: float) -> tuple[np.ndarray, np.ndarray]:
    """Per band, the (a, c) minimising SURE of a P f(y) + c P y (a 2 x 2 solve per band)."""
    a = np.zeros_like(ff)
    c = np.zeros_like(ff)
    for j in range(len(ff)):
        if count[j] == 0:
            continue
        gram = np.array([[ff[j], fy[j]], [fy[j], yy[j]]])
        rhs = np.array([fy[j] - noise_var * div[j], yy[j] - noise_var * count[j]])
        ridge = 1e-12 * (gram[0, 0] + gram[1, 1]) * np.eye(2)
        a[j], c[j] = np.linalg.lstsq(gram + ridge, rhs, rcond=None)[0]
    return a, c


def _risk(a, c, ff, fy, yy, div, count, noise_var: float) -> float:
    """SURE (summed squared error) of the mix (a, c) on these statistics."""
    fit = a * a * ff + (c - 1) ** 2 * yy + 2 * a * (c - 1) * fy
    return float(np.sum(fit - noise_var * count + 2 * noise_var * (a * div + c * count)))


@dataclass(frozen=True)
class SureBlend:
    """Per radial band of ``band_width`` Fourier pixels, output = a f(y) + c y (module doc);
    ``band_width`` inf: the network alone was estimated to be best (a = 1, c = 0).

    ``mse_*``: SURE's estimate of the mean squared error per pixel against the clean images on
    the fitted images, for the network alone, the best radial linear filter alone, and the
    blend. Their differences are accurate; each value on its own is off by about the error of
    the noise variance (0.2 % of it on B1), which matters at very low SNR (SNR 0.01: the blend's
    true MSE 2.51 against an estimate of 0.95, with a noise variance of 750)."""

    box: int
    band_width: float
    a: tuple[float, ...]
    c: tuple[float, ...]
    noise_var: float
    images: int
    mse_network: float
    mse_linear: float
    mse_blend: float

    def record(self) -> dict:
        out = asdict(self)
        out["a"], out["c"] = list(self.a), list(self.c)
        return out

    def summary(self) -> str:
        bands = (f"bands of {self.band_width:g} Fourier px" if math.isfinite(self.band_width)
                 else "the network alone kept")
        return (f"SURE blend fitted on {self.images} images ({bands}, noise variance "
                f"{self.noise_var:.4g}); estimated MSE per pixel, no clean images used: "
                f"network {self.mse_network:.4g}, best radial linear filter "
                f"{self.mse_linear:.4g}, blend {self.mse_blend:.4g}")

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (a, c) of every rfft2 frequency of a box of :attr:`box` pixels."""
        ring, _, _ = _rfft_rings(self.box)
        band = torch.clamp(ring // int(round(self.band_width / RING_WIDTH)), max=len(self.a) - 1)
        a = torch.tensor(self.a, dtype=torch.float32)[band]
        c = torch.tensor(self.c, dtype=torch.float32)[band]
        return a, c

    def apply(self, noisy: np.ndarray, denoised: np.ndarray) -> np.ndarray:
        """The blended output of a batch (B, box, box) from its noisy and denoised images."""
        if noisy.shape[-1] != self.box or denoised.shape != noisy.shape:
            raise CryosiftError(
                f"the SURE blend was fitted on {self.box}-px images, not {noisy.shape[-1]} px"
            )
        if not math.isfinite(self.band_width):  # the network alone
            return np.asarray(denoised, dtype=np.float32)
        a, c = self.weights()
        y = torch.fft.rfft2(torch.from_numpy(np.ascontiguousarray(noisy, dtype=np.float32)))
        f = torch.fft.rfft2(torch.from_numpy(np.ascontiguousarray(denoised, dtype=np.float32)))
        out = torch.fft.irfft2(a * f + c * y, s=noisy.shape[-2:])
        return out.numpy().astype(np.float32, copy=False)


def noise_colour(images: np.ndarray) -> float:
    """Relative change of the noise power from 0.3-0.4 to 0.4-0.5 cycles/px, measured in the
    image corners outside the inscribed disk (each corner set's mean removed): 0 for white
    noise, negative where a detector's transfer function damps the high frequencies.

    Only the high frequencies are compared because the particle (and its CTF fringes) reaches
    the corners at low frequencies; a mask of any shape leaves white noise white
    (E|FFT(w n)|^2 = sigma^2 sum w^2), so on white noise the ratio is 1 within the sampling error
    (~1e-3 for 1,000 images of 64 px)."""
    from cryosift.denoise.cwf import corner_statistics

    return corner_statistics(np.asarray(images, dtype=np.float32)).colour


def fit_sure_blend(
    denoise: Denoise,
    images: np.ndarray,
    noise_var: float | None = None,
    seed: int = 0,
    band_widths: tuple[float, ...] = BAND_WIDTHS,
) -> SureBlend:
    """Fit the :class:`SureBlend` of ``denoise`` on ``images`` (N, box, box), N >= 2.

    ``noise_var``: the white noise's variance (default: estimated from the image corners,
    :func:`cryosift.denoise.cwf.estimate_noise_var`). The band width is the one of
    ``band_widths`` with the lowest two-fold cross-validated SURE (coefficients fitted on one
    half of the images, risk measured on the other); the blend is then refitted on all images.
    If no width beats the network alone on the held-out halves, the blend is the identity.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3 or images.shape[1] != images.shape[2] or len(images) < 2:
        raise CryosiftError(f"SURE needs at least 2 square images, got shape {images.shape}")
    if noise_var is None:
        from cryosift.denoise.cwf import estimate_noise_var

        noise_var = estimate_noise_var(images)
    if not (math.isfinite(noise_var) and noise_var > 0):
        raise CryosiftError(
            f"SURE needs the noise variance, and the images give {noise_var:.3g}: are they noisy?"
        )
    stats = gather_statistics(denoise, images, noise_var, seed)
    halves = np.random.default_rng(seed).permutation(len(images)) % 2 == 0
    n_rings = len(stats.count)
    # the network alone (one band, a = 1, c = 0) has nothing fitted: its SURE on each half is
    # unbiased, and it is kept unless a blend does better on the held-out halves
    alone = stats.bands(n_rings)
    best = (_risk(np.ones(1), np.zeros(1), *alone, noise_var), math.inf)
    for width in band_widths:
        per_band = int(round(width / RING_WIDTH))
        if per_band < 1 or abs(per_band * RING_WIDTH - width) > 1e-9:
            raise CryosiftError(f"band widths must be multiples of {RING_WIDTH}, got {width}")
        cv = 0.0
        for fit_rows in (halves, ~halves):
            coef = _solve(*stats.bands(per_band, fit_rows), noise_var)
            cv += _risk(*coef, *stats.bands(per_band, ~fit_rows), noise_var)
        if cv < best[0]:
            best = (cv, width)
    width = best[1]
    pooled = stats.bands(int(round(width / RING_WIDTH)) if math.isfinite(width) else n_rings)
    if math.isfinite(width):
        a, c = _solve(*pooled, noise_var)
    else:
        a, c = np.ones(1), np.zeros(1)
    yy, count = pooled[2], pooled[4]
    zero = np.zeros_like(a)
    linear = np.where(yy > 0, (yy - noise_var * count) / np.where(yy > 0, yy, 1.0), 0.0)
    pixels = float(len(images)) * images.shape[-1] ** 2
    return SureBlend(
        box=int(images.shape[-1]),
        band_width=float(width),
        a=tuple(float(v) for v in a),
        c=tuple(float(v) for v in c),
        noise_var=float(noise_var),
        images=len(images),
        mse_network=_risk(np.ones_like(a), zero, *pooled, noise_var) / pixels,
        mse_linear=_risk(zero, linear, *pooled, noise_var) / pixels,
        mse_blend=_risk(a, c, *pooled, noise_var) / pixels,
    )
