"""Image preparation shared by every screener: resample, the seed-000 chain, standardise.

1. **Resample** to a working box (Fourier cropping, i.e. an ideal low-pass then decimation) when
   the images are larger than ``work_box``: screening decides "is there a particle here", which
   lives at low resolution: with the chain the working box is 32 px (the chain costs ~16x less
   than at 128 px), without it 64 px.
   Images at or below ``work_box`` are left as they are, so the seed's ablation is not blurred.
2. **The chain of `000_*`** (switchable): bilateral filter (edge-preserving smoothing; the seed
   gives no parameters, ours are σ_s = 2 px at a 64 px working box — scaled with the box, so
   1 px at 32 px — σ_r = 1 x each image's robust noise σ) followed by global histogram
   equalisation. Both are the tested filters of :mod:`cryosift.filters`.
3. **Standardise** each image to zero mean and unit variance, so that the screeners see pixels on
   one scale whatever the detector gain or the histeq range (the RBM's Gaussian visible units
   assume unit variance).

The configuration is stored with every trained model and re-applied exactly at scoring time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from cryosift.errors import CryosiftError
from cryosift.filters import FilterChain, make_filter
from cryosift.filters.base import BatchContext

__all__ = [
    "CHAIN_WORK_BOX",
    "PLAIN_WORK_BOX",
    "PreprocessConfig",
    "fourier_crop_images",
    "preprocess",
    "standardise",
]


#: working box when ``work_box`` is left to the default: with the chain, and without it.
#: A 32 px box with the chain scores 128 px stacks ~4x faster than 64 px (2,094 vs 473 images/s
#: on one core) and the RBM scored as well on B3 quick: 0.997 vs 0.998 at SNR 0.0156, 0.986 vs
#: 0.977 at 0.0078 (benchmarks/results/screen_speed.md, screen_B3_quick_workbox/).
CHAIN_WORK_BOX = 32
PLAIN_WORK_BOX = 64
#: the bilateral's σ_s at a 64 px working box; scaled with the box (1 px at 32 px)
SIGMA_SPATIAL_AT_64 = 2.0
#: what a saved configuration that lacks a field meant (the defaults before they were resolved)
_LEGACY = {"work_box": 64, "bilateral_sigma_spatial_px": 2.0}


@dataclass(frozen=True)
class PreprocessConfig:
    """How images are prepared before a screener sees them (saved with the model).

    ``work_box`` None: CHAIN_WORK_BOX (32 px) with the chain, PLAIN_WORK_BOX (64 px) without.
    ``bilateral_sigma_spatial_px`` None: 2 px x work_box / 64, the same physical smoothing at
    every working box (1 px at 32 px, window 7 px). Both are resolved on construction, so a
    saved model records numbers; a model saved before they existed lacks no field (all four
    were always written), and :meth:`from_dict` reads a missing one as its old default.
    """

    chain: bool = True  # bilateral + histogram equalisation (seed 000)
    work_box: int | None = None  # images larger than this are Fourier-cropped to it
    bilateral_sigma_spatial_px: float | None = None
    bilateral_sigma_range: float = 1.0

    def __post_init__(self) -> None:
        box = self.work_box
        if box is None:
            box = CHAIN_WORK_BOX if self.chain else PLAIN_WORK_BOX
            object.__setattr__(self, "work_box", box)
        if self.bilateral_sigma_spatial_px is None:
            sigma = SIGMA_SPATIAL_AT_64 * int(box) / 64.0
            object.__setattr__(self, "bilateral_sigma_spatial_px", sigma)

    def validate(self) -> None:
        if int(self.work_box) < 8:
            raise CryosiftError(f"working box must be at least 8 px, got {self.work_box}")

    def out_box(self, box: int) -> int:
        """Box of the prepared images for input images of ``box`` px."""
        return min(int(box), int(self.work_box))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """The configuration a model was saved with; a missing field takes its old default."""
        known = {k: d.get(k, _LEGACY.get(k)) for k in cls.__dataclass_fields__
                 if k in d or k in _LEGACY}
        return cls(**known)


def fourier_crop_images(images: np.ndarray, size: int) -> np.ndarray:
    """(N, n, n) -> (N, size, size) by keeping the lowest spatial frequencies (mean preserved)."""
    n = images.shape[-1]
    if size >= n:
        return np.asarray(images, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    f = torch.fft.rfft2(x)
    h = size // 2
    rows = torch.cat([torch.arange(0, size - h), torch.arange(n - h, n)])
    g = f[:, rows, : h + 1]
    out = torch.fft.irfft2(g, s=(size, size)) * (size * size) / (n * n)
    return out.numpy().astype(np.float32, copy=False)


def standardise(images: np.ndarray) -> np.ndarray:
    """Each image to zero mean, unit variance (constant images become zeros), float32."""
    x = np.asarray(images, dtype=np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = x.std(axis=(1, 2), keepdims=True)
    return ((x - mean) / np.where(std > 0, std, 1.0)).astype(np.float32, copy=False)


def _chain(cfg: PreprocessConfig) -> FilterChain:
    return FilterChain(
        [
            make_filter(
                "bilateral",
                sigma_spatial_px=cfg.bilateral_sigma_spatial_px,
                sigma_range=cfg.bilateral_sigma_range,
            ),
            make_filter("histeq"),
        ]
    )


def preprocess(images: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Prepared images (N, out_box, out_box) float32 for a screener (module docstring)."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 3 or x.shape[1] != x.shape[2]:
        raise CryosiftError(f"expected a stack of square images, got shape {x.shape}")
    if len(x) == 0:
        b = cfg.out_box(x.shape[-1])
        return np.zeros((0, b, b), dtype=np.float32)
    x = fourier_crop_images(x, cfg.out_box(x.shape[-1]))
    if cfg.chain:
        x = _chain(cfg)(x, BatchContext(pixel_size=None))
    return standardise(x)
