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
def _plan(box: int, radius: float, ramp: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(background pixel indices, plane projector (3, n_bg) or None, design (box², 3))."""
    mask = background_mask(box, radius).reshape(-1)
    idx = np.flatnonzero(mask)
    c = np.arange(box, dtype=np.float64) - box // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    design = np.stack([xx.reshape(-1), yy.reshape(-1), np.ones(box * box)], axis=1)
    proj = np.linalg.pinv(design[idx]) if ramp else None
    return idx, proj, design


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
        idx, proj, design = _plan(box, self.radius_for(box), self.ramp)
        flat = images.reshape(n_img, -1)
        bg = flat[:, idx].astype(np.float64)  # statistics in float64
        coef = None
        if proj is not None:
            coef = bg @ proj.T  # (B, 3): a, b, c of each image's background plane
            bg -= coef @ design[idx].T
        mean = bg.mean(axis=1, keepdims=True)
        bg -= mean
        std = np.sqrt(np.einsum("ij,ij->i", bg, bg) / bg.shape[1])[:, None]
        scale = 1.0 / np.where(std < 1e-10, 1.0, std)  # RELION: a flat background is not scaled
        if self.invert:
            scale = -scale
        # (x - plane - mean) * scale over the whole image; the bulk arithmetic in float32 (the
        # subtraction is of nearly equal numbers, so it adds no error beyond the input's own)
        shift = mean if coef is None else coef @ design.T + mean
        out = flat - shift.astype(np.float32)
        out *= scale.astype(np.float32)
        return out.reshape(images.shape)


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
