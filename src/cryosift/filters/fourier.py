"""Fourier-space low-pass and high-pass filters (Gaussian, Butterworth, hard disk).

Every filter here multiplies the image's discrete Fourier transform by a real, radially
symmetric transfer function H(k) and transforms back (batched float32 torch FFTs; the image is
treated as periodic, as RELION does). k is the spatial frequency in 1/Å, |k| = sqrt(kx² + ky²)
on the image's DFT grid; the Nyquist frequency is 1/(2·pixel size). The cutoff kc is given either
as a resolution in Å (kc = 1/cutoff_A, needs the pixel size) or as a fraction of Nyquist
(kc = cutoff_frac · Nyquist, needs nothing).

Low-pass transfer functions:

* ``gaussian``:    H(k) = exp(-k² / (2 s²)) with s = kc / sqrt(2 ln 2), so that H(kc) = 1/2
  (the cutoff is the half-amplitude point);
* ``butterworth``: H(k) = 1 / sqrt(1 + (k/kc)^(2·order)), so that H(kc) = 1/√2 (half power);
* ``hard``:        H(k) = 1 for k <= kc, 0 beyond (a disk; rings next to edges).

High-pass filters use the complement: 1 - H_lowpass for ``gaussian`` and ``hard`` (H(kc) = 1/2
and a disk removed), and H(k) = 1 / sqrt(1 + (kc/k)^(2·order)) for ``butterworth`` (H(kc) = 1/√2,
H(0) = 0). A high-pass removes each image's mean (k = 0), which makes it useful against slowly
varying ice gradients.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from cryosift.errors import CryosiftError
from cryosift.filters.base import BatchContext, Filter, int_at_least, positive, register

__all__ = ["HighPass", "LowPass", "fourier_multiply", "frequency_radius", "transfer_function"]

KINDS = ("gaussian", "butterworth", "hard")


@lru_cache(maxsize=32)
def _radius_cached(box: int) -> torch.Tensor:
    ky = torch.fft.fftfreq(box, dtype=torch.float64)[:, None]
    kx = torch.fft.rfftfreq(box, dtype=torch.float64)[None, :]
    return torch.sqrt(kx**2 + ky**2)


def frequency_radius(box: int) -> torch.Tensor:
    """|k| in cycles per pixel (0 .. ~0.707; Nyquist = 0.5) on the rfft2 grid of a box, float64."""
    return _radius_cached(int(box))


def transfer_function(
    box: int, kc_frac: float, kind: str, order: int = 8, highpass: bool = False
) -> torch.Tensor:
    """H on the rfft2 grid (box, box//2+1), float32; ``kc_frac``: the cutoff as a fraction of
    Nyquist (k in the formulas above is measured in the same unit, so pixel size drops out)."""
    k = frequency_radius(box) / 0.5  # fraction of Nyquist
    kc = float(kc_frac)
    if kind == "gaussian":
        s2 = kc * kc / (2.0 * math.log(2.0))
        h = torch.exp(-(k * k) / (2.0 * s2))
        if highpass:
            h = 1.0 - h
    elif kind == "butterworth":
        ratio = k / kc if not highpass else kc / k  # k = 0 gives inf -> H(0) = 0 for high-pass
        h = 1.0 / torch.sqrt(1.0 + ratio ** (2 * order))
    elif kind == "hard":
        h = (k <= kc).double()
        if highpass:
            h = 1.0 - h
    else:  # pragma: no cover - refused by the constructors
        raise ValueError(kind)
    return h.float()


def fourier_multiply(images: np.ndarray, h: torch.Tensor) -> np.ndarray:
    """irfft2(rfft2(images) · h) for a batch (B, N, N); ``h`` (N, N//2+1) or (B, N, N//2+1)."""
    x = torch.from_numpy(images)
    n = images.shape[-1]
    f = torch.fft.rfft2(x)
    f.mul_(h)
    return torch.fft.irfft2(f, s=(n, n)).numpy()


class _FourierPass(Filter):
    """Shared parameter handling of :class:`LowPass` and :class:`HighPass`."""

    highpass = False

    def __init__(
        self,
        cutoff_A: float | None = None,  # noqa: N803 - Å is the unit users know
        cutoff_frac: float | None = None,
        kind: str = "gaussian",
        order: int = 8,
    ) -> None:
        if (cutoff_A is None) == (cutoff_frac is None):
            raise CryosiftError(
                f"{self.name}: give exactly one of cutoff_A (Å) and cutoff_frac (fraction of "
                "Nyquist)"
            )
        self.cutoff_A = None if cutoff_A is None else positive(cutoff_A, f"{self.name} cutoff (Å)")
        self.cutoff_frac = (
            None if cutoff_frac is None else positive(cutoff_frac, f"{self.name} cutoff_frac")
        )
        if self.cutoff_frac is not None and self.cutoff_frac > 1.0:
            raise CryosiftError(
                f"{self.name} cutoff_frac {self.cutoff_frac:g} is beyond Nyquist (must be <= 1)"
            )
        kind = str(kind).strip().lower()
        if kind not in KINDS:
            raise CryosiftError(
                f"{self.name} kind {kind!r} unknown (choose from {', '.join(KINDS)})"
            )
        self.kind = kind
        self.order = int_at_least(order, 1, f"{self.name} Butterworth order")
        self.needs_pixel_size = self.cutoff_A is not None

    def params(self) -> dict[str, Any]:
        return {
            "cutoff_A": self.cutoff_A,
            "cutoff_frac": self.cutoff_frac,
            "kind": self.kind,
            "order": self.order,
            "definition": _DEFINITIONS[(self.kind, self.highpass)],
        }

    def check(self, pixel_size: float | None, box: int) -> None:
        super().check(pixel_size, box)
        if self.cutoff_A is not None and pixel_size is not None and self.cutoff_A < 2 * pixel_size:
            raise CryosiftError(
                f"{self.name} cutoff {self.cutoff_A:g} Å is beyond Nyquist: at {pixel_size:g} Å/px "
                f"the finest resolution is {2 * pixel_size:g} Å"
            )

    def cutoff_fraction(self, pixel_size: float | None) -> float:
        """The cutoff as a fraction of Nyquist (needs the pixel size for a cutoff in Å)."""
        if self.cutoff_frac is not None:
            return self.cutoff_frac
        assert self.cutoff_A is not None and pixel_size is not None
        return 2.0 * pixel_size / self.cutoff_A

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        h = _cached_transfer(
            images.shape[-1], self.cutoff_fraction(ctx.pixel_size), self.kind, self.order,
            self.highpass,
        )
        return fourier_multiply(images, h)


@lru_cache(maxsize=64)
def _cached_transfer(box: int, frac: float, kind: str, order: int, highpass: bool) -> torch.Tensor:
    return transfer_function(box, frac, kind, order, highpass)


_DEFINITIONS = {
    ("gaussian", False): "H = exp(-k^2/(2 s^2)), s = kc/sqrt(2 ln 2): H(kc) = 0.5",
    ("butterworth", False): "H = 1/sqrt(1 + (k/kc)^(2 order)): H(kc) = 1/sqrt(2)",
    ("hard", False): "H = 1 for k <= kc, else 0",
    ("gaussian", True): "H = 1 - exp(-k^2/(2 s^2)), s = kc/sqrt(2 ln 2): H(kc) = 0.5",
    ("butterworth", True): "H = 1/sqrt(1 + (kc/k)^(2 order)): H(kc) = 1/sqrt(2)",
    ("hard", True): "H = 0 for k <= kc, else 1",
}


@register
class LowPass(_FourierPass):
    """Keep spatial frequencies below the cutoff (resolution in Å or fraction of Nyquist)."""

    name = "lowpass"
    highpass = False


@register
class HighPass(_FourierPass):
    """Remove spatial frequencies below the cutoff (e.g. ice gradients); removes the mean."""

    name = "highpass"
    highpass = True
