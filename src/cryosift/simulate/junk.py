"""Non-particle images of the kinds that reach a particle stack in practice.

Every generator returns noise-free object spectra on the rfft2 grid of an n x n field (the same
convention as FourierProjector.slices), so that junk passes through the same CTF, crop and noise
as particles. Kinds: pure noise (empty spectrum), ice (thickness gradient, smooth thickness
variation, sometimes a crystalline-ice contaminant), carbon (film edge with amorphous texture),
aggregate (several copies of the structure clumped together), fragment (a piece of a structure:
the part of its projection inside a random soft-edged region, i.e. the atoms of a prism along the
beam, shifted off-centre).
"""

from __future__ import annotations

import numpy as np
import torch

from cryosift.simulate.orientations import euler_to_matrix, random_orientations
from cryosift.simulate.projector import (
    FourierProjector,
    images_to_slices,
    shift_phase,
    slices_to_images,
)

JUNK_TYPES = ("noise", "ice", "carbon", "aggregate", "fragment")


def _coords(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    c = torch.arange(n, dtype=torch.float32, device=device) - n // 2
    return c[None, :].expand(n, n), c[:, None].expand(n, n)  # x (column), y (row)


def _smooth_field(
    b: int, n: int, width: float, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Gaussian random fields with correlation length ~ n/width pixels, unit variance: (b, n, n)."""
    white = torch.randn(b, n, n, generator=gen).to(device)
    ky = torch.fft.fftfreq(n, device=device)[:, None]
    kx = torch.fft.rfftfreq(n, device=device)[None, :]
    filt = torch.exp(-(kx**2 + ky**2) * (n / width) ** 2 / 2.0)
    field = torch.fft.irfft2(torch.fft.rfft2(white) * filt, s=(n, n))
    return field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def _soft_disc(
    cx: torch.Tensor,
    cy: torch.Tensor,
    radius: torch.Tensor,
    n: int,
    edge: float,
    device: torch.device,
) -> torch.Tensor:
    x, y = _coords(n, device)
    d = torch.sqrt((x[None] - cx[:, None, None]) ** 2 + (y[None] - cy[:, None, None]) ** 2)
    return torch.sigmoid((radius[:, None, None] - d) / edge)


def _uniform(
    rng: np.random.Generator, lo: float, hi: float, b: int, device: torch.device
) -> torch.Tensor:
    return torch.as_tensor(rng.uniform(lo, hi, b), dtype=torch.float32, device=device)


def ice(
    b: int, n: int, rng: np.random.Generator, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Ice-thickness gradients with smooth variation, a third of them with an ice contaminant."""
    x, y = _coords(n, device)
    theta = _uniform(rng, 0, 2 * np.pi, b, device)
    ramp = (torch.cos(theta)[:, None, None] * x + torch.sin(theta)[:, None, None] * y) / n
    img = ramp * _uniform(rng, 1.0, 3.0, b, device)[:, None, None]
    img = img + 0.3 * _smooth_field(b, n, 4.0, gen, device)
    has_blob = torch.as_tensor(rng.random(b) < 1 / 3, device=device)
    blob = _soft_disc(
        _uniform(rng, -0.3 * n, 0.3 * n, b, device),
        _uniform(rng, -0.3 * n, 0.3 * n, b, device),
        _uniform(rng, 0.08 * n, 0.25 * n, b, device),
        n,
        2.0,
        device,
    )
    img = img + 2.0 * blob * has_blob[:, None, None]
    return images_to_slices(img)


def carbon(
    b: int, n: int, rng: np.random.Generator, gen: torch.Generator, device: torch.device
) -> torch.Tensor:
    """Edges of a carbon film crossing the field, the film carrying amorphous texture."""
    x, y = _coords(n, device)
    theta = _uniform(rng, 0, 2 * np.pi, b, device)
    offset = _uniform(rng, -0.25 * n, 0.25 * n, b, device)
    d = (
        torch.cos(theta)[:, None, None] * x
        + torch.sin(theta)[:, None, None] * y
        - offset[:, None, None]
    )
    film = torch.sigmoid(d / 1.5)
    texture = 1.0 + 0.4 * _smooth_field(b, n, n / 6.0, gen, device)
    return images_to_slices(film * texture)


def aggregate(
    b: int, projector: FourierProjector, radius_px: float, rng: np.random.Generator
) -> torch.Tensor:
    """Clumps of 2-5 copies of the structure at random orientations, overlapping."""
    n = projector.n
    out = torch.zeros(b, n, n // 2 + 1, dtype=torch.complex64, device=projector.device)
    counts = rng.integers(2, 6, b)
    for copy in range(int(counts.max())):
        active = torch.as_tensor(counts > copy, device=projector.device)
        rots = euler_to_matrix(*random_orientations(b, rng).T)
        r = radius_px * rng.uniform(0.4, 1.0, b) * (copy > 0)
        phi = rng.uniform(0, 2 * np.pi, b)
        shifts = torch.as_tensor(
            np.stack([r * np.cos(phi), r * np.sin(phi)], 1), device=projector.device
        )
        out += projector.slices(rots) * shift_phase(shifts, n) * active[:, None, None]
    return out


def fragment(
    b: int, projector: FourierProjector, radius_px: float, rng: np.random.Generator
) -> torch.Tensor:
    """Pieces of a structure: its projection inside a random soft disc, moved off-centre."""
    n, dev = projector.n, projector.device
    rots = euler_to_matrix(*random_orientations(b, rng).T)
    img = slices_to_images(projector.slices(rots), n)
    cx = _uniform(rng, -0.5 * radius_px, 0.5 * radius_px, b, dev)
    cy = _uniform(rng, -0.5 * radius_px, 0.5 * radius_px, b, dev)
    img = img * _soft_disc(
        cx, cy, _uniform(rng, 0.25 * radius_px, 0.55 * radius_px, b, dev), n, 2.0, dev
    )
    r = radius_px * rng.uniform(0.0, 0.4, b)
    phi = rng.uniform(0, 2 * np.pi, b)
    shifts = torch.as_tensor(
        np.stack([r * np.cos(phi) - cx.cpu().numpy(), r * np.sin(phi) - cy.cpu().numpy()], 1),
        device=dev,
    )
    return images_to_slices(img) * shift_phase(shifts, n)


def junk_spectra(
    kind: str,
    b: int,
    projector: FourierProjector,
    fragment_projector: FourierProjector,
    radius_px: float,
    rng: np.random.Generator,
    gen: torch.Generator,
) -> torch.Tensor:
    """Spectra (b, n, n//2+1) of b junk objects of one kind."""
    n, dev = projector.n, projector.device
    if kind == "noise":
        return torch.zeros(b, n, n // 2 + 1, dtype=torch.complex64, device=dev)
    if kind == "ice":
        return ice(b, n, rng, gen, dev)
    if kind == "carbon":
        return carbon(b, n, rng, gen, dev)
    if kind == "aggregate":
        return aggregate(b, projector, radius_px, rng)
    if kind == "fragment":
        return fragment(b, fragment_projector, radius_px, rng)
    raise ValueError(f"unknown junk type {kind!r} (choose from {', '.join(JUNK_TYPES)})")
