"""Fourier ring correlation (FRC) and the resolution where it crosses a threshold.

Rings are one Fourier pixel wide (SPEC): a pixel at integer frequency (ky, kx) of the
*unshifted* ``np.fft.fft2`` grid belongs to ring ``r = round(sqrt(kx^2 + ky^2))``. The curve is
reported for rings 0 .. box//2 (0 to Nyquist), at spatial frequency ``r / box`` cycles/pixel;
the corner pixels beyond Nyquist are left out. Ring 0 is the mean (DC) term.

FRC(r) = Re(sum_ring A conj(B)) / sqrt(sum_ring |A|^2 * sum_ring |B|^2).

Internally the sums use ``rfft2`` with each non-self-conjugate column counted twice, which
gives exactly the full-grid sums at half the cost; stacks are processed in chunks so memory
stays bounded by the chunk, not the stack.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import scipy.fft
from numpy.typing import ArrayLike
from scipy import sparse

from cryosift.metrics._arrays import as_pair

__all__ = [
    "FRC_CLEAN",
    "FRC_HALVES",
    "ring_index",
    "ring_counts",
    "ring_frequencies",
    "frc",
    "frc_resolution",
    "half_bit_threshold",
]

FRC_CLEAN = 0.5
"""Threshold for an FRC against a clean (noise-free) reference (SPEC)."""
FRC_HALVES = 0.143
"""Threshold for an FRC between two independent noisy halves (SPEC; Rosenthal & Henderson)."""

Aggregate = Literal["pool", "mean", "none"]
_CHUNK_PIXELS = 1 << 24  # 16 M pixels per FFT chunk: a few hundred MB of temporaries at most


def ring_index(box: int) -> np.ndarray:
    """Ring number of every pixel of the unshifted ``np.fft.fft2`` grid of a box, (box, box) int.

    r = round(sqrt(kx^2 + ky^2)) with kx, ky integer frequencies (``np.fft.fftfreq(box) * box``).
    Values above box//2 are the corners beyond Nyquist, which the FRC ignores. Apply
    ``np.fft.fftshift`` to get the centred layout.
    """
    k = np.rint(np.fft.fftfreq(box) * box)
    return np.rint(np.hypot(k[:, None], k[None, :])).astype(np.int64)


@lru_cache(maxsize=16)
def _rfft_rings(box: int) -> tuple[np.ndarray, sparse.csr_matrix]:
    """How to sum ``rfft2`` coefficients into rings 0 .. box//2 of the full fft2 grid.

    Returns (positions kept in the flattened rfft2 grid, a sparse (kept, R) matrix): entry
    (k, r) is the weight of coefficient k in ring r, 2 for columns whose conjugate twin lives
    in the dropped half of the spectrum, 1 for the self-conjugate columns (kx = 0 and, for even
    boxes, kx = box/2). ``values[:, keep] @ matrix`` then gives the full-grid ring sums.
    """
    ky = np.rint(np.fft.fftfreq(box) * box)
    kx = np.rint(np.fft.rfftfreq(box) * box)
    rings = np.rint(np.hypot(ky[:, None], kx[None, :])).astype(np.int64)
    weight = np.full(kx.shape, 2.0)
    weight[0] = 1.0
    if box % 2 == 0:
        weight[-1] = 1.0
    weight = np.broadcast_to(weight, rings.shape).ravel()
    rings = rings.ravel()
    keep = np.flatnonzero(rings <= box // 2)
    keep.setflags(write=False)
    matrix = sparse.csr_matrix(
        (weight[keep], (np.arange(keep.size), rings[keep])), shape=(keep.size, box // 2 + 1)
    )
    return keep, matrix


def ring_counts(box: int) -> np.ndarray:
    """Number of Fourier pixels in each ring 0 .. box//2 (of the full fft2 grid), int array."""
    return np.bincount(ring_index(box).ravel(), minlength=box // 2 + 1)[: box // 2 + 1]


def ring_frequencies(box: int) -> np.ndarray:
    """Spatial frequency of rings 0 .. box//2 in cycles/pixel: r / box (Nyquist = 0.5 for even)."""
    return np.arange(box // 2 + 1, dtype=np.float64) / box


def _ring_sums(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image ring sums of Re(A conj B), |A|^2, |B|^2 for a chunk, each (n, R) float64."""
    n, box = a.shape[0], a.shape[1]
    keep, matrix = _rfft_rings(box)
    # scipy.fft: same transform as numpy.fft, several times faster here; float32 stays float32
    fa = scipy.fft.rfft2(a).reshape(n, -1)[:, keep]
    fb = scipy.fft.rfft2(b).reshape(n, -1)[:, keep]
    cross = (fa.real * fb.real + fa.imag * fb.imag) @ matrix
    pa = (fa.real**2 + fa.imag**2) @ matrix
    pb = (fb.real**2 + fb.imag**2) @ matrix
    return cross, pa, pb


def _normalise(cross: np.ndarray, pa: np.ndarray, pb: np.ndarray, eps: float) -> np.ndarray:
    """cross / sqrt(pa * pb) along the last axis, 0 for rings without power.

    A ring counts as powerless when its power is at most (16 eps)^2 times the total power of
    that input over all rings: FFT round-off leaves about eps^2 log(P) of the total in a ring,
    and the ratio of two round-off residues would otherwise come out as a meaningless +-1.
    """
    floor = (16.0 * eps) ** 2
    has_a = pa > floor * pa.sum(axis=-1, keepdims=True)
    has_b = pb > floor * pb.sum(axis=-1, keepdims=True)
    den = np.sqrt(pa * pb)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(has_a & has_b & (den > 0), cross / den, 0.0)


def frc(a: ArrayLike, b: ArrayLike, aggregate: Aggregate = "pool") -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of two images or stacks: (frequency, curve).

    `frequency` is r / box in cycles/pixel for rings 0 .. box//2. `a` and `b` are (H, W) or
    (N, H, W) with H = W; a single image is broadcast against a stack. `aggregate`:

    * ``"pool"`` (default): cross- and auto-spectra summed over the whole stack before
      normalising -> one curve (R,). The right choice for a stack of noisy images: it is the FRC
      of the stack seen as one big signal and is not biased by per-image normalisation.
    * ``"mean"``: the average of the per-image curves -> (R,).
    * ``"none"``: the per-image curves -> (N, R).

    Rings with zero power in either input (up to FFT round-off, see `_normalise`) give 0.
    """
    x, y = as_pair(a, b, names=("a", "b"))
    n, h, w = x.shape
    if h != w:
        raise ValueError(f"FRC needs square images, got {h}x{w}")
    if aggregate not in ("pool", "mean", "none"):
        raise ValueError(f"aggregate must be 'pool', 'mean' or 'none', got {aggregate!r}")
    nr = h // 2 + 1
    # round-off level of the FFT: scipy.fft transforms float32 in single precision
    eps = float(np.finfo(np.result_type(x.dtype, y.dtype, np.float32)).eps)
    chunk = max(1, _CHUNK_PIXELS // (h * w))
    if aggregate == "pool":
        acc = np.zeros((3, nr))
    else:
        curves = np.empty((n, nr))
    for start in range(0, n, chunk):  # loop over chunks of images, not pixels
        cross, pa, pb = _ring_sums(x[start : start + chunk], y[start : start + chunk])
        if aggregate == "pool":
            acc += np.stack([cross.sum(0), pa.sum(0), pb.sum(0)])
        else:
            curves[start : start + chunk] = _normalise(cross, pa, pb, eps)
    freq = ring_frequencies(h)
    if aggregate == "pool":
        return freq, _normalise(*acc, eps)
    if aggregate == "mean":
        return freq, curves.mean(axis=0)
    return freq, curves


def half_bit_threshold(box: int) -> np.ndarray:
    """The 1/2-bit information threshold per ring (van Heel & Schatz 2005), shape (box//2 + 1,).

    T(n) = (0.2071 + 1.9102/sqrt(n)) / (1.2071 + 0.9102/sqrt(n)) with n the pixel count of the
    ring; it tends to 0.1716 for large rings. Pass it as `threshold` to `frc_resolution` for
    half-data FRCs as an alternative to the fixed 0.143.
    """
    s = np.sqrt(ring_counts(box).astype(np.float64))
    return (0.2071 * s + 1.9102) / (1.2071 * s + 0.9102)


def frc_resolution(
    freq: ArrayLike,
    curve: ArrayLike,
    threshold: float | ArrayLike = FRC_CLEAN,
    pixel_size: float | None = None,
) -> float:
    """Resolution (Å, or pixels if `pixel_size` is None) where an FRC first falls below a threshold.

    The search starts at ring 1 (ring 0, the mean, says nothing about resolution). At the first
    ring i >= 2 with ``curve[i] < threshold`` the crossing frequency is interpolated linearly
    between rings i-1 and i, and the resolution is ``pixel_size / f``. `threshold` may be a
    scalar or a per-ring array (e.g. `half_bit_threshold`). Edge cases, chosen so the value is
    always finite and conservative:

    * never below the threshold up to the last ring: the Nyquist resolution ``2 * pixel_size``
      (the data support at least that; the true value may be finer);
    * already below at ring 1: the resolution of ring 1, ``pixel_size / freq[1]`` (= box size
      times pixel size), the coarsest resolution the curve can express.
    """
    f = np.asarray(freq, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    if f.ndim != 1 or c.shape != f.shape:
        raise ValueError(f"freq and curve must be 1-D of equal length, got {f.shape} and {c.shape}")
    if f.size < 2:
        raise ValueError("an FRC curve needs at least rings 0 and 1")
    thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), c.shape)
    px = 1.0 if pixel_size is None else float(pixel_size)
    if px <= 0:
        raise ValueError(f"pixel_size must be positive, got {pixel_size}")
    d = c - thr
    below = np.flatnonzero(d[1:] < 0) + 1
    if below.size == 0:
        return 2.0 * px
    i = int(below[0])
    if i == 1:
        return px / f[1]
    t = d[i - 1] / (d[i - 1] - d[i])  # d[i-1] >= 0 > d[i], so 0 <= t < 1
    fc = f[i - 1] + t * (f[i] - f[i - 1])
    return px / fc


class FrcAccumulator:
    """Pooled FRC over a stack that arrives in chunks (memory bounded by one chunk).

    Equivalent to ``frc(a, b, aggregate="pool")`` on the concatenated stacks.
    """

    def __init__(self, box: int) -> None:
        self.box = box
        self._acc = np.zeros((3, box // 2 + 1))
        self._eps = float(np.finfo(np.float32).eps)

    def add(self, a: ArrayLike, b: ArrayLike) -> None:
        x, y = as_pair(a, b, names=("a", "b"))
        if x.shape[-1] != self.box:
            raise ValueError(f"FRC accumulator for box {self.box} got images of {x.shape[-1]} px")
        dtype = np.result_type(x.dtype, y.dtype, np.float32)
        self._eps = max(self._eps, float(np.finfo(dtype).eps))
        cross, pa, pb = _ring_sums(x, y)
        self._acc += np.stack([cross.sum(0), pa.sum(0), pb.sum(0)])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(frequency in cycles/pixel, pooled FRC curve)."""
        return ring_frequencies(self.box), _normalise(*self._acc, self._eps)
