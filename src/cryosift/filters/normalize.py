"""RELION-style per-image normalisation and contrast inversion.

``normalize`` follows ``relion_preprocess --norm`` (RELION's ``normalise()`` in image.cpp): the
background is every pixel with (row - box/2)² + (col - box/2)² > radius² (integer box/2, RELION's
logical origin); by default a plane a·x + b·y + c is least-squares fitted to the background pixels
and subtracted from the whole image (RELION's ramp subtraction, on unless ``--no_ramp``); then
the image is shifted and scaled so that the background has mean 0 and standard deviation 1
(population σ, as RELION computes it). The default radius is RELION's default bg_radius,
ROUND(0.375 · box) — a background circle of 75 % of the box diameter. As in RELION, an image
whose background σ is below 1e-10 is not scaled (only its background mean is removed).

``invert`` multiplies by -1 (RELION's --invert_contrast), for data recorded with dark protein.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np

from cryosift.errors import CryosiftError
from cryosift.filters.base import BatchContext, Filter, register

__all__ = ["Invert", "Normalize", "background_mask", "default_bg_radius"]


def default_bg_radius(box: int) -> float:
    """RELION's default background radius, ROUND(0.375 · box) pixels."""
    return float(math.floor(0.375 * box + 0.5))


def background_mask(box: int, radius: float) -> np.ndarray:
    """Boolean (box, box): True where (row - box//2)² + (col - box//2)² > radius²."""
    c = np.arange(box) - box // 2
    return (c[:, None] ** 2 + c[None, :] ** 2) > radius * radius


@lru_cache(maxsize=16)
def _plan(box: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(background pixel indices, design [x, y, 1] at them, its Gram matrix, pixel coordinates).

    x = column - box//2, y = row - box//2 (RELION's logical coordinates).
    """
    idx = np.flatnonzero(background_mask(box, radius).reshape(-1))
    c = np.arange(box, dtype=np.float64) - box // 2
    rows, cols = np.divmod(idx, box)
    design = np.stack([c[cols], c[rows], np.ones(idx.size)], axis=1)
    return idx, design, design.T @ design, c


@register
class Normalize(Filter):
    """Background mean 0 and σ 1 outside a circle of ``radius_px`` (RELION's normalise)."""

    name = "normalize"

    def __init__(
        self, radius_px: float | None = None, invert: bool = False, ramp: bool = True
    ) -> None:
        if radius_px is not None:
            try:
                r = float(radius_px)
            except (TypeError, ValueError):
                r = math.nan
            if not (math.isfinite(r) and r >= 0):
                raise CryosiftError(
                    f"normalize background radius must be a number >= 0 px, got {radius_px!r}"
                )
            radius_px = r
        self.radius_px = radius_px
        self.invert = bool(invert)
        self.ramp = bool(ramp)

    def params(self) -> dict[str, Any]:
        return {
            "radius_px": self.radius_px if self.radius_px is not None else "ROUND(0.375 * box)",
            "invert": self.invert,
            "ramp": self.ramp,
        }

    def radius_for(self, box: int) -> float:
        """The background radius used for ``box``-px images."""
        return default_bg_radius(box) if self.radius_px is None else self.radius_px

    def check(self, pixel_size: float | None, box: int) -> None:
        super().check(pixel_size, box)
        r = self.radius_for(box)
        if 2 * r > box:
            raise CryosiftError(
                f"normalize background radius {r:g} px is larger than half the {box}-px box "
                "(RELION refuses 2*bg_radius > box)"
            )
        if not background_mask(box, r).sum() >= 3:
            raise CryosiftError(f"normalize background radius {r:g} px leaves no background")

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        n_img, box = images.shape[0], images.shape[-1]
        idx, design, gram, coord = _plan(box, self.radius_for(box))
        n_bg = idx.size
        # background moments in float64: Σ v·[x, y, 1] and Σ v²
        bg = images.reshape(n_img, -1)[:, idx].astype(np.float64)
        moments = bg @ design
        sumsq = np.einsum("ij,ij->i", bg, bg)
        if self.ramp:
            # least-squares plane v ≈ a·x + b·y + c over the background (normal equations)
            coef = np.linalg.solve(gram, moments.T).T
            resid_sum = moments[:, 2] - coef @ gram[:, 2]  # 0 up to rounding
            resid_sumsq = sumsq - np.einsum("ij,ij->i", coef, moments)
        else:
            coef = np.zeros((n_img, 3))
            coef[:, 2] = moments[:, 2] / n_bg
            resid_sum = np.zeros(n_img)
            resid_sumsq = sumsq - n_bg * coef[:, 2] ** 2
        mean = resid_sum / n_bg
        std = np.sqrt(np.maximum(resid_sumsq / n_bg - mean**2, 0.0))
        scale = 1.0 / np.where(std < 1e-10, 1.0, std)  # RELION: a flat background is not scaled
        if self.invert:
            scale = -scale
        # (v - a·x - b·y - c - mean) · scale, in float32 with broadcast row and column terms
        row_term = coef[:, 1:2] * coord[None, :] + (coef[:, 2] + mean)[:, None]  # (B, rows)
        col_term = coef[:, 0:1] * coord[None, :]  # (B, cols)
        out = images - row_term.astype(np.float32)[:, :, None]
        out -= col_term.astype(np.float32)[:, None, :]
        out *= scale.astype(np.float32)[:, None, None]
        return out


@register
class Invert(Filter):
    """Contrast inversion, x -> -x."""

    name = "invert"

    def __init__(self) -> None:
        pass

    def params(self) -> dict[str, Any]:
        return {}

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        return np.negative(images)
