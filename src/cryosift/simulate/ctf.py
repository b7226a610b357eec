"""Contrast transfer function with RELION 3.1's formula and sign.

CTF(k) = -sin(chi(k)) * exp(-B |k|^2 / 4) * scale, with
chi = pi*lambda*df(theta)*|k|^2 + pi/2*Cs*lambda^3*|k|^4 - phase_shift - atan(Q0/sqrt(1-Q0^2)),
df(theta) = -(dU+dV)/2 - (dU-dV)/2 * cos(2*(theta - angle)) (RELION stores underfocus as positive
defocus, and its internal deltaf is negative), so that the CTF is +Q0 at k = 0 and a positive
density gives an image that correlates positively with `relion_project --ctf`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å (RELION's constants)."""
    v = voltage_kv * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + v * 0.978466e-6))


@dataclass(frozen=True)
class Optics:
    """Microscope constants shared by a whole optics group."""

    voltage: float = 300.0  # kV
    cs: float = 2.7  # mm
    amplitude_contrast: float = 0.1


def ctf_2d(
    kx: torch.Tensor,
    ky: torch.Tensor,
    defocus_u: torch.Tensor,
    defocus_v: torch.Tensor,
    defocus_angle: torch.Tensor,
    optics: Optics,
    bfactor: torch.Tensor | float = 0.0,
    phase_shift: torch.Tensor | float = 0.0,
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Evaluate RELION's CTF for a batch of images.

    kx, ky: spatial frequencies in 1/Å on any grid shape G (x = column, y = row).
    defocus_u/v (Å), defocus_angle (degrees), bfactor (Å^2), phase_shift (degrees), scale: (B,)
    tensors or scalars. Returns (B, *G) float32.
    """
    lam = electron_wavelength(optics.voltage)
    q0 = optics.amplitude_contrast
    k1 = np.pi * lam
    k2 = np.pi / 2.0 * optics.cs * 1e7 * lam**3
    k3 = float(np.arctan(q0 / np.sqrt(1.0 - q0 * q0)))

    # Work in the precision of the frequency grid (float32 is ample for simulation: chi stays
    # below ~1e3 rad, so its rounding error is < 1e-4 rad; pass float64 grids for reference use).
    dtype = torch.promote_types(kx.dtype, torch.float32)

    def per_image(x: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=dtype, device=kx.device)
        return t.reshape(-1, *([1] * kx.ndim))

    kxd, kyd = kx.to(dtype)[None], ky.to(dtype)[None]
    u2 = kxd**2 + kyd**2
    theta = torch.atan2(kyd, kxd)
    du, dv = per_image(defocus_u), per_image(defocus_v)
    ang = torch.deg2rad(per_image(defocus_angle))
    deltaf = -(du + dv) / 2.0 - (du - dv) / 2.0 * torch.cos(2.0 * (theta - ang))
    chi = k1 * deltaf * u2 + k2 * u2 * u2 - torch.deg2rad(per_image(phase_shift)) - k3
    out = -torch.sin(chi) * torch.exp(-per_image(bfactor) / 4.0 * u2) * per_image(scale)
    return out if dtype == torch.float64 else out.float()


def ctf_zero_radii(defocus: float, optics: Optics, n: int) -> np.ndarray:
    """First n zeros (|k|, 1/Å) of an isotropic CTF with Cs = 0, Q0 = 0: pi*lam*df*k^2 = m*pi."""
    lam = electron_wavelength(optics.voltage)
    m = np.arange(1, n + 1)
    return np.sqrt(m / (lam * defocus))
