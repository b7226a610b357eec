"""CTF correction of particle images: phase flipping and Wiener filtering.

The CTF of every image is RELION's (``cryosift.simulate.ctf.ctf_2d``: sign convention, astigmatism,
amplitude contrast, phase shift, B-factor envelope and scale factor), evaluated on the image's DFT
grid (kx along columns, ky along rows, in 1/Å) from the image's STAR row: rlnDefocusU/V (Å),
rlnDefocusAngle (°), rlnVoltage (kV), rlnSphericalAberration (mm), rlnAmplitudeContrast, and when
present rlnPhaseShift (°, default 0), rlnCtfBfactor (Å², default 0), rlnCtfScalefactor (default 1).
Images are treated as periodic (as RELION's FFTs do). On the Nyquist column of an even box the
multipliers of the two aliases of one frequency are averaged (see :func:`hermitian_nyquist`), so
each filter is an exact real linear filter with a known transfer function.

* ``phaseflip``: F'(k) = sign(CTF(k)) · F(k) — undoes the contrast reversals, keeps amplitudes;
  applied twice it is the identity wherever the sign is defined (CTF(k) != 0, and on the Nyquist
  column wherever the two aliases agree in sign).
* ``wiener``:    F'(k) = CTF(k) / (CTF(k)² + 1/snr) · F(k) — a Wiener filter with a constant
  ("Wiener constant") spectral SNR: 1/snr is the assumed noise-to-signal power ratio at every
  frequency. Large snr approaches CTF division (1/CTF, unstable near the zeros); small snr
  approaches snr · CTF (a matched filter: phase flip weighted by |CTF|).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch

from cryosift.errors import CryosiftError
from cryosift.filters.base import BatchContext, Filter, positive, register
from cryosift.simulate.ctf import Optics, ctf_2d

__all__ = ["PhaseFlip", "Wiener", "batch_ctf", "hermitian_nyquist"]

_OPTIONAL = {"rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0}


@lru_cache(maxsize=16)
def _grid(box: int, pixel_size: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) in 1/Å on the rfft2 grid (box, box//2+1): x = column, y = row."""
    kx = torch.fft.rfftfreq(box, d=pixel_size)[None, :].expand(box, -1)
    ky = torch.fft.fftfreq(box, d=pixel_size)[:, None].expand(-1, box // 2 + 1)
    return kx.float(), ky.float()


def _column(meta: pd.DataFrame, name: str) -> np.ndarray:
    """A numeric CTF column as float64, refusing non-numbers (CryosiftError naming the row)."""
    if name not in meta.columns:
        return np.full(len(meta), _OPTIONAL[name])
    values = pd.to_numeric(meta[name], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        label = meta.index[row]
        number = int(label) + 1 if pd.api.types.is_integer(label) else row + 1
        raise CryosiftError(
            f"CTF column {name} holds {meta[name].iloc[row]!r} (not a finite number) in "
            f"particle row {number}"
        )
    return values


def batch_ctf(metadata: pd.DataFrame, box: int, pixel_size: float) -> torch.Tensor:
    """RELION CTF of every row of ``metadata`` on the rfft2 grid: (B, box, box//2+1) float32."""
    kx, ky = _grid(int(box), float(pixel_size))
    cols = {
        c: _column(metadata, c)
        for c in (
            "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
            "rlnSphericalAberration", "rlnAmplitudeContrast", *_OPTIONAL,
        )
    }
    q0 = cols["rlnAmplitudeContrast"]
    if ((q0 < 0) | (q0 >= 1)).any():
        raise CryosiftError("rlnAmplitudeContrast must lie in [0, 1)")
    if (cols["rlnVoltage"] <= 0).any():
        raise CryosiftError("rlnVoltage must be positive (kV)")
    out = torch.empty((len(metadata), box, box // 2 + 1), dtype=torch.float32)
    optics = np.stack([cols["rlnVoltage"], cols["rlnSphericalAberration"], q0], axis=1)
    groups, inverse = np.unique(optics, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    for g, (voltage, cs, amp) in enumerate(groups):
        rows = np.flatnonzero(inverse == g)

        def take(name: str, rows: np.ndarray = rows) -> torch.Tensor:
            return torch.from_numpy(cols[name][rows])

        out[torch.from_numpy(rows)] = ctf_2d(
            kx, ky, take("rlnDefocusU"), take("rlnDefocusV"), take("rlnDefocusAngle"),
            Optics(float(voltage), float(cs), float(amp)),
            bfactor=take("rlnCtfBfactor"), phase_shift=take("rlnPhaseShift"),
            scale=take("rlnCtfScalefactor"),
        ).float()
    return out


def hermitian_nyquist(h: torch.Tensor) -> torch.Tensor:
    """Make a multiplier on the rfft2 grid of an even box consistent on the Nyquist column.

    The column kx = N/2 stores frequencies (N/2, ky) and (N/2, -ky), which are the same
    frequency up to aliasing ((N/2, ky) = -(N/2, -ky) mod N): a real filter must multiply both by
    the same value. An astigmatic CTF differs there, so the two are averaged — exactly what the
    inverse real FFT would do implicitly. Other columns are untouched. Returns ``h`` (in place).
    """
    n = h.shape[-2]
    if n % 2 == 0 and h.shape[-1] == n // 2 + 1:
        partner = (-torch.arange(n)) % n
        col = h[..., :, -1]
        h[..., :, -1] = 0.5 * (col + col[..., partner])
    return h


class _CtfFilter(Filter):
    needs_ctf = True
    needs_pixel_size = True

    def _transfer(self, ctf: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def transfer(self, metadata: pd.DataFrame, box: int, pixel_size: float) -> torch.Tensor:
        """The multiplier applied to each image's rfft2: (B, box, box//2+1) float32."""
        return hermitian_nyquist(self._transfer(batch_ctf(metadata, box, pixel_size)))

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        assert ctx.metadata is not None and ctx.pixel_size is not None
        n = images.shape[-1]
        f = torch.fft.rfft2(torch.from_numpy(images))
        f.mul_(self.transfer(ctx.metadata, n, ctx.pixel_size))
        return torch.fft.irfft2(f, s=(n, n)).numpy()


@register
class PhaseFlip(_CtfFilter):
    """Multiply each image's Fourier transform by the sign of its CTF."""

    name = "phaseflip"

    def __init__(self) -> None:
        pass

    def params(self) -> dict[str, Any]:
        return {"definition": "F' = sign(CTF) F (RELION CTF from the STAR rows)"}

    def _transfer(self, ctf: torch.Tensor) -> torch.Tensor:
        return torch.sign(ctf)


@register
class Wiener(_CtfFilter):
    """Wiener CTF correction with a constant spectral SNR ``snr`` (the Wiener constant 1/snr)."""

    name = "wiener"

    def __init__(self, snr: float = 0.1) -> None:
        self.snr = positive(snr, "wiener snr")

    def params(self) -> dict[str, Any]:
        return {"snr": self.snr, "definition": "F' = CTF / (CTF^2 + 1/snr) F"}

    def _transfer(self, ctf: torch.Tensor) -> torch.Tensor:
        return ctf / (ctf * ctf + 1.0 / self.snr)
