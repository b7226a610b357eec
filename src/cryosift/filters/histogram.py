"""Histogram equalisation: global (batched) and contrast-limited adaptive (CLAHE, per image).

``histeq`` reproduces ``skimage.exposure.equalize_hist(image, nbins)`` on every image of a batch
without a Python loop: per-image bin edges exactly as numpy.histogram builds them (float32
linspace between the image's min and max), bin membership with numpy's edge corrections (so the
counts are numpy's), the normalised cumulative histogram evaluated at the bin centres, and
linear interpolation of it at every pixel (numpy.interp's rule, clamped outside the centres). The
output lies in (0, 1]; a constant image maps to 0.5 everywhere, as in skimage.

``clahe`` calls ``skimage.exposure.equalize_adapthist`` image by image (scikit-image has no
batched CLAHE) after rescaling each image to [0, 1] by its own min and max; a small thread pool
overlaps the images where numpy releases the GIL.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cryosift.errors import CryosiftError
from cryosift.filters.base import BatchContext, Filter, int_at_least, positive, register

__all__ = ["Clahe", "HistEq", "equalize_hist_batch"]


def equalize_hist_batch(images: np.ndarray, nbins: int = 256) -> np.ndarray:
    """skimage.exposure.equalize_hist applied to each image of (B, H, W), float32 out."""
    x = np.ascontiguousarray(images, dtype=np.float32)
    n_img = x.shape[0]
    flat = x.reshape(n_img, -1)
    lo = flat.min(axis=1)
    hi = flat.max(axis=1)
    flat_img = hi == lo
    # numpy.histogram: range (min, max), widened by 0.5 on each side for a constant image
    first = np.where(flat_img, lo.astype(np.float64) - 0.5, lo.astype(np.float64))
    last = np.where(flat_img, hi.astype(np.float64) + 0.5, hi.astype(np.float64))
    edges = np.linspace(first, last, nbins + 1, axis=1, dtype=np.float32)  # (B, nbins+1)
    # first guess of each pixel's bin, then numpy's exact corrections against the float32 edges
    scale = nbins / (last - first)
    idx = ((flat - first[:, None]) * scale[:, None]).astype(np.int64)
    np.clip(idx, 0, nbins - 1, out=idx)
    row = (np.arange(n_img, dtype=np.int64) * (nbins + 1))[:, None]
    e = edges.reshape(-1)
    idx -= flat < e[row + idx]
    idx += (flat >= e[row + idx + 1]) & (idx != nbins - 1)
    np.clip(idx, 0, nbins - 1, out=idx)
    counts = np.bincount(
        (idx + (np.arange(n_img, dtype=np.int64) * nbins)[:, None]).reshape(-1),
        minlength=n_img * nbins,
    ).reshape(n_img, nbins)
    cdf = np.cumsum(counts, axis=1).astype(np.float64)
    cdf = (cdf / cdf[:, -1:]).astype(np.float32)  # skimage casts the cdf to float32
    centres = ((edges[:, :-1] + edges[:, 1:]) / np.float32(2.0)).astype(np.float64)
    cdf64 = cdf.astype(np.float64)
    # numpy.interp: j = last centre <= x (clamped), linear between centres j and j+1
    j = idx - (flat.astype(np.float64) < np.take_along_axis(centres, idx, axis=1))
    below = j < 0
    np.clip(j, 0, nbins - 2, out=j)
    c0 = np.take_along_axis(centres, j, axis=1)
    c1 = np.take_along_axis(centres, j + 1, axis=1)
    f0 = np.take_along_axis(cdf64, j, axis=1)
    f1 = np.take_along_axis(cdf64, j + 1, axis=1)
    out = (f1 - f0) / (c1 - c0) * (flat - c0) + f0
    out = np.where(below, cdf64[:, :1], out)
    out = np.where(flat >= centres[:, -1:], cdf64[:, -1:], out)
    return out.astype(np.float32).reshape(x.shape)


@register
class HistEq(Filter):
    """Global histogram equalisation per image (skimage equalize_hist semantics, [0, 1] out)."""

    name = "histeq"

    def __init__(self, nbins: int = 256) -> None:
        self.nbins = int_at_least(nbins, 2, "histeq nbins")

    def params(self) -> dict[str, Any]:
        return {"nbins": self.nbins}

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        return equalize_hist_batch(images, self.nbins)


def _unit_range(img: np.ndarray) -> np.ndarray:
    """One image rescaled to [0, 1] by its min and max (a constant image becomes zeros)."""
    x = img.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


@register
class Clahe(Filter):
    """Contrast-limited adaptive histogram equalisation (skimage equalize_adapthist), per image.

    ``kernel_size`` None is skimage's default (1/8 of the image size); ``clip_limit`` in (0, 1].
    """

    name = "clahe"

    def __init__(
        self, clip_limit: float = 0.01, kernel_size: int | None = None, nbins: int = 256
    ) -> None:
        self.clip_limit = positive(clip_limit, "clahe clip_limit")
        if self.clip_limit > 1:
            raise CryosiftError(f"clahe clip_limit must lie in (0, 1], got {clip_limit!r}")
        self.kernel_size = (
            None if kernel_size is None else int_at_least(kernel_size, 1, "clahe kernel_size")
        )
        self.nbins = int_at_least(nbins, 2, "clahe nbins")

    def params(self) -> dict[str, Any]:
        return {"clip_limit": self.clip_limit, "kernel_size": self.kernel_size,
                "nbins": self.nbins, "prescale": "min-max to [0, 1] per image"}

    def check(self, pixel_size: float | None, box: int) -> None:
        super().check(pixel_size, box)
        if self.kernel_size is not None and self.kernel_size > box:
            raise CryosiftError(
                f"clahe kernel_size {self.kernel_size} px is larger than the {box}-px box"
            )

    def _one(self, img: np.ndarray) -> np.ndarray:
        from skimage.exposure import equalize_adapthist

        return equalize_adapthist(
            _unit_range(img), kernel_size=self.kernel_size, clip_limit=self.clip_limit,
            nbins=self.nbins,
        )

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        out = np.empty(images.shape, dtype=np.float32)
        workers = min(len(images), os.cpu_count() or 1)
        if workers <= 1:
            for i, img in enumerate(images):
                out[i] = self._one(img)
            return out

        def run(i: int) -> None:
            out[i] = self._one(images[i])

        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(run, range(len(images))))
        return out
