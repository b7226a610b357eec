"""Bilateral filter (Tomasi & Manduchi 1998), batched in torch: the seed-000 preprocessing step.

out(p) = Σ_q w(p, q) I(q) / Σ_q w(p, q) over a square window around p, with
w(p, q) = exp(-|p - q|² / (2 σ_s²)) · exp(-(I(p) - I(q))² / (2 σ_r²)).

``sigma_range`` is relative to each image's own noise level: σ_r = sigma_range · σ̂_noise, where
σ̂_noise is Immerkær's robust estimate (J. Immerkær, "Fast noise variance estimation", CVIU 1996):
the image is convolved with M = [[1,-2,1],[-2,4,-2],[1,-2,1]] (which cancels constant, linear and
most smooth signal; Σ M² = 36), and σ̂ = 1.4826 · median|M * I| / 6. For white Gaussian noise this
is the noise σ; at cryo-EM SNRs the particle adds little to it. The default, sigma_range = 1, makes
σ_r about the image standard deviation at low SNR — skimage's own default for sigma_color.

The seed (000) states no parameter values for its bilateral filter; the defaults here are
σ_s = 2 px, σ_r = 1 × noise σ, and a window of max(5, 2·ceil(3 σ_s) + 1) px (skimage's default),
with the image mirrored at its edges (numpy/skimage ``mode='reflect'``: c b | a b c).

Implementation: no unfold and no per-pixel loop. For each window offset o the range weights of
the whole sub-batch are one vectorised expression; since w(p, p+o) = w(p+o, p) the weights of
offset o, computed once on a slightly larger area, also serve offset -o, so only half of the
(2r+1)² offsets are evaluated. Sub-batches of <= 8 images keep the working set in cache; they are
spread over threads with single-threaded torch (cryosift.filters.parallel explains why).

Checked against ``skimage.restoration.denoise_bilateral`` in the tests. Note: scikit-image 0.26's
``denoise_bilateral`` builds its spatial lookup table on a (win_size+1)² grid
(``np.arange(-win_size // 2, win_size // 2 + 1)``) but reads it with a row stride of win_size, so
its spatial weights are shuffled; its range weights and boundary handling are right. The tests
therefore compare with skimage where the spatial kernel is flat (σ_s → ∞) and with a direct
implementation of the definition otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - torch convention

from cryosift.errors import CryosiftError
from cryosift.filters.base import BatchContext, Filter, int_at_least, positive, register
from cryosift.filters.parallel import map_slices

__all__ = ["Bilateral", "bilateral_filter", "estimate_noise_sigma", "reflect_index"]

_IMMERKAER = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_SUB_BATCH_PIXELS = 1 << 18  # pixels per sub-batch: the working set stays in cache
_SUB_BATCH_IMAGES = 8


def estimate_noise_sigma(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Immerkær's robust noise σ of every image (B,), float32 (see the module docstring)."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.shape[-1] < 3 or x.shape[-2] < 3:
        return x.flatten(1).std(dim=1)
    r = F.conv2d(x[:, None], _IMMERKAER.to(x.dtype)[None, None]).flatten(1).abs_()
    return r.median(dim=1).values * (1.4826 / 6.0)


def reflect_index(n: int, pad: int) -> torch.Tensor:
    """Indices padding a length-n axis by ``pad`` on each side, numpy 'reflect' (c b | a b c)."""
    i = np.arange(-pad, n + pad)
    if n == 1:
        return torch.zeros(i.size, dtype=torch.int64)
    i = np.abs(i) % (2 * n - 2)
    i = np.where(i >= n, 2 * n - 2 - i, i)
    return torch.from_numpy(i.astype(np.int64))


def _bilateral_block(
    x: torch.Tensor, neg_a: torch.Tensor, log_g: dict[tuple[int, int], float], r: int
) -> torch.Tensor:
    """Bilateral filter of a small batch (fits in cache); see :func:`bilateral_filter`."""
    b, n_rows, n_cols = x.shape
    p = x.index_select(1, reflect_index(n_rows, r)).index_select(2, reflect_index(n_cols, r))
    a = neg_a.view(b, 1, 1)
    num = x.clone()
    den = torch.ones_like(x)
    for (dy, dx), lg in log_g.items():
        # E(q) = weight between q and q + o, for every q the outputs need (as p and as p - o)
        r0, c0 = r - dy, r - max(dx, 0)
        h, w = n_rows + dy, n_cols + abs(dx)
        e = p[:, r0 + dy : r0 + dy + h, c0 + dx : c0 + dx + w] - p[:, r0 : r0 + h, c0 : c0 + w]
        e.square_().mul_(a).add_(lg).exp_()
        pc = r - c0
        e_fwd = e[:, dy : dy + n_rows, pc : pc + n_cols]  # w(p, p + o)
        e_bwd = e[:, 0:n_rows, pc - dx : pc - dx + n_cols]  # w(p, p - o) = E(p - o)
        num.addcmul_(e_fwd, p[:, r + dy : r + dy + n_rows, r + dx : r + dx + n_cols])
        num.addcmul_(e_bwd, p[:, r - dy : r - dy + n_rows, r - dx : r - dx + n_cols])
        den.add_(e_fwd).add_(e_bwd)
    return num.div_(den)


def bilateral_filter(
    images: np.ndarray | torch.Tensor,
    sigma_spatial: float,
    sigma_range: np.ndarray | torch.Tensor | float,
    radius: int,
    workers: int | None = None,
) -> torch.Tensor:
    """Bilateral filter of a batch (B, H, W) with per-image range σ (absolute grey values).

    ``radius``: half the window (window = 2 radius + 1). A σ_r of 0 (constant image) leaves the
    image as it is. Returns a new float32 tensor. Runs on ``workers`` threads with single-threaded
    torch (see cryosift.filters.parallel: hundreds of small operations per sub-batch would
    otherwise each end in an OpenMP barrier).
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    n_img, n_rows, n_cols = x.shape
    r = int(radius)
    sr = torch.as_tensor(sigma_range, dtype=torch.float32).reshape(-1)
    sr = sr.expand(n_img) if sr.numel() == 1 else sr
    # exponent factor -1/(2 σ_r²); σ_r = 0 (flat image) -> 0, i.e. plain Gaussian of a constant
    neg_a = torch.where(sr > 0, -0.5 / sr.clamp_min(1e-30) ** 2, torch.zeros_like(sr))
    log_g = {
        (dy, dx): -(dy * dy + dx * dx) / (2.0 * sigma_spatial**2)
        for dy in range(r + 1)
        for dx in range(-r, r + 1)
        if dy > 0 or dx > 0
    }
    sub = max(1, min(_SUB_BATCH_IMAGES, _SUB_BATCH_PIXELS // ((n_rows + 2 * r) * (n_cols + 2 * r))))

    def run(start: int, stop: int) -> np.ndarray:
        res = torch.empty((stop - start, n_rows, n_cols), dtype=torch.float32)
        for s in range(start, stop, sub):
            e = min(s + sub, stop)
            res[s - start : e - start] = _bilateral_block(x[s:e], neg_a[s:e], log_g, r)
        return res.numpy()

    out = np.empty((n_img, n_rows, n_cols), dtype=np.float32)
    map_slices(run, n_img, out, workers=workers, min_per_worker=1)
    return torch.from_numpy(out)


@register
class Bilateral(Filter):
    """Edge-preserving smoothing; range σ relative to each image's noise σ (module docstring)."""

    name = "bilateral"

    def __init__(
        self,
        sigma_spatial_px: float = 2.0,
        sigma_range: float = 1.0,
        window_px: int | None = None,
    ) -> None:
        self.sigma_spatial_px = positive(sigma_spatial_px, "bilateral sigma_spatial_px")
        self.sigma_range = positive(sigma_range, "bilateral sigma_range")
        if window_px is None:
            window_px = max(5, 2 * math.ceil(3 * self.sigma_spatial_px) + 1)
        win = int_at_least(window_px, 3, "bilateral window_px")
        if win % 2 == 0:
            raise CryosiftError(f"bilateral window_px must be odd, got {win}")
        self.window_px = win

    def params(self) -> dict[str, Any]:
        return {
            "sigma_spatial_px": self.sigma_spatial_px,
            "sigma_range": self.sigma_range,
            "sigma_range_unit": "noise sigma (Immerkaer 1996 robust estimate, per image)",
            "window_px": self.window_px,
            "mode": "reflect",
        }

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        x = torch.from_numpy(images)
        sigma_r = self.sigma_range * estimate_noise_sigma(x)
        return bilateral_filter(x, self.sigma_spatial_px, sigma_r, self.window_px // 2).numpy()
