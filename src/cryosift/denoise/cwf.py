"""Covariance Wiener filter (CWF): the Cov2D denoiser of ASPIRE (Bhamre, Zhang & Singer 2016).

Every image is modelled as y_i = H_i x_i + n_i: x_i a random clean image (before the CTF) drawn
from one distribution shared by the whole stack, H_i the image's CTF, n_i white noise of variance
sigma^2. The mean mu and covariance C of x are estimated from the noisy stack itself (noise
subtracted, CTF deconvolved), then each image is denoised by the linear MMSE (Wiener) estimate

    x_hat_i = mu + C H_i^T (H_i C H_i^T + sigma^2 I)^{-1} (y_i - H_i mu).

What is returned is H_i x_hat_i, the denoised image *as imaged* (the target of cryosift's metrics:
clean.mrcs holds the CTF-modulated images); ``ctf_corrected=True`` returns x_hat_i instead.
Without CTF metadata H_i = I and the filter shrinks every principal component of the images by
lambda / (lambda + sigma^2).

Design (what is implemented, and why)
-------------------------------------
* **Steerable basis.** Images are expanded, inside the disk r < box/2 centred on pixel box//2,
  on Fourier-Bessel functions psi_kq(r, theta) = J_k(j_kq r / R) e^{i k theta} (j_kq the q-th
  zero of J_k, R = box/2), kept while j_kq < pi R * bandlimit (bandlimit 1 = the Nyquist
  frequency), sampled on the pixels and made exactly orthonormal on that grid: symmetric
  (Loewdin) orthonormalisation within each angular frequency k, then Newton-Schulz iterations to
  the polar factor of the whole basis, i.e. the orthonormal set closest to the sampled functions.
  The real basis holds psi_0q and sqrt(2) Re/Im psi_kq (k >= 1); the complex coefficient
  z_kq = <psi_kq, y> of an image rotated by alpha is e^{-ik alpha} z_kq. A distribution that is
  invariant under in-plane rotation therefore has mean only at k = 0 and a covariance that is
  block diagonal in k, each block C_k a Hermitian n_k x n_k matrix (complex: chiral images are
  not symmetrised over reflections, unlike a real-basis Cov2D). This is the exact limit of PCA
  on a stack augmented with all in-plane rotations, at a fraction of the cost: every image gives
  one sample to every block, and no rotated copies are computed. The default bandlimit 0.9 keeps
  the sampled functions within 10 % of orthonormal before the final orthonormalisation; at 1.0
  functions at the Nyquist frequency alias onto each other (cos/sin pairs overlap by up to 0.2)
  and the steerable structure degrades. Pixels outside the disk are returned as the stack's
  background level (see below); with a CTF the as-imaged output spreads the estimate beyond
  the disk exactly as the microscope does. ``rotation_invariant=False`` keeps the same basis but
  estimates one full covariance over all coefficients (plain PCA; no CTF), for comparison.
* **Noise variance** (when ``noise_var`` is not given): the power of the image corners (outside
  the disk, each image's corner mean removed) at spatial frequencies >= 0.3 cycles/pixel,
  divided by the corners' share of the box: E|FFT(w n)|^2 = sigma^2 sum w^2 for white noise
  under any mask w. The particle and most of its CTF fringes lie inside the disk, and what does
  spill into the corners is mostly at low frequency, so the estimate is insensitive to the CTF
  (bias +0.1 to +0.3 % on the test stacks, with and without CTF).
* **Background level**: the mean of the corner pixels over the stack is subtracted before
  fitting and added back to every output pixel (0 for normalised stacks; it keeps an offset
  stack from being explained as signal).
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
  formula via ``cryosift.filters.ctf.batch_ctf``). A group's CTF acts on block k as the matrix
  H_kg = <psi_kq, A_g psi_kq'>, computed exactly on the grid by applying the CTF to every basis
  function in a 2x zero-padded FFT (the CTF's spread beyond the disk is modelled; the coupling of
  k to k +- 2 by astigmatism is neglected, as in Cov2D). Then, as ASPIRE's RotCov2D does:
  the mean solves sum_g n_g H_g^* H_g mu = sum_g H_g^* sum_{i in g} z_i (block k = 0); the back-
  projected covariance B = (1/n) sum_i H_i^* b_i b_i^* H_i (b_i = z_i - H_i mu) is whitened by its
  noise part N = (sigma^2/n) sum_i H_i^* H_i, shrunk as above, unwhitened (giving T, the noise-free
  part of B); and C solves the least-squares normal equations (1/n) sum_g n_g A_g C A_g = T,
  A_g = H_g^* H_g, directly (Kronecker form, Tikhonov ``regularization`` relative to its mean
  eigenvalue), then is projected on the positive semidefinite cone. The Wiener filter uses the
  group's H_g; the as-imaged output applies each image's own exact CTF to x_hat_i.
* **Scale.** Fitting is one streaming pass of sufficient statistics (per block and group: the
  coefficient sums and outer products), on at most ``max_fit_images`` images drawn at random;
  applying is a chunked pass: project on the basis (one (p x M) matrix product), per-block
  complex matrix products, synthesise (one more product), and with a CTF one padded FFT per
  image. Costs per image are O(p M) with p the disk's pixels and M ~ 0.8 * 0.785 box^2 basis
  functions; the basis is built once per box size and bandlimit (cached).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.interpolate import CubicSpline
from scipy.special import jn_zeros, jv

from cryosift.errors import CryosiftError
from cryosift.filters.ctf import batch_ctf, hermitian_nyquist
from cryosift.progress import progress
from cryosift.registry import DenoiseTask, Method, register

__all__ = [
    "CovarianceWienerFilter",
    "SteerableBasis",
    "cwf_denoise",
    "estimate_noise_var",
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
        """Complex coefficients z_kq (B, n_k) complex128 of block b from real coefficients."""
        o, n = self.offsets[b], self.sizes[b]
        c = coeffs[:, o : o + self.width(b)].to(torch.float64)
        if self.ks[b] == 0:
            return c.to(torch.complex128)
        return torch.complex(c[:, :n], -c[:, n:]) / _SQRT2

    def set_block(self, coeffs: torch.Tensor, b: int, z: torch.Tensor) -> None:
        """Write complex block coefficients z (B, n_k) back into real coefficients (in place)."""
        o, n = self.offsets[b], self.sizes[b]
        if self.ks[b] == 0:
            coeffs[:, o : o + n] = z.real.to(coeffs.dtype)
        else:
            coeffs[:, o : o + n] = (_SQRT2 * z.real).to(coeffs.dtype)
            coeffs[:, o + n : o + 2 * n] = (-_SQRT2 * z.imag).to(coeffs.dtype)


def _disk_coordinates(box: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask r < box/2, r, theta) of the pixels; centre pixel box//2, x = column, y = row."""
    c = np.arange(box) - box // 2
    x, y = np.meshgrid(c, c)
    r = np.hypot(x, y)
    return r < box / 2.0, r, np.arctan2(y, x)


def _orthonormalise(phi: torch.Tensor, tol: float = 1e-6, max_iter: int = 8) -> torch.Tensor:
    """Polar factor phi (phi^T phi)^{-1/2} by Newton-Schulz (phi already near-orthonormal)."""
    eye = torch.eye(phi.shape[1], dtype=phi.dtype)
    for _ in range(max_iter):
        gram = phi.T @ phi
        err = float((gram - eye).abs().max())
        if err < tol:
            break
        if err > 0.9:  # Newton-Schulz needs singular values in (0, sqrt(3)); never expected here
            raise CryosiftError(f"steerable basis is too far from orthonormal ({err:.2f})")
        phi = 0.5 * phi @ (3.0 * eye - gram)
    return phi


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
    columns: list[np.ndarray] = []
    ks: list[int] = []
    sizes: list[int] = []
    offsets: list[int] = []
    offset = 0
    k = 0
    while True:
        zeros = jn_zeros(k, int(xmax / math.pi) + 2)
        zeros = zeros[zeros < xmax]
        if not len(zeros):
            break
        # J_k on a fine grid, splined to the pixel radii (|error| < 1e-7): far cheaper than
        # evaluating the Bessel function at every (radius, zero) pair for large orders.
        radial = CubicSpline(grid, jv(k, grid))(np.outer(radii, zeros) / radius)[inverse]
        gram = radial.T @ radial
        w, v = np.linalg.eigh(gram)
        radial = radial @ (v / np.sqrt(w)) @ v.T  # Loewdin within the block
        if k == 0:
            columns.append(radial)
        else:
            columns.append(_SQRT2 * radial * np.cos(k * tp)[:, None])
            columns.append(_SQRT2 * radial * np.sin(k * tp)[:, None])
        ks.append(k)
        sizes.append(len(zeros))
        offsets.append(offset)
        offset += len(zeros) * (1 if k == 0 else 2)
        k += 1
    phi = torch.from_numpy(np.concatenate(columns, axis=1))
    if phi.shape[1] > 3000:  # big boxes: float32 arithmetic (orthonormal to ~1e-6 anyway)
        phi = phi.float()
    phi = _orthonormalise(phi).to(torch.float32).contiguous()
    return SteerableBasis(
        box=box,
        bandlimit=float(bandlimit),
        mask=torch.from_numpy(mask),
        phi=phi,
        ks=tuple(ks),
        sizes=tuple(sizes),
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
        high = (fx**2 + fy**2).sqrt() >= NOISE_MIN_FREQ
        self.weight = _rfft_weights(box) * high
        self.count = float(self.weight.sum())
        self.sum_level = 0.0
        self.sum_power = 0.0
        self.n = 0

    def add(self, images: torch.Tensor) -> None:
        x = images.to(torch.float64)
        corner = self.corner.to(x.dtype)
        level = (x * corner).sum((-2, -1)) / self.n_corner
        spectrum = torch.fft.rfft2((x - level[:, None, None]) * corner)
        power = spectrum.real**2 + spectrum.imag**2
        self.sum_power += float((power * self.weight).sum())
        self.sum_level += float(level.sum())
        self.n += x.shape[0]

    @property
    def background(self) -> float:
        return self.sum_level / max(self.n, 1)

    @property
    def noise_var(self) -> float:
        return self.sum_power / max(self.n * self.count * self.n_corner, 1.0)


def estimate_noise_var(images: Any, chunk: int = 1024) -> float:
    """White-noise variance of a stack from its corners' high-frequency power (module doc)."""
    arr = _check_stack(images)
    stats = _CornerStatistics(arr.shape[-1])
    for start in range(0, len(arr), chunk):
        stats.add(_load(arr, slice(start, start + chunk)))
    return stats.noise_var


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


def _psd_power(a: torch.Tensor, power: float, floor: float = 0.0) -> torch.Tensor:
    """a^power for a Hermitian PSD matrix (eigenvalues clamped at floor * max)."""
    w, v = torch.linalg.eigh(_hermitian(a))
    w = w.clamp_min(max(floor * float(w.max()), 0.0))
    if power < 0:
        w = torch.where(w > 0, w, torch.full_like(w, math.inf))
    return (v * w.pow(power).to(v.dtype)) @ v.mH


def _psd_part(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(_hermitian(a))
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


def _padded(images: torch.Tensor, box: int) -> torch.Tensor:
    """Images (B, box, box) centred in a (B, 2 box, 2 box) field of zeros."""
    out = torch.zeros(images.shape[0], 2 * box, 2 * box, dtype=images.dtype)
    lo = box // 2
    out[:, lo : lo + box, lo : lo + box] = images
    return out


def _apply_ctf(images: torch.Tensor, ctf: torch.Tensor) -> torch.Tensor:
    """Each image times its CTF (on the 2x padded rfft grid), cropped back to the box."""
    box = images.shape[-1]
    spec = torch.fft.rfft2(_padded(images, box)) * ctf
    lo = box // 2
    return torch.fft.irfft2(spec, s=(2 * box, 2 * box))[:, lo : lo + box, lo : lo + box]


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
        rotation_invariant: bool = True,
        bandlimit: float = 0.9,
        shrinker: str = "frobenius",
        defocus_groups: int = 16,
        ctf_corrected: bool = False,
        use_ctf: bool = True,
        max_fit_images: int = 20000,
        regularization: float = 1e-4,
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
        if defocus_groups < 1 or max_fit_images < 1 or chunk < 1:
            raise CryosiftError("defocus_groups, max_fit_images and chunk must be at least 1")
        self.noise_var = noise_var
        self.rotation_invariant = bool(rotation_invariant)
        self.bandlimit = float(bandlimit)
        self.shrinker = shrinker
        self.defocus_groups = int(defocus_groups)
        self.ctf_corrected = bool(ctf_corrected)
        self.use_ctf = bool(use_ctf)
        self.max_fit_images = int(max_fit_images)
        self.regularization = float(regularization)
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
        """Estimate noise level, mean and covariance from ``images`` (N, box, box)."""
        t0 = time.time()
        images = _check_stack(images)
        n_all, box = images.shape[0], images.shape[-1]
        ctf = self.use_ctf and has_ctf(metadata)
        if ctf:
            if len(metadata) != n_all:
                raise CryosiftError(f"CWF got {n_all} images but {len(metadata)} metadata rows")
            if pixel_size is None or not pixel_size > 0:
                raise CryosiftError("CTF-aware CWF needs the pixel size")
            if not self.rotation_invariant:
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
        stats2 = _BlockStatistics(self.basis_, n_groups, self.rotation_invariant)
        ctf_sum = torch.zeros(n_groups, 2 * box, box + 1, dtype=torch.float64) if ctf else None
        pos = 0
        for rows in progress(chunks, total=len(chunks), desc="CWF statistics", unit="chunk"):
            y = _load(images, _as_index(rows)) - self.background_
            g = torch.from_numpy(groups[pos : pos + len(rows)])
            pos += len(rows)
            stats2.add(self.basis_.expand(y), g)
            if ctf_sum is not None:
                c = batch_ctf(metadata.iloc[rows], 2 * box, float(pixel_size)).double()
                ctf_sum.index_add_(0, g, c)
        counts = stats2.counts
        if ctf_sum is not None:
            group_ctf = hermitian_nyquist(ctf_sum / counts.clamp_min(1.0)[:, None, None])
            h = _ctf_blocks(self.basis_, group_ctf)
        else:
            h = None
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
        for b in range(len(st.outer)):
            S = st.outer[b]  # (G, n_b, n_b): sum z z^*
            dim = S.shape[-1]
            eye = torch.eye(dim, dtype=S.dtype)
            H = h[b] if h is not None else eye.expand(S.shape[0], dim, dim)
            A = H.mH @ H
            # mean (only in the mean block: k = 0, or everything without rotation invariance)
            if st.sums[b] is not None:
                s = st.sums[b]  # (G, n_b)
                lhs = (counts[:, None, None] * A).sum(0)
                rhs = (H.mH @ s[..., None]).sum(0)[:, 0]
                lhs = lhs + 1e-10 * float(lhs.diagonal().real.mean()) * eye
                mu = torch.linalg.solve(lhs, rhs)
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
            gamma = dim / max(samples, 1.0)
            B = _hermitian((H.mH @ S @ H).sum(0) / n)
            if sigma2 > 0:
                noise = _hermitian(sigma2 * (counts[:, None, None] * A).sum(0) / n)
                w_half = _psd_power(noise, 0.5)
                w_inv = _psd_power(noise, -0.5, floor=1e-10)
                ell, u = torch.linalg.eigh(_hermitian(w_inv @ B @ w_inv))
                eta = shrink_eigenvalues(ell, gamma, self.shrinker)
                self.n_components_ += int((eta > 0).sum()) * (1 if st.real[b] else 2)
                T = w_half @ ((u * eta.to(u.dtype)) @ u.mH) @ w_half
            else:
                T = B
                self.n_components_ += int(torch.linalg.matrix_rank(B)) * (1 if st.real[b] else 2)
            if h is None:
                C = _psd_part(T)
            else:
                C = _psd_part(self._deconvolve(A, counts / n, T))
            self.cov_.append(C)
            # Wiener matrices per group: W = C H^* (H C H^* + sigma^2 I)^{-1}
            HC = H @ C
            M = HC @ H.mH + sigma2 * eye
            floor = 1e-12 * float(M.diagonal(dim1=-2, dim2=-1).real.abs().max()) + 1e-300
            M = M + floor * eye
            self.wiener_.append(torch.linalg.solve(M, HC).mH)

    def _deconvolve(self, A: torch.Tensor, weights: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """C solving sum_g w_g A_g C A_g = T (Kronecker form, Tikhonov-regularised)."""
        dim = T.shape[-1]
        # row-major vec: vec(A C A) = (A kron A^T) vec(C)
        K = torch.zeros(dim * dim, dim * dim, dtype=T.dtype)
        for g in range(A.shape[0]):
            if weights[g] > 0:
                K += float(weights[g]) * torch.kron(A[g], A[g].transpose(-2, -1))
        rho = self.regularization * float(K.diagonal().real.mean()) + 1e-300
        K += rho * torch.eye(dim * dim, dtype=K.dtype)
        return torch.linalg.solve(K, T.reshape(-1)).reshape(dim, dim)

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
            groups = np.searchsorted(self.group_edges_, _mean_defocus(metadata), side="right")
        else:
            groups = np.zeros(n, dtype=np.int64)
        out = np.empty((n, self.box_, self.box_), dtype=np.float32)
        starts = range(0, n, self.chunk)
        for start in progress(starts, total=len(starts), desc="CWF apply", unit="chunk"):
            stop = min(start + self.chunk, n)
            y = _load(images, slice(start, stop)) - self.background_
            x = self._filter_chunk(y, groups[start:stop])
            if self.ctf_ and not self.ctf_corrected:
                c = batch_ctf(metadata.iloc[start:stop], 2 * self.box_, self.pixel_size_)
                x = _apply_ctf(x, hermitian_nyquist(c))
            out[start:stop] = (x + self.background_).numpy()
        return out

    def _filter_chunk(self, y: torch.Tensor, groups: np.ndarray) -> torch.Tensor:
        basis = self.basis_
        coeffs = basis.expand(y).to(torch.float64)
        result = torch.empty_like(coeffs)
        for g in np.unique(groups):
            rows = torch.from_numpy(np.flatnonzero(groups == g))
            c = coeffs[rows]
            part = torch.empty_like(c)
            if self.rotation_invariant:
                for b in range(len(basis.ks)):
                    z = basis.block(c, b)
                    if self.mean_[b] is not None:
                        z = (z - self.hmean_[b][g]) @ self.wiener_[b][g].T + self.mean_[b]
                    else:
                        z = z @ self.wiener_[b][g].T
                    basis.set_block(part, b, z)
            else:
                part = (c - self.hmean_[0][g]) @ self.wiener_[0][g].T + self.mean_[0]
            result[rows] = part
        return basis.evaluate(result)


def _as_index(rows: np.ndarray) -> slice | np.ndarray:
    """A contiguous run of rows as a slice (fast for memory-mapped stacks)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows


class _BlockStatistics:
    """Streaming sums of coefficients and their outer products, per block and defocus group."""

    def __init__(self, basis: SteerableBasis, n_groups: int, invariant: bool) -> None:
        self.basis = basis
        self.invariant = invariant
        self.counts = torch.zeros(n_groups, dtype=torch.float64)
        if invariant:
            self.outer = [torch.zeros(n_groups, n, n, dtype=torch.complex128) for n in basis.sizes]
            self.sums: list[torch.Tensor | None] = [
                torch.zeros(n_groups, n, dtype=torch.complex128) if k == 0 else None
                for k, n in zip(basis.ks, basis.sizes, strict=True)
            ]
            self.real = [k == 0 for k in basis.ks]
        else:
            m = basis.n_functions
            self.outer = [torch.zeros(n_groups, m, m, dtype=torch.float64)]
            self.sums = [torch.zeros(n_groups, m, dtype=torch.float64)]
            self.real = [True]

    def add(self, coeffs: torch.Tensor, groups: torch.Tensor) -> None:
        self.counts.index_add_(0, groups, torch.ones(len(groups), dtype=torch.float64))
        coeffs = coeffs.to(torch.float64)
        for g in torch.unique(groups).tolist():
            c = coeffs[groups == g]
            if not self.invariant:
                self.outer[0][g] += c.T @ c
                self.sums[0][g] += c.sum(0)
                continue
            for b in range(len(self.basis.ks)):
                z = self.basis.block(c, b)
                self.outer[b][g] += z.T @ z.conj()
                if self.sums[b] is not None:
                    self.sums[b][g] += z.sum(0)


def _ctf_blocks(basis: SteerableBasis, group_ctf: torch.Tensor) -> list[torch.Tensor]:
    """H_kg = <psi_kq, A_g psi_kq'> for every block: (G, n_k, n_k) complex128.

    A_g multiplies an image's 2x-padded rfft2 by the group CTF; by Parseval the real block
    Q = Phi_k^T A_g Phi_k is sum_f w_f CTF_g(f) Re(conj(F phi_a) F phi_b) / (2 box)^2.
    """
    box = basis.box
    weight = _rfft_weights(2 * box).reshape(-1)
    ctf = group_ctf.reshape(group_ctf.shape[0], -1) * weight / float((2 * box) ** 2)
    ctf2 = torch.cat([ctf, ctf], dim=1)  # real and imaginary parts of the spectra
    out = []
    mask = basis.mask.reshape(-1)
    for b, k in enumerate(basis.ks):
        o, n, width = basis.offsets[b], basis.sizes[b], basis.width(b)
        images = torch.zeros(width, box * box, dtype=torch.float64)
        images[:, mask] = basis.phi[:, o : o + width].T.to(torch.float64)
        spec = torch.fft.rfft2(_padded(images.reshape(width, box, box), box)).reshape(width, -1)
        x = torch.cat([spec.real, spec.imag], dim=1)  # (width, 2F)
        q = torch.stack([(x * c) @ x.T for c in ctf2])  # (G, width, width)
        if k == 0:
            h = q.to(torch.complex128)
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


DEFAULTS: dict[str, Any] = {
    "noise_var": None,
    "rotation_invariant": True,
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
