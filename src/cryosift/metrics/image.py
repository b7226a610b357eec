"""Per-image fidelity metrics of a prediction against a reference: MSE, PSNR, SI-PSNR, CC, SSIM.

Every function takes `pred` and `ref` as (N, H, W) stacks or single (H, W) images (a single
image counts as N = 1 and is broadcast against a stack) and returns one value per image,
shape (N,), as float64. Conventions follow SPEC "Conventions":

* PSNR uses ``data_range = ref.max() - ref.min()`` of *each* reference image unless a range is
  given; cryo-EM images are zero-mean floats, so a dtype-derived range (skimage's default) would
  be meaningless.
* A reference with zero range (a constant image, e.g. the clean content of pure-noise junk)
  makes PSNR, SI-PSNR, CC and SSIM undefined: those images get NaN, and `image_metrics`
  averages over the images where the metric is defined.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from skimage.metrics import structural_similarity

from cryosift.metrics._arrays import as_pair, resolve_range

__all__ = [
    "mse",
    "psnr",
    "rescale_to_reference",
    "scale_invariant_psnr",
    "cc",
    "ssim",
    "image_metrics",
    "nanmean_float",
]

_AXES = (1, 2)


def mse(pred: ArrayLike, ref: ArrayLike) -> np.ndarray:
    """Mean squared error of each image, shape (N,)."""
    p, r = as_pair(pred, ref)
    return np.mean(np.square(p - r), axis=_AXES, dtype=np.float64)


def _psnr_from_mse(err: np.ndarray, rng: np.ndarray) -> np.ndarray:
    """10 log10(range^2 / mse); NaN where range <= 0, +inf where mse == 0 < range."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(rng**2 / err)
    out = np.where(rng > 0, out, np.nan)
    return out.astype(np.float64)


def psnr(pred: ArrayLike, ref: ArrayLike, data_range: ArrayLike | None = None) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image, shape (N,).

    PSNR = 10 log10(data_range^2 / MSE). `data_range` defaults to the reference's own
    max - min per image (SPEC); pass a scalar or one value per image to override. A zero
    range gives NaN, a perfect prediction +inf.
    """
    p, r = as_pair(pred, ref)
    return _psnr_from_mse(mse(p, r), resolve_range(data_range, r))


def _centre(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x minus its per-image mean, the per-image mean in float64)."""
    m = x.mean(axis=_AXES, dtype=np.float64)
    return x - m.astype(x.dtype)[:, None, None], m


def _ls_gain(pc: np.ndarray, rc: np.ndarray) -> np.ndarray:
    """Least-squares gain a minimising |a*pc - rc|^2 per image (0 for a constant prediction)."""
    cov = np.sum(pc * rc, axis=_AXES, dtype=np.float64)
    var_p = np.sum(pc * pc, axis=_AXES, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var_p > 0, cov / var_p, 0.0)


def rescale_to_reference(pred: ArrayLike, ref: ArrayLike) -> np.ndarray:
    """The prediction rescaled to the reference: a*pred + b with (a, b) fitted per image by
    least squares. Used by SI-PSNR; handy to display a denoiser output on the clean scale."""
    p, r = as_pair(pred, ref)
    pc, _ = _centre(p)
    rc, rm = _centre(r)
    a = _ls_gain(pc, rc)
    return a[:, None, None] * pc + rm[:, None, None]


def scale_invariant_psnr(pred: ArrayLike, ref: ArrayLike) -> np.ndarray:
    """PSNR after rescaling the prediction to the reference by least squares, shape (N,).

    Why: N2N/N2V outputs have an arbitrary gain and offset, which plain PSNR punishes.
    Choice: per image, fit ``a*pred + b`` to `ref` by least squares (``b`` absorbs the means,
    ``a = cov(pred, ref) / var(pred)``, ``a = 0`` for a constant prediction), then PSNR of the
    fit against `ref` with the reference's range. This is exactly CAREamics'
    ``scale_invariant_psnr`` (both images zero-mean, reference divided by its std, prediction
    scaled by least squares, range (max - min) / std): PSNR does not change when error and
    range are scaled together. SI-PSNR >= PSNR for every prediction, and it is unchanged by
    ``pred -> c*pred + d`` for any c != 0.
    """
    p, r = as_pair(pred, ref)
    pc, _ = _centre(p)
    rc, _ = _centre(r)
    a = _ls_gain(pc, rc).astype(p.dtype)
    err = np.mean(np.square(a[:, None, None] * pc - rc), axis=_AXES, dtype=np.float64)
    return _psnr_from_mse(err, resolve_range(None, r))


def cc(pred: ArrayLike, ref: ArrayLike) -> np.ndarray:
    """Pearson correlation coefficient of each image pair, shape (N,); NaN if either is constant.

    Invariant to gain and offset of either image, so it compares denoisers with different
    output scales (SPEC: "CC is Pearson correlation per image").
    """
    p, r = as_pair(pred, ref)
    pc, _ = _centre(p)
    rc, _ = _centre(r)
    cov = np.sum(pc * rc, axis=_AXES, dtype=np.float64)
    var_p = np.sum(pc * pc, axis=_AXES, dtype=np.float64)
    var_r = np.sum(rc * rc, axis=_AXES, dtype=np.float64)
    den = np.sqrt(var_p * var_r)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, cov / den, np.nan)
    return np.clip(out, -1.0, 1.0)


def ssim(
    pred: ArrayLike, ref: ArrayLike, data_range: ArrayLike | None = None, **kwargs: Any
) -> np.ndarray:
    """Structural similarity of each image, shape (N,), via skimage's `structural_similarity`.

    The data range is always passed explicitly (reference max - min per image by default):
    skimage would otherwise assume [-1, 1] for floats. Extra keyword arguments (`win_size`,
    `gaussian_weights`, ...) go to skimage. Zero range gives NaN.
    """
    p, r = as_pair(pred, ref)
    rng = resolve_range(data_range, r)
    out = np.full(p.shape[0], np.nan, dtype=np.float64)
    for i in range(p.shape[0]):  # skimage works on one image at a time
        if rng[i] > 0:
            out[i] = structural_similarity(
                np.asarray(p[i], dtype=np.float64),
                np.asarray(r[i], dtype=np.float64),
                data_range=float(rng[i]),
                **kwargs,
            )
    return out


def nanmean_float(values: ArrayLike) -> float:
    """Mean over the finite-or-infinite (non-NaN) values as a Python float; NaN if none."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def image_metrics(pred: ArrayLike, ref: ArrayLike) -> dict[str, float]:
    """Stack averages of psnr, si_psnr, cc, ssim and mse as plain floats (JSON-ready).

    Keys: ``psnr``, ``si_psnr``, ``cc``, ``ssim``, ``mse``. Images where a metric is undefined
    (constant reference -> NaN) are left out of that metric's average; a perfect prediction's
    +inf PSNR is kept (the mean becomes +inf).
    """
    p, r = as_pair(pred, ref)
    return {
        "psnr": nanmean_float(psnr(p, r)),
        "si_psnr": nanmean_float(scale_invariant_psnr(p, r)),
        "cc": nanmean_float(cc(p, r)),
        "ssim": nanmean_float(ssim(p, r)),
        "mse": nanmean_float(mse(p, r)),
    }
