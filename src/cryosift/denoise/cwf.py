"""Covariance Wiener filter (CWF): the Cov2D denoiser of ASPIRE (Bhamre, Zhang & Singer 2016).

Every image is modelled as y_i = H_i x_i + n_i: x_i a random clean image (before the CTF) drawn
from one distribution shared by the whole stack, H_i the image's CTF, n_i white noise of variance
sigma^2. The mean mu and covariance C of x are estimated from the noisy stack itself (noise
subtracted, CTF deconvolved), then each image is denoised by the linear MMSE (Wiener) estimate

    x_hat_i = mu + C H_i^* (H_i C H_i^* + sigma^2 I)^{-1} (y_i - H_i mu).

What is returned is H_i x_hat_i, the denoised image *as imaged* (the target of cryosift's metrics:
clean.mrcs holds the CTF-modulated images); ``ctf_corrected=True`` returns x_hat_i instead.
Without CTF metadata H_i = I and the filter shrinks each principal component of the images by
lambda / (lambda + sigma^2). With ``noise_var=0`` it keeps every direction the data span: the
output is the input's orthogonal projection on the basis.

Design (what is implemented, and why)
-------------------------------------
* **Steerable basis.** Images are expanded, inside the disk r < box/2 centred on pixel box//2,
  on Fourier-Bessel functions psi_kq(r, theta) = J_k(j_kq r / R) e^{i k theta} (j_kq the q-th
  zero of J_k, R = box/2), kept while j_kq < pi R * bandlimit (bandlimit 1 = the Nyquist
  frequency; ~0.5 box^2 functions at the default 0.9). The real basis holds psi_0q and
  sqrt(2) Re/Im psi_kq (k >= 1), sampled on the pixels and made exactly orthonormal there by
  symmetric (Loewdin) orthonormalisation, phi (phi^T phi)^{-1/2}, the orthonormal set closest to
  the sampled functions. That is done separately for the six classes of columns that the square
  grid's symmetries leave coupled (k mod 4 in {0}, {2}, {1, 3}, times cosine/sine type): columns
  of different classes are exactly orthogonal on the grid already. The complex coefficient
  z_kq = <psi_kq, y> of an image rotated by alpha is e^{-ik alpha} z_kq, so a distribution that
  is invariant under in-plane rotation has its mean at k = 0 only and a covariance that is block
  diagonal in k, each block C_k a Hermitian n_k x n_k matrix (complex: chiral images are not
  symmetrised over reflections, as a real-basis Cov2D would). This is the exact limit of PCA on
  a stack augmented with all in-plane rotations, at a fraction of the cost: every image gives
  one sample to every block and no rotated copy is ever computed. At bandlimit 0.9 the sampled
  functions are within 10 % of orthonormal before the orthonormalisation (Gram eigenvalues in
  [0.9, 1.1]), which therefore changes them little: rotations by 90 degrees act on the
  coefficients as the phases above to 1e-5. At 1.0 the functions at the Nyquist frequency
  alias onto each other (cos/sin pairs overlap by up to 0.2) and steerability degrades; on the
  test stacks 1.0 is neutral at SNR <= 0.1, +0.15 dB at SNR 0.5 with CTF, and costs ~25 % more.
  ``rotation_invariant=False`` keeps the basis but estimates one full covariance over all
  coefficients (plain PCA; no CTF): better for stacks of repeated views without in-plane
  rotation (a 10-view phantom: 29.2 against 26.0 dB at SNR 0.1), worse for rotated ones.
  ``rotation_invariant="auto"`` (the command's and the benchmark's default) fits both on one
  half of the stack, scores each on the other half by Stein's unbiased risk estimate
  (:func:`sure_risk`: the MSE against the clean images, from the noisy ones and the noise
  level alone) and fits the better one on the whole stack (with CTFs: the invariant one).
  Pixels outside the disk get the stack's background level (below); with a CTF the
  as-imaged output spreads the estimate beyond the disk as the microscope does.
* **Noise variance** (when ``noise_var`` is not given): the power of the image corners (outside
  the disk, each image's corner mean removed) at spatial frequencies >= 0.3 cycles/pixel,
  divided by the corners' share of the box (E|FFT(w n)|^2 = sigma^2 sum w^2 for white noise
  under any mask w). The particle and most of its CTF fringes lie inside the disk and what does
  reach the corners is mostly at low frequency, so the estimate holds with a CTF: bias +0.2 %
  without CTF, +0.3 % with CTF at SNR 0.1, +1.7 % with CTF at SNR 2 on 48 px test stacks.
* **Background level**: the mean of the corner pixels over the stack is subtracted before
  fitting and added back to every output pixel (0 for normalised stacks; an offset stack is
  then denoised exactly as the same stack without offset).
* **Covariance from noisy data, eigenvalue shrinkage.** Per block, the sample covariance S of
  the coefficients (mean removed) has noise floor sigma^2 I. Its eigenvalues l (in units of
  sigma^2) are shrunk with the spiked-covariance (Marchenko-Pastur / BBP) law for dimension n_k
  and n samples, gamma = n_k / n: eigenvalues below the bulk edge (1 + sqrt(gamma))^2 are noise
  and dropped; above it the population spike is lambda = ((l-1-gamma) + sqrt((l-1-gamma)^2 -
  4 gamma)) / 2, and the sample eigenvector's squared overlap with the true one is c^2 =
  (1 - gamma/lambda^2) / (1 + gamma/lambda). The default "frobenius" shrinker sets the clean
  eigenvalue to lambda c^2 (ASPIRE's default; the Frobenius-optimal covariance estimate of
  Donoho, Gavish & Johnstone 2018), "operator" to lambda, "none" to max(l - 1, 0).
* **CTF-aware estimation** (metadata with rlnDefocusU): images are grouped by mean defocus into
  ``defocus_groups`` quantile bins, each with the average of its members' CTFs (RELION's
  formula, ``cryosift.filters.ctf.batch_ctf``). A group's CTF acts on block k as the matrix
  H_kg = <psi_kq, A_g psi_kq'>, computed exactly on the grid by applying the CTF to every basis
  function in a zero-padded FFT (``ctf_pad`` x the box, so the CTF's spread beyond the box is
  not wrapped back; the coupling of k to k +- 2 by astigmatism is neglected, as in Cov2D). Then,
  as ASPIRE's RotCov2D: the mean solves sum_g n_g H_g^* H_g mu = sum_g H_g^* sum_{i in g} z_i
  (block k = 0); the back-projected covariance B = (1/n) sum_i H_i^* b_i b_i^* H_i (b_i = z_i -
  H_i mu) is whitened by its noise part N = (sigma^2/n) sum_i H_i^* H_i, shrunk as above and
  unwhitened (T: the noise-free part of B); C solves the least-squares normal equations
  (1/n) sum_g n_g A_g C A_g = T, A_g = H_g^* H_g, directly (Kronecker form, Cholesky, Tikhonov
  ``regularization`` relative to the mean eigenvalue) and is projected on the positive
  semidefinite cone. The Wiener filter uses the group's H_g; the as-imaged output applies each
  image's own exact CTF to x_hat_i.
* **Scale.** Fitting is one streaming pass of sufficient statistics (per block and group:
  coefficient sums and outer products) over at most ``max_fit_images`` images drawn at random,
  after a cheap pass for the noise level; applying is chunked: project on the basis (one
  (p x M) matrix product, p = pixels in the disk), small per-block complex products, synthesise
  (one more product) and with a CTF one padded FFT per image. The basis is built once per box
  size and bandlimit (cached in the process); its cost grows as box^6 (1 s at 64 px, ~35 s at
  128 px on one core). Everything runs on the CPU (torch; small factorisations in numpy/scipy
  LAPACK on one BLAS thread).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.linalg
import torch
from scipy.special import jn_zeros, jv
from threadpoolctl import ThreadpoolController

from cryosift.errors import CryosiftError, InputError
from cryosift.filters.base import BatchContext, Filter
from cryosift.filters.ctf import batch_ctf, hermitian_nyquist
from cryosift.progress import progress
from cryosift.registry import DenoiseTask, Method, register

__all__ = [
    "CovarianceWienerFilter",
    "CwfFilter",
    "SteerableBasis",
    "cwf_denoise",
    "cwf_denoise_source",
    "estimate_noise_var",
    "estimate_snr",
    "has_ctf",
    "shrink_eigenvalues",
    "steerable_basis",
]

log = logging.getLogger(__name__)

SHRINKERS = ("frobenius", "operator", "none")
NOISE_MIN_FREQ = 0.3  # cycles/pixel: the noise estimate uses corner power at or above this
_SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------------------------
# Steerable (Fourier-Bessel) basis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SteerableBasis:
    """Orthonormal Fourier-Bessel basis of the disk r < box/2 (see the module docstring).

    ``phi`` (p, M) float32 holds the real basis images on the ``mask`` pixels (row-major order);
    block b (angular frequency ``ks[b]``, ``sizes[b]`` radial functions) occupies columns
    ``offsets[b]`` onwards: n columns for k = 0, else n cosine-type then n sine-type columns.
    """

    box: int
    bandlimit: float
    mask: torch.Tensor  # (box, box) bool
    phi: torch.Tensor  # (p, M) float32
    ks: tuple[int, ...]
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]

    @property
    def n_pixels(self) -> int:
        return int(self.phi.shape[0])

    @property
    def n_functions(self) -> int:
        return int(self.phi.shape[1])

    def width(self, b: int) -> int:
        """Number of real columns of block b."""
        return self.sizes[b] * (1 if self.ks[b] == 0 else 2)

    def expand(self, images: torch.Tensor) -> torch.Tensor:
        """Real coefficients (B, M) of images (B, box, box): the orthogonal projection."""
        flat = images.reshape(images.shape[0], -1)[:, self.mask.reshape(-1)]
        return flat.to(torch.float32) @ self.phi

    def evaluate(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Images (B, box, box) float32 from real coefficients (B, M); zero outside the disk."""
        out = torch.zeros(coeffs.shape[0], self.box * self.box, dtype=torch.float32)
        out[:, self.mask.reshape(-1)] = coeffs.to(torch.float32) @ self.phi.T
        return out.reshape(-1, self.box, self.box)

    def block(self, coeffs: torch.Tensor, b: int) -> torch.Tensor:
        """Coefficients z_kq (B, n_k) of block b: float64 for k = 0, else complex128."""
        o, n = self.offsets[b], self.sizes[b]
        c = coeffs[:, o : o + self.width(b)].to(torch.float64)
        if self.ks[b] == 0:
            return c
        return torch.complex(c[:, :n], -c[:, n:]) / _SQRT2

    @cached_property
    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gather indices of the padded block layout (K blocks x n_max): the cosine-type and
        sine-type column of every (k, q), or the dummy column M where there is none; scales."""
        n_blocks, n_max, m = len(self.ks), max(self.sizes), self.n_functions
        cos = torch.full((n_blocks, n_max), m, dtype=torch.long)
        sin = torch.full((n_blocks, n_max), m, dtype=torch.long)
        for b, (k, n, o) in enumerate(zip(self.ks, self.sizes, self.offsets, strict=True)):
            cos[b, :n] = torch.arange(o, o + n)
            if k:
                sin[b, :n] = torch.arange(o + n, o + 2 * n)
        scale = torch.tensor([1.0 if k == 0 else 1.0 / _SQRT2 for k in self.ks])[:, None]
        return cos, sin, scale.to(torch.float64)

    def to_blocks(self, coeffs: torch.Tensor) -> torch.Tensor:
        """All blocks at once, zero-padded: (K, B, n_max) complex128 (see :meth:`block`)."""
        cos, sin, scale = self._layout
        c = torch.cat([coeffs.to(torch.float64), coeffs.new_zeros(len(coeffs), 1).double()], 1)
        return torch.complex(c[:, cos] * scale, -c[:, sin] * scale).permute(1, 0, 2)

    def from_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """Real coefficients (B, M) float64 from padded blocks (K, B, n_max): to_blocks^-1."""
        cos, sin, scale = self._layout
        zt = z.permute(1, 0, 2)
        out = torch.zeros(zt.shape[0], self.n_functions + 1, dtype=torch.float64)
        out[:, cos] = zt.real / scale  # padding lands in the dummy column M, dropped below
        out[:, sin] = -zt.imag / scale
        return out[:, :-1]


def _disk_coordinates(box: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask r < box/2, r, theta) of the pixels; centre pixel box//2, x = column, y = row."""
    c = np.arange(box) - box // 2
    x, y = np.meshgrid(c, c)
    r = np.hypot(x, y)
    return r < box / 2.0, r, np.arctan2(y, x)


def _hermite(step: float, f: np.ndarray, df: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cubic Hermite interpolation of samples f, derivatives df on the grid 0, step, 2 step..."""
    t = x / step
    i = np.clip(np.floor(t).astype(np.int64), 0, len(f) - 2)
    t = t - i
    t2, t3 = t * t, t * t * t
    return (
        (2 * t3 - 3 * t2 + 1) * f[i]
        + (t3 - 2 * t2 + t) * step * df[i]
        + (3 * t2 - 2 * t3) * f[i + 1]
        + (t3 - t2) * step * df[i + 1]
    )


def _loewdin(cols: torch.Tensor) -> torch.Tensor:
    """Symmetric orthonormalisation cols (cols^T cols)^{-1/2}: the closest orthonormal set."""
    gram = (cols.T @ cols).to(torch.float64)
    w, v = _eigh(gram)
    if float(w.min()) < 1e-3 * float(w.max()):  # never expected for bandlimit <= 1
        raise CryosiftError("steerable basis functions are nearly dependent on this grid")
    return cols @ ((v * w.rsqrt()) @ v.T).to(cols.dtype)


def _symmetry_class(k: int, part: int) -> tuple[int, int]:
    """Which columns can overlap on the pixel grid (the others are exactly orthogonal).

    The disk's pixels are symmetric under the square's rotations and reflections, so
    sum_p trig(k theta_p) trig(k' theta_p) vanishes unless k - k' or k + k' is 0 mod 4 (rotation
    by 90 degrees), and cosine-type columns (part 0) are orthogonal to sine-type ones (y -> -y).
    """
    return (1 if k % 2 else k % 4), part


@lru_cache(maxsize=4)
def steerable_basis(box: int, bandlimit: float = 0.9) -> SteerableBasis:
    """The orthonormal steerable basis for a box size (cached; see the module docstring)."""
    if box < 8:
        raise CryosiftError(f"CWF needs a box of at least 8 px, got {box}")
    if not 0.0 < bandlimit <= 1.0:
        raise CryosiftError(f"bandlimit must lie in (0, 1], got {bandlimit}")
    mask, r, theta = _disk_coordinates(box)
    radius = box / 2.0
    rp, tp = r[mask], theta[mask]
    radii, inverse = np.unique(rp, return_inverse=True)
    xmax = math.pi * radius * bandlimit
    grid = np.linspace(0.0, xmax, max(64, int(math.ceil(xmax / 0.05)) + 1))
    step = float(grid[1])
    below, here = -jv(1, grid), jv(0, grid)  # J_{k-1}, J_k on the grid (J_{-1} = -J_1)
    radial: list[np.ndarray] = []  # per block: J_k(j_kq r / R) on the disk's pixels, (p, n_k)
    ks: list[int] = []
    offsets: list[int] = []
    offset = 0
    k = 0
    while True:
        zeros = jn_zeros(k, int(xmax / math.pi) + 2)
        zeros = zeros[zeros < xmax]
        if not len(zeros):
            break
        # J_k on a fine grid, interpolated to the pixel radii with its derivative
        # (J_{k-1} - J_{k+1}) / 2 (|error| < 1e-7): far cheaper than evaluating the Bessel
        # function at every (radius, zero) pair for large orders.
        above = jv(k + 1, grid)
        x = np.outer(radii, zeros) / radius
        radial.append(_hermite(step, here, 0.5 * (below - above), x)[inverse])
        below, here = here, above
        ks.append(k)
        offsets.append(offset)
        offset += len(zeros) * (1 if k == 0 else 2)
        k += 1
    # real columns (cos- then sin-type for k >= 1), orthonormalised class by class
    dtype = torch.float64 if offset <= 3000 else torch.float32  # big boxes: float32 products
    phi = torch.empty(len(rp), offset, dtype=torch.float32)
    classes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for b, kb in enumerate(ks):
        for part in range(1 if kb == 0 else 2):
            classes.setdefault(_symmetry_class(kb, part), []).append((b, part))
    for members in classes.values():
        cols, index = [], []
        for b, part in members:
            kb, n = ks[b], radial[b].shape[1]
            trig = 1.0 if kb == 0 else (np.cos if part == 0 else np.sin)(kb * tp)[:, None]
            block = radial[b] * trig
            cols.append(block / np.linalg.norm(block, axis=0))
            start = offsets[b] + part * n
            index.append(np.arange(start, start + n))
        with _single_blas_thread():
            ortho = _loewdin(torch.from_numpy(np.concatenate(cols, axis=1)).to(dtype))
        phi[:, torch.from_numpy(np.concatenate(index))] = ortho.to(torch.float32)
    return SteerableBasis(
        box=box,
        bandlimit=float(bandlimit),
        mask=torch.from_numpy(mask),
        phi=phi.contiguous(),
        ks=tuple(ks),
        sizes=tuple(x.shape[1] for x in radial),
        offsets=tuple(offsets),
    )


# --------------------------------------------------------------------------------------------
# Noise level and background
# --------------------------------------------------------------------------------------------


def _rfft_weights(box: int) -> torch.Tensor:
    """Multiplicity of each rfft2 coefficient in the full spectrum (1 or 2)."""
    w = torch.full((box, box // 2 + 1), 2.0, dtype=torch.float64)
    w[:, 0] = 1.0
    if box % 2 == 0:
        w[:, -1] = 1.0
    return w


class _CornerStatistics:
    """Streaming background level and white-noise variance from the corners outside the disk."""

    def __init__(self, box: int) -> None:
        mask, _, _ = _disk_coordinates(box)
        self.box = box
        self.corner = torch.from_numpy(~mask)
        self.n_corner = int(self.corner.sum())
        fy = torch.fft.fftfreq(box, dtype=torch.float64)[:, None]
        fx = torch.fft.rfftfreq(box, dtype=torch.float64)[None, :]
        radius = (fx**2 + fy**2).sqrt()
        self.weight = _rfft_weights(box) * (radius >= NOISE_MIN_FREQ)
        self.count = float(self.weight.sum())
        # two bands of the noise-only frequencies, compared by `colour`
        self.lower = _rfft_weights(box) * ((radius >= NOISE_MIN_FREQ) & (radius < 0.4))
        self.upper = _rfft_weights(box) * ((radius >= 0.4) & (radius <= 0.5))
        self.sum_level = 0.0
        self.sum_power = 0.0
        self.sum_lower = 0.0
        self.sum_upper = 0.0
        self.n = 0

    def add(self, images: torch.Tensor) -> None:
        x = images.to(torch.float64)
        corner = self.corner.to(x.dtype)
        level = (x * corner).sum((-2, -1)) / self.n_corner
        spectrum = torch.fft.rfft2((x - level[:, None, None]) * corner)
        power = spectrum.real**2 + spectrum.imag**2
        self.sum_power += float((power * self.weight).sum())
        self.sum_lower += float((power * self.lower).sum())
        self.sum_upper += float((power * self.upper).sum())
        self.sum_level += float(level.sum())
        self.n += x.shape[0]

    @property
    def background(self) -> float:
        return self.sum_level / max(self.n, 1)

    @property
    def noise_var(self) -> float:
        return self.sum_power / max(self.n * self.count * self.n_corner, 1.0)

    @property
    def colour(self) -> float:
        """Relative change of the corners' noise power per frequency from 0.3-0.4 to 0.4-0.5
        cycles/px: 0 for white noise (see :func:`cryosift.denoise.sure.noise_colour`)."""
        if not self.sum_lower > 0:
            raise CryosiftError("the image corners hold no noise")
        upper = self.sum_upper / float(self.upper.sum())
        return upper / (self.sum_lower / float(self.lower.sum())) - 1.0


def corner_statistics(images: Any, chunk: int = 1024) -> _CornerStatistics:
    """Background level, white-noise variance and noise colour of a stack (N, box, box), from
    the corners outside the disk, in one pass of ``chunk`` images at a time."""
    arr = _check_stack(images)
    stats = _CornerStatistics(arr.shape[-1])
    for start in range(0, len(arr), chunk):
        stats.add(_load(arr, slice(start, start + chunk)))
    return stats


def estimate_noise_var(images: Any, chunk: int = 1024) -> float:
    """White-noise variance of a stack from its corners' high-frequency power (module doc)."""
    return corner_statistics(images, chunk).noise_var


def estimate_snr(images: Any, max_images: int = 2000, chunk: int = 256) -> float:
    """A stack's SNR in SPEC's convention (variance of the clean image over the box / noise
    variance): (mean per-image variance - noise variance) / noise variance, the noise variance
    from the corners (:func:`estimate_noise_var`), on up to ``max_images`` images spread evenly
    over the stack (an array or an ImageSource), read ``chunk`` images at a time so that memory
    stays bounded at any box size. On B1 (GroEL, no CTF, 1,000 images of 128 px) it reads
    0.0098 / 0.0198 / 0.0499 / 0.0985 / 0.199 / 0.498 at SNR 0.01 / ... / 0.5."""
    n = len(images)
    if n == 0:
        raise CryosiftError("cannot estimate the SNR of an empty stack")
    idx = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(np.int64))
    stats: _CornerStatistics | None = None
    total = 0.0
    for start in range(0, len(idx), chunk):
        part = idx[start : start + chunk]
        pick = images.images(part) if hasattr(images, "images") else np.asarray(images[part])
        arr = _check_stack(np.asarray(pick, dtype=np.float32))
        if stats is None:
            stats = _CornerStatistics(arr.shape[-1])
        stats.add(_load(arr, slice(None)))
        total += float(arr.astype(np.float64).var(axis=(1, 2)).sum())
    assert stats is not None
    noise = stats.noise_var
    if not noise > 0:
        raise CryosiftError("cannot estimate the SNR: the image corners hold no noise")
    return max(total / len(idx) - noise, 0.0) / noise


# --------------------------------------------------------------------------------------------
# Shrinkage and small linear algebra
# --------------------------------------------------------------------------------------------


def shrink_eigenvalues(
    ell: torch.Tensor, gamma: float, shrinker: str = "frobenius"
) -> torch.Tensor:
    """Clean eigenvalues (noise units) from sample eigenvalues ``ell`` of a noise-1 covariance.

    gamma = dimension / samples. Spiked model: below the bulk edge (1 + sqrt(gamma))^2 -> 0;
    above it lambda (``operator``) or lambda * c^2 (``frobenius``); ``none``: max(ell - 1, 0).
    """
    ell = ell.clamp_min(0.0)
    if shrinker == "none":
        return (ell - 1.0).clamp_min(0.0)
    a = ell - 1.0 - gamma
    lam = 0.5 * (a + (a * a - 4.0 * gamma).clamp_min(0.0).sqrt())
    keep = ell > (1.0 + math.sqrt(gamma)) ** 2
    lam = torch.where(keep, lam, torch.zeros_like(lam))
    if shrinker == "operator":
        return lam
    if shrinker == "frobenius":
        safe = lam.clamp_min(1e-30)
        c2 = ((1.0 - gamma / safe**2) / (1.0 + gamma / safe)).clamp(0.0, 1.0)
        return torch.where(keep, lam * c2, torch.zeros_like(lam))
    raise CryosiftError(f"unknown shrinker {shrinker!r} (choose from {', '.join(SHRINKERS)})")


def _hermitian(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.mH)


# Small dense factorisations go through numpy/scipy LAPACK with one BLAS thread (see
# _single_blas_thread): threaded LAPACK can stall for seconds per call when the machine's cores
# are busy with other processes (seen here: a 300 x 300 eigh taking 2-4 s instead of 5 ms), and
# these calls are far too small to gain from threads.


@lru_cache(maxsize=1)
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


def _single_blas_thread() -> Any:
    """Context: numpy/scipy BLAS and LAPACK on one thread (torch's own threads untouched)."""
    return _blas_controller().limit(limits=1, user_api="blas")


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a Hermitian matrix."""
    w, v = np.linalg.eigh(_hermitian(a).numpy())
    return torch.from_numpy(w), torch.from_numpy(v)


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^{-1} b (batched)."""
    return torch.from_numpy(np.linalg.solve(a.numpy(), b.numpy()))


def _sqrt_and_inverse_sqrt(a: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, ...]:
    """(a^{1/2}, a^{-1/2}) of a Hermitian PSD matrix (eigenvalues clamped at floor * max)."""
    w, v = _eigh(a)
    w = w.clamp_min(max(floor * float(w.max()), 1e-300))
    root = w.sqrt().to(v.dtype)
    return (v * root) @ v.mH, (v / root) @ v.mH


def _psd_part(a: torch.Tensor) -> torch.Tensor:
    w, v = _eigh(a)
    return (v * w.clamp_min(0.0).to(v.dtype)) @ v.mH


# --------------------------------------------------------------------------------------------
# Input helpers
# --------------------------------------------------------------------------------------------


def has_ctf(metadata: pd.DataFrame | None) -> bool:
    """Whether STAR rows carry the CTF (a defocus column)."""
    return metadata is not None and "rlnDefocusU" in metadata.columns


def _check_stack(images: Any) -> Any:
    if not hasattr(images, "shape") or len(images.shape) != 3:
        raise CryosiftError("CWF needs a stack of images shaped (N, box, box)")
    n, h, w = images.shape
    if n == 0:
        raise CryosiftError("CWF got an empty stack")
    if h != w:
        raise CryosiftError(f"CWF needs square images, got {h} x {w}")
    return images


def _load(images: Any, index: slice | np.ndarray) -> torch.Tensor:
    arr = np.asarray(images[index], dtype=np.float32)
    if not np.isfinite(arr).all():
        raise CryosiftError("CWF input holds NaN or infinite pixel values")
    return torch.from_numpy(arr)


def _mean_defocus(metadata: pd.DataFrame) -> np.ndarray:
    u = pd.to_numeric(metadata["rlnDefocusU"], errors="coerce").to_numpy(np.float64)
    v = (
        pd.to_numeric(metadata["rlnDefocusV"], errors="coerce").to_numpy(np.float64)
        if "rlnDefocusV" in metadata.columns
        else u
    )
    d = 0.5 * (u + v)
    if not np.isfinite(d).all():
        raise CryosiftError("CTF defocus columns hold values that are not finite numbers")
    return d


def _padded(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images (B, box, box) centred in a (B, size, size) field of zeros."""
    box = images.shape[-1]
    if size == box:
        return images
    out = torch.zeros(images.shape[0], size, size, dtype=images.dtype)
    lo = (size - box) // 2
    out[:, lo : lo + box, lo : lo + box] = images
    return out


def _apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Each image times its CTF (given on the rfft grid of the padded field), cropped back."""
    box, size = images.shape[-1], ctf.shape[-2]
    spec = torch.fft.rfft2(_padded(images, size)) * ctf
    lo = (size - box) // 2
    return torch.fft.irfft2(spec, s=(size, size))[:, lo : lo + box, lo : lo + box]


# --------------------------------------------------------------------------------------------
# The filter
# --------------------------------------------------------------------------------------------


class CovarianceWienerFilter:
    """Fit the clean mean and covariance on a stack, then Wiener-filter any images of it.

    >>> f = CovarianceWienerFilter().fit(noisy)            # doctest: +SKIP
    >>> denoised = f.transform(noisy[:1000])               # doctest: +SKIP

    With CTF: ``fit(noisy, metadata, pixel_size)`` and ``transform(chunk, metadata_of_chunk)``
    (STAR rows with optics columns merged, one row per image).
    """

    def __init__(
        self,
        noise_var: float | None = None,
        rotation_invariant: bool | str = True,
        bandlimit: float = 0.9,
        shrinker: str = "frobenius",
        defocus_groups: int = 16,
        ctf_corrected: bool = False,
        use_ctf: bool = True,
        max_fit_images: int = 20000,
        regularization: float = 1e-4,
        ctf_pad: int = 2,
        chunk: int = 512,
        seed: int = 0,
    ) -> None:
        if noise_var is not None and not (noise_var >= 0 and math.isfinite(noise_var)):
            raise CryosiftError(f"noise_var must be a finite number >= 0, got {noise_var}")
        if shrinker not in SHRINKERS:
            raise CryosiftError(
                f"unknown shrinker {shrinker!r} (choose from {', '.join(SHRINKERS)})"
            )
        if not 0.0 < bandlimit <= 1.0:
            raise CryosiftError(f"bandlimit must lie in (0, 1], got {bandlimit}")
        if min(defocus_groups, max_fit_images, chunk, ctf_pad) < 1:
            raise CryosiftError(
                "defocus_groups, max_fit_images, ctf_pad and chunk must be at least 1"
            )
        self.noise_var = noise_var
        if rotation_invariant not in (True, False, "auto"):
            raise CryosiftError(
                f"rotation_invariant must be True, False or 'auto', got {rotation_invariant!r}"
            )
        self.rotation_invariant = (
            rotation_invariant if rotation_invariant == "auto" else bool(rotation_invariant)
        )
        self.bandlimit = float(bandlimit)
        self.shrinker = shrinker
        self.defocus_groups = int(defocus_groups)
        self.ctf_corrected = bool(ctf_corrected)
        self.use_ctf = bool(use_ctf)
        self.max_fit_images = int(max_fit_images)
        self.regularization = float(regularization)
        self.ctf_pad = int(ctf_pad)
        self.chunk = int(chunk)
        self.seed = int(seed)
        self.fitted = False

    # ---------------------------------------------------------------- parameters and summary
    def params(self) -> dict[str, Any]:
        return {
            "noise_var": self.noise_var,
            "rotation_invariant": self.rotation_invariant,
            "bandlimit": self.bandlimit,
            "shrinker": self.shrinker,
            "defocus_groups": self.defocus_groups,
            "ctf_corrected": self.ctf_corrected,
            "use_ctf": self.use_ctf,
            "max_fit_images": self.max_fit_images,
            "regularization": self.regularization,
            "ctf_pad": self.ctf_pad,
            "seed": self.seed,
        }

    def summary(self) -> dict[str, Any]:
        """What the fit found (plain numbers, for provenance records)."""
        self._require_fitted()
        return {
            "noise_var": self.noise_var_,
            "noise_var_estimated": self.noise_var is None,
            "background": self.background_,
            "n_fit_images": self.n_fit_,
            "basis_functions": self.basis_.n_functions,
            "components": self.n_components_,
            "ctf": self.ctf_,
            "defocus_groups": len(self.group_edges_) + 1 if self.ctf_ else 1,
            "fit_seconds": self.fit_seconds_,
            "rotation_invariant_fitted": self.invariant_,
            **({"sure_risk": self.sure_} if getattr(self, "sure_", None) else {}),
        }

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise CryosiftError("the CWF filter must be fitted before it is applied")

    # ------------------------------------------------------------------------------ fitting
    def fit(
        self,
        images: Any,
        metadata: pd.DataFrame | None = None,
        pixel_size: float | None = None,
    ) -> CovarianceWienerFilter:
        """Estimate noise level, mean and covariance from ``images`` (N, box, box).

        With ``rotation_invariant="auto"`` both covariances are fitted (only the rotation-
        invariant one with CTFs) and the one with the lower Stein risk on the stack is kept
        (:func:`sure_risk`: an unbiased estimate of the MSE against the clean images, from the
        noisy images alone)."""
        if self.rotation_invariant == "auto":
            return self._fit_auto(images, metadata, pixel_size)
        t0 = time.time()
        images = _check_stack(images)
        n_all, box = images.shape[0], images.shape[-1]
        ctf = self.use_ctf and has_ctf(metadata)
        self.invariant_ = bool(self.rotation_invariant)
        if ctf:
            if len(metadata) != n_all:
                raise CryosiftError(f"CWF got {n_all} images but {len(metadata)} metadata rows")
            if pixel_size is None or not pixel_size > 0:
                raise CryosiftError("CTF-aware CWF needs the pixel size")
            if not self.invariant_:
                raise CryosiftError(
                    "rotation_invariant=False (plain PCA) is implemented for stacks without CTF "
                    "only; use use_ctf=False or the rotation-invariant filter"
                )
        self.box_ = box
        self.ctf_ = ctf
        self.pixel_size_ = None if pixel_size is None else float(pixel_size)
        self.basis_ = steerable_basis(box, self.bandlimit)

        rng = np.random.default_rng(self.seed)
        if n_all > self.max_fit_images:
            index = np.sort(rng.choice(n_all, self.max_fit_images, replace=False))
        else:
            index = np.arange(n_all)
        self.n_fit_ = n = len(index)
        chunks = [index[i : i + self.chunk] for i in range(0, n, self.chunk)]

        # pass 1: background level and noise variance from the corners
        stats = _CornerStatistics(box)
        for rows in progress(chunks, total=len(chunks), desc="CWF noise level", unit="chunk"):
            stats.add(_load(images, _as_index(rows)))
        self.background_ = stats.background
        self.noise_var_ = float(self.noise_var) if self.noise_var is not None else stats.noise_var

        # defocus groups (quantile bins of the mean defocus of the fitted images)
        if ctf:
            defocus = _mean_defocus(metadata)
            qs = np.linspace(0.0, 1.0, self.defocus_groups + 1)[1:-1]
            self.group_edges_ = np.unique(np.quantile(defocus[index], qs))
            groups = np.searchsorted(self.group_edges_, defocus[index], side="right")
        else:
            self.group_edges_ = np.zeros(0)
            groups = np.zeros(n, dtype=np.int64)
        n_groups = len(self.group_edges_) + 1

        # pass 2: sufficient statistics per block (and group)
        stats2 = _BlockStatistics(self.basis_, n_groups, self.invariant_)
        size = self.ctf_pad * box
        ctf_sum = torch.zeros(n_groups, size, size // 2 + 1, dtype=torch.float64) if ctf else None
        pos = 0
        for rows in progress(chunks, total=len(chunks), desc="CWF statistics", unit="chunk"):
            y = _load(images, _as_index(rows)) - self.background_
            g = torch.from_numpy(groups[pos : pos + len(rows)])
            pos += len(rows)
            stats2.add(self.basis_.expand(y), g)
            if ctf_sum is not None:
                c = batch_ctf(metadata.iloc[rows], size, float(pixel_size)).double()
                ctf_sum.index_add_(0, g, c)
        counts = stats2.counts
        # a defocus bin that no fitted image fell in borrows its nearest non-empty neighbour
        filled = np.flatnonzero(counts.numpy() > 0)
        self.group_map_ = filled[
            np.abs(np.arange(n_groups)[:, None] - filled[None, :]).argmin(axis=1)
        ]
        if ctf_sum is not None:
            group_ctf = hermitian_nyquist(ctf_sum / counts.clamp_min(1.0)[:, None, None])
            h = _ctf_blocks(self.basis_, group_ctf)
        else:
            h = None
        self.ctf_blocks_ = h
        with _single_blas_thread():
            self._solve(stats2, h)
        self.fit_seconds_ = time.time() - t0
        self.fitted = True
        log.info(
            "CWF fitted on %d images in %.1f s: noise variance %.4g (%s), %d of %d components",
            n,
            self.fit_seconds_,
            self.noise_var_,
            "given" if self.noise_var is not None else "estimated",
            self.n_components_,
            self.basis_.n_functions,
        )
        return self

    def _fit_auto(
        self, images: Any, metadata: pd.DataFrame | None, pixel_size: float | None
    ) -> CovarianceWienerFilter:
        """Choose the rotation-invariant or the plain covariance by their Stein risk on held-out
        images (each fitted on one random half of the stack, scored on the other half, so
        that neither is credited for fitting the scored images' own noise), then fit the
        chosen one on the whole stack. With CTFs only the rotation-invariant one exists."""
        images = _check_stack(images)
        params = {**self.params(), "chunk": self.chunk}
        risks: dict[bool, float] = {}
        if not (self.use_ctf and has_ctf(metadata)) and images.shape[0] >= 4:
            order = np.random.default_rng(self.seed + 1).permutation(images.shape[0])
            half = len(order) // 2
            fit_rows, test_rows = np.sort(order[:half]), np.sort(order[half:][:SURE_IMAGES])
            fit_part = np.asarray(_load(images, _as_index(fit_rows)))
            test_part = np.asarray(_load(images, _as_index(test_rows)))
            for invariant in (True, False):
                cand = CovarianceWienerFilter(**{**params, "rotation_invariant": invariant})
                risks[invariant] = sure_risk(cand.fit(fit_part), test_part, seed=self.seed)
            log.info("CWF covariance by Stein risk on held-out images: rotation-invariant "
                     "%.4g, plain %.4g", risks[True], risks[False])
        best = min(risks, key=risks.get) if risks else True
        chosen = CovarianceWienerFilter(**{**params, "rotation_invariant": best})
        chosen.fit(images, metadata, pixel_size)
        self.__dict__.update(
            {k: v for k, v in chosen.__dict__.items() if k.endswith("_") or k == "fitted"}
        )
        self.sure_ = {("rotation_invariant" if k else "plain"): v for k, v in risks.items()}
        return self

    def _solve(self, st: _BlockStatistics, h: list[torch.Tensor] | None) -> None:
        """Mean, covariance and Wiener matrices of every block from the statistics."""
        sigma2 = self.noise_var_
        n = float(st.counts.sum())
        counts = st.counts.to(torch.float64)
        self.mean_: list[torch.Tensor | None] = []
        self.hmean_: list[torch.Tensor | None] = []
        self.wiener_: list[torch.Tensor] = []
        self.cov_: list[torch.Tensor] = []
        self.n_components_ = 0
        for b in range(st.n_blocks):
            S = st.block_outer(b)  # (G, n_b, n_b): sum z z^*
            dim = S.shape[-1]
            eye = torch.eye(dim, dtype=S.dtype)
            H = h[b] if h is not None else eye.expand(S.shape[0], dim, dim)
            A = H.mH @ H
            # mean (only in the mean block: k = 0, or everything without rotation invariance)
            s = st.block_sums(b)  # (G, n_b) or None
            if s is not None:
                lhs = (counts[:, None, None] * A).sum(0)
                rhs = (H.mH @ s[..., None]).sum(0)[:, 0]
                lhs = lhs + 1e-10 * float(lhs.diagonal().real.mean()) * eye
                mu = _solve(lhs, rhs[:, None])[:, 0]
                m = H @ mu  # (G, n_b): the mean as imaged in each group
                S = (
                    S
                    - s[:, :, None] * m.conj()[:, None, :]
                    - m[:, :, None] * s.conj()[:, None, :]
                    + counts[:, None, None] * m[:, :, None] * m.conj()[:, None, :]
                )
                self.mean_.append(mu)
                self.hmean_.append(m)
                samples = n - 1.0
            else:
                self.mean_.append(None)
                self.hmean_.append(None)
                samples = n
            # back-projected covariance B, its noise part N and T = B - N denoised by shrinkage;
            # C solves the normal equations; W = C H^* (H C H^* + sigma^2 I)^{-1} per group
            gamma = dim / max(samples, 1.0)
            weight = 1 if st.real[b] else 2  # real dimensions per component
            if h is None:
                ell, u = _eigh(S.sum(0) / n)
                if sigma2 > 0:
                    eta = shrink_eigenvalues(ell / sigma2, gamma, self.shrinker) * sigma2
                    kept = eta > 0
                else:  # no noise: the sample covariance itself
                    eta = ell.clamp_min(0.0)
                    kept = eta > 1e-10 * float(eta.max().clamp_min(1e-300))
                self.n_components_ += int(kept.sum()) * weight
                C = (u * eta.to(u.dtype)) @ u.mH
                gain = torch.where(kept, eta / (eta + sigma2 + 1e-12 * float(eta.max())), 0.0)
                self.cov_.append(C)
                self.wiener_.append(((u * gain.to(u.dtype)) @ u.mH)[None])
                continue
            B = _hermitian((H.mH @ S @ H).sum(0) / n)
            if sigma2 > 0:
                noise = sigma2 * (counts[:, None, None] * A).sum(0) / n
                root, inv_root = _sqrt_and_inverse_sqrt(noise)
                ell, u = _eigh(inv_root @ B @ inv_root)
                eta = shrink_eigenvalues(ell, gamma, self.shrinker)
                self.n_components_ += int((eta > 0).sum()) * weight
                T = root @ ((u * eta.to(u.dtype)) @ u.mH) @ root
            else:
                T = B
                self.n_components_ += int(np.linalg.matrix_rank(B.numpy(), hermitian=True)) * weight
            C = _psd_part(self._deconvolve(A, counts / n, T))
            self.cov_.append(C)
            HC = H @ C
            M = HC @ H.mH + sigma2 * eye
            floor = 1e-12 * float(M.diagonal(dim1=-2, dim2=-1).real.abs().max()) + 1e-300
            self.wiener_.append(_solve(M + floor * eye, HC).mH)
        if self.invariant_:
            self._pad_blocks(len(counts))

    def _pad_blocks(self, n_groups: int) -> None:
        """Wiener matrices and means in the padded block layout used to apply the filter."""
        sizes, n_max = self.basis_.sizes, max(self.basis_.sizes)
        shape = (n_groups, len(sizes), n_max, n_max)
        self.wiener_pad_ = torch.zeros(shape, dtype=torch.complex128)
        self.mean_pad_ = torch.zeros(len(sizes), n_max, dtype=torch.complex128)
        self.hmean_pad_ = torch.zeros(n_groups, len(sizes), n_max, dtype=torch.complex128)
        for b, n in enumerate(sizes):
            w = self.wiener_[b]
            self.wiener_pad_[:, b, :n, :n] = w.expand(n_groups, n, n)
        n0 = sizes[0]
        self.mean_pad_[0, :n0] = self.mean_[0]
        self.hmean_pad_[:, 0, :n0] = self.hmean_[0].expand(n_groups, n0)

    def _deconvolve(self, A: torch.Tensor, weights: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """C solving sum_g w_g A_g C A_g = T (Kronecker form, Tikhonov-regularised)."""
        dim = T.shape[-1]
        # row-major vec: vec(A C A) = (A kron A^T) vec(C); K[(i,k),(j,l)] = sum_g w A_ij A_lk
        w = weights.to(A.dtype)
        K = torch.einsum("g,gij,glk->ikjl", w, A, A).reshape(dim * dim, dim * dim)
        K = _hermitian(K)
        rho = self.regularization * float(K.diagonal().real.mean()) + 1e-300
        K.diagonal().add_(rho)
        factor = scipy.linalg.cho_factor(K.numpy(), lower=True, check_finite=False)
        vec = scipy.linalg.cho_solve(factor, T.reshape(-1).numpy(), check_finite=False)
        return torch.from_numpy(vec).reshape(dim, dim)

    # ---------------------------------------------------------------------------- applying
    def transform(self, images: Any, metadata: pd.DataFrame | None = None) -> np.ndarray:
        """Denoised images (N, box, box) float32 (as imaged unless ``ctf_corrected``)."""
        self._require_fitted()
        images = _check_stack(images)
        if images.shape[-1] != self.box_:
            raise CryosiftError(
                f"CWF was fitted on {self.box_} px images, got {images.shape[-1]} px"
            )
        n = images.shape[0]
        if self.ctf_:
            if not has_ctf(metadata):
                raise CryosiftError("this CWF filter was fitted with CTFs: pass the metadata")
            if len(metadata) != n:
                raise CryosiftError(f"CWF got {n} images but {len(metadata)} metadata rows")
            defocus = _mean_defocus(metadata)
            groups = self.group_map_[np.searchsorted(self.group_edges_, defocus, side="right")]
        else:
            groups = np.zeros(n, dtype=np.int64)
        out = np.empty((n, self.box_, self.box_), dtype=np.float32)
        starts = range(0, n, self.chunk)
        for start in progress(starts, total=len(starts), desc="CWF apply", unit="chunk"):
            stop = min(start + self.chunk, n)
            y = _load(images, slice(start, stop)) - self.background_
            x = self._filter_chunk(y, groups[start:stop])
            if self.ctf_ and not self.ctf_corrected:
                size = self.ctf_pad * self.box_
                c = batch_ctf(metadata.iloc[start:stop], size, self.pixel_size_)
                x = _apply_ctf(x, hermitian_nyquist(c))
            out[start:stop] = (x + self.background_).numpy()
        return out

    def _filter_chunk(self, y: torch.Tensor, groups: np.ndarray) -> torch.Tensor:
        basis = self.basis_
        coeffs = basis.expand(y).to(torch.float64)
        result = torch.empty_like(coeffs)
        if self.invariant_:  # all blocks at once, in the padded layout
            z = basis.to_blocks(coeffs)
            out = torch.empty_like(z)
            for g in np.unique(groups):
                rows = torch.from_numpy(np.flatnonzero(groups == g))
                zg = z[:, rows] - self.hmean_pad_[g][:, None, :]
                out[:, rows] = zg @ self.wiener_pad_[g].mT + self.mean_pad_[:, None, :]
            return basis.evaluate(basis.from_blocks(out))
        for g in np.unique(groups):
            rows = torch.from_numpy(np.flatnonzero(groups == g))
            c = coeffs[rows]
            result[rows] = (c - self.hmean_[0][g]) @ self.wiener_[0][g].T + self.mean_[0]
        return basis.evaluate(result)


#: images on which the "auto" covariance choice evaluates the Stein risk of each candidate
SURE_IMAGES = 2000


def sure_risk(
    filt: CovarianceWienerFilter,
    images: np.ndarray,
    metadata: pd.DataFrame | None = None,
    seed: int = 0,
) -> float:
    """Stein's unbiased risk estimate of a fitted filter on ``images``: the mean squared error
    per pixel against the clean images (as imaged), from the noisy images alone.

    The filter is affine in each image, f(y) = A y + b, and the noise white Gaussian of
    variance s2, so E|f(y) - x|^2 = E|f(y) - y|^2 - P s2 + 2 s2 tr(A) (P pixels). tr(A) comes
    from one Rademacher probe e per image (Hutchinson): e^T (f(y + s e) - f(y)) / s, exact in
    expectation and averaged over all the images (one shared A without CTF). The filter is
    treated as fixed: fitted on these images, it depends on each one by O(1/N)."""
    filt._require_fitted()
    y = np.ascontiguousarray(images, dtype=np.float32)
    s2 = float(filt.noise_var_)
    if not s2 > 0:
        raise CryosiftError("the Stein risk needs a positive noise variance")
    step = math.sqrt(s2)
    probe = np.random.default_rng(seed).choice(np.float32([-1.0, 1.0]), size=y.shape)
    fy = filt.transform(y, metadata).astype(np.float64)
    moved = filt.transform(y + step * probe, metadata).astype(np.float64)
    trace = float(((moved - fy) * probe).sum()) / step
    residual = float(((fy - y) ** 2).sum())
    return (residual + 2.0 * s2 * trace) / y.size - s2


def _as_index(rows: np.ndarray) -> slice | np.ndarray:
    """A contiguous run of rows as a slice (fast for memory-mapped stacks)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


class _BlockStatistics:
    """Streaming sums of coefficients and their outer products, per block and defocus group.

    Rotation-invariant: every block in one padded (G, K, n_max, n_max) tensor of sum z z^* and
    the k = 0 sums (G, n_0); otherwise one real block over all M coefficients.
    """

    def __init__(self, basis: SteerableBasis, n_groups: int, invariant: bool) -> None:
        self.basis = basis
        self.invariant = invariant
        self.counts = torch.zeros(n_groups, dtype=torch.float64)
        if invariant:
            n_max = max(basis.sizes)
            shape = (n_groups, len(basis.ks), n_max, n_max)
            self.outer = torch.zeros(shape, dtype=torch.complex128)
            self.sums = torch.zeros(n_groups, basis.sizes[0], dtype=torch.float64)
            self.real = [k == 0 for k in basis.ks]
        else:
            m = basis.n_functions
            self.outer = torch.zeros(n_groups, 1, m, m, dtype=torch.float64)
            self.sums = torch.zeros(n_groups, m, dtype=torch.float64)
            self.real = [True]

    @property
    def n_blocks(self) -> int:
        return len(self.real)

    def block_outer(self, b: int) -> torch.Tensor:
        """(G, n_b, n_b): sum over each group's images of z z^* (real for a real block)."""
        n = self.basis.sizes[b] if self.invariant else self.basis.n_functions
        out = self.outer[:, b, :n, :n]
        return out.real.contiguous() if self.real[b] else out.contiguous()

    def block_sums(self, b: int) -> torch.Tensor | None:
        """(G, n_b): sum of z over each group, for the block holding the mean (else None)."""
        return self.sums if b == 0 else None

    def add(self, coeffs: torch.Tensor, groups: torch.Tensor) -> None:
        self.counts.index_add_(0, groups, torch.ones(len(groups), dtype=torch.float64))
        coeffs = coeffs.to(torch.float64)
        z = self.basis.to_blocks(coeffs) if self.invariant else None  # (K, B, n_max)
        for g in torch.unique(groups).tolist():
            rows = groups == g
            if z is None:
                c = coeffs[rows]
                self.outer[g, 0] += c.T @ c
                self.sums[g] += c.sum(0)
                continue
            zg = z[:, rows]
            self.outer[g] += zg.mT @ zg.conj()
            self.sums[g] += zg[0, :, : self.basis.sizes[0]].real.sum(0)


def _ctf_blocks(basis: SteerableBasis, group_ctf: torch.Tensor) -> list[torch.Tensor]:
    """H_kg = <psi_kq, A_g psi_kq'> for every block: (G, n_k, n_k), real for k = 0.

    A_g multiplies the rfft2 of an image zero-padded to the CTF's grid (size x size) by the group
    CTF; by Parseval the real block Phi_k^T A_g Phi_k is sum_f w_f CTF_g(f) Re(conj(F phi_a)
    F phi_b) / size^2. With the basis images centred on the field's origin, the spectra of block k
    are real (k even) or imaginary (k odd): functions of parity (-1)^k under x -> -x.
    """
    box = basis.box
    size = group_ctf.shape[-2]
    n_groups = group_ctf.shape[0]
    weight = _rfft_weights(size).reshape(-1)
    ctf = group_ctf.reshape(n_groups, -1) * weight / float(size**2)
    out = []
    # where the disk's pixels land in the field when the centre pixel box//2 is its origin
    wrap = (torch.arange(box) - box // 2) % size
    where = (wrap[:, None] * size + wrap[None, :]).reshape(-1)[basis.mask.reshape(-1)]
    for b, k in enumerate(basis.ks):
        o, n, width = basis.offsets[b], basis.sizes[b], basis.width(b)
        field = torch.zeros(width, size * size, dtype=torch.float64)
        field[:, where] = basis.phi[:, o : o + width].T.to(torch.float64)
        spec = torch.fft.rfft2(field.reshape(width, size, size)).reshape(width, -1)
        x = (spec.real if k % 2 == 0 else spec.imag).contiguous()  # the other part is 0
        step = max(1, int(2**25 // max(width * x.shape[1], 1)))  # <= 256 MB per product
        q = torch.cat(
            [
                ((x[None] * ctf[g : g + step, None, :]).reshape(-1, x.shape[1]) @ x.T).reshape(
                    -1, width, width
                )
                for g in range(0, n_groups, step)
            ]
        )
        if k == 0:
            h = q
        else:
            pp, qq = q[:, :n, :n], q[:, n:, n:]
            pq, qp = q[:, :n, n:], q[:, n:, :n]
            h = torch.complex(0.5 * (pp + qq), 0.5 * (pq - qp))
        out.append(_hermitian(h))
    return out


# --------------------------------------------------------------------------------------------
# Library function and registration
# --------------------------------------------------------------------------------------------


def cwf_denoise(
    images: Any,
    noise_var: float | None = None,
    ctf: pd.DataFrame | None = None,
    pixel_size: float | None = None,
    **params: Any,
) -> np.ndarray:
    """Covariance-Wiener-filter a stack: fit on it (or a random subsample), apply in chunks.

    images: (N, box, box) array (memory-mapped is fine); noise_var: None to estimate it;
    ctf: STAR rows (optics merged) with the CTF of every image, or None; pixel_size in Å (needed
    with ``ctf``); params: see :class:`CovarianceWienerFilter`. Returns float32 (N, box, box).
    """
    filt = CovarianceWienerFilter(noise_var=noise_var, **params)
    filt.fit(images, ctf, pixel_size)
    return filt.transform(images, ctf)


class _SourceStack:
    """An ImageSource seen as the (N, box, box) array the filter's fit reads from."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.shape = tuple(source.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        return self.source.images(index)


class CwfFilter(Filter):
    """A fitted :class:`CovarianceWienerFilter` as a streaming image filter (each batch with
    its STAR rows, for the CTFs)."""

    name = "cwf"
    threaded = False  # one batch is a few matrix products: threads would only contend

    def __init__(self, fitted: CovarianceWienerFilter) -> None:
        fitted._require_fitted()
        self.cwf = fitted

    def params(self) -> dict[str, Any]:
        return {**self.cwf.params(), **self.cwf.summary()}

    def check(self, pixel_size: float | None, box: int) -> None:
        if box != self.cwf.box_:
            raise CryosiftError(f"CWF was fitted on {self.cwf.box_} px images, got {box} px")

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        return self.cwf.transform(images, ctx.metadata if self.cwf.ctf_ else None)


def cwf_denoise_source(
    source: Any,
    out_star: str | Path,
    chunk_size: int = 512,
    pixel_size: float | None = None,
    **params: Any,
) -> Path:
    """Fit the covariance Wiener filter on a stack (.star/.mrcs/array, read lazily: at most
    ``max_fit_images`` random images, in chunks) and stream the whole stack through it into
    OUT.star + OUT.mrcs (+ OUT_filter.json: parameters and what the fit found). With CTF
    columns in the STAR the filter is CTF-aware (``use_ctf=False`` ignores them); ``params``:
    see :class:`CovarianceWienerFilter`. Nothing is written if the fit fails."""
    from cryosift.filters.base import _source_metadata, apply_filter_to_source
    from cryosift.io import open_source

    src = open_source(source, pixel_size=pixel_size)
    if src.box < 8:
        raise InputError(f"CWF needs boxes of at least 8 px, got {src.box} px", src.path)
    if src.pixel_size is None:
        raise InputError("states no pixel size (MRC header voxel size 0 and no STAR optics); "
                         "give --pixel-size", src.path)
    metadata = _source_metadata(src)
    ctf = metadata if params.get("use_ctf", True) and has_ctf(metadata) else None
    filt = CovarianceWienerFilter(chunk=chunk_size, **{"rotation_invariant": "auto", **params})
    filt.fit(_SourceStack(src), ctf, src.pixel_size)
    return apply_filter_to_source(src, CwfFilter(filt), out_star, chunk_size)


DEFAULTS: dict[str, Any] = {
    "noise_var": None,
    "rotation_invariant": "auto",
    "bandlimit": 0.9,
    "shrinker": "frobenius",
    "defocus_groups": 16,
    "ctf_corrected": False,
    "use_ctf": True,
    "max_fit_images": 20000,
}


def _factory(**params: Any):
    CovarianceWienerFilter(**params)  # validate now, not at the first task

    def run(task: DenoiseTask) -> np.ndarray:
        meta = task.metadata if has_ctf(task.metadata) else None
        return cwf_denoise(
            task.noisy,
            ctf=meta,
            pixel_size=task.pixel_size,
            **{"seed": task.seed, **params},
        )

    run.params = dict(params)  # type: ignore[attr-defined]
    return run


register(
    Method(
        "denoiser",
        "cwf",
        _factory,
        "covariance Wiener filter (Cov2D-style): mean and rotation-invariant covariance of the "
        "clean images from the noisy stack in a steerable Fourier-Bessel basis, noise "
        "subtracted with Marchenko-Pastur eigenvalue shrinkage, CTF-aware by defocus groups",
        defaults=DEFAULTS,
    )
)
