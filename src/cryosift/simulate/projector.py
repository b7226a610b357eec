"""Projection by the Fourier-slice theorem, batched in torch.

The volume is zero-padded `pad` times, Fourier transformed once, and every projection's 2D Fourier
transform is a central slice through it, read by trilinear interpolation (`grid_sample`) at
A^T (kx, ky, 0). With A = RELION's Euler matrix, the image is the projection of the volume rotated
by A along z. Slices are returned on the rfft grid of an n x n image (n = volume size) and are
band-limited to a disk at Nyquist, so projections of a rotated model and rotated projections agree.
"""

from __future__ import annotations

import numpy as np
import torch


def rfft_frequencies(
    n: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kx, ky) in Fourier-pixel units on the rfft2 grid of an n x n image: shapes (n, n//2+1)."""
    ky = torch.fft.fftfreq(n, d=1.0 / n, device=device)
    kx = torch.fft.rfftfreq(n, d=1.0 / n, device=device)
    return kx[None, :].expand(n, -1), ky[:, None].expand(-1, n // 2 + 1)


class FourierProjector:
    """Projects one volume at many orientations; holds the padded volume's Fourier transform.

    The transform is stored for kx >= 0 only (the rest follows from Hermitian symmetry) with the
    eight corners of every interpolation cell side by side, so that one trilinear read is one
    contiguous 64-byte gather: memory ~ pad^3 n^3 * 32 bytes, reads cache-friendly.
    """

    def __init__(
        self,
        volume: np.ndarray,
        device: torch.device | str = "cpu",
        pad: int = 2,
        gridding_correction: bool = True,
    ) -> None:
        n = int(volume.shape[0])
        if volume.ndim != 3 or set(volume.shape) != {n} or n % 2:
            raise ValueError(f"volume must be cubic with an even size, got {volume.shape}")
        self.n, self.pad, self.device = n, pad, torch.device(device)
        size = pad * n
        self.size = size
        vol = torch.zeros((size,) * 3, dtype=torch.float32)
        lo = size // 2 - n // 2
        vol[lo : lo + n, lo : lo + n, lo : lo + n] = torch.from_numpy(
            np.ascontiguousarray(volume, dtype=np.float32)
        )
        if gridding_correction:
            # Trilinear interpolation in Fourier space multiplies real space by sinc^2 per axis
            # (RELION corrects the same way); exact on grid nodes, ~1-2 % elsewhere.
            s = torch.sinc((torch.arange(size) - size // 2) / size) ** 2
            vol /= s[:, None, None] * s[None, :, None] * s[None, None, :]
        ft = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(vol)))
        del vol
        half = size // 2
        # Cells start at z, y in [0, size] and x in [0, half]; corners need one more plane.
        padded = torch.zeros((size + 2, size + 2, half + 3), dtype=torch.complex64)
        padded[:size, :size, :half] = ft[:, :, half:]  # x_c = +Nyquist lies outside the ball
        del ft
        corners = [
            padded[dz : dz + size + 1, dy : dy + size + 1, dx : dx + half + 2]
            for dz in (0, 1)
            for dy in (0, 1)
            for dx in (0, 1)
        ]
        table = torch.stack(corners, dim=-1).reshape(-1, 8)
        del padded, corners
        self._dims = (size + 1, size + 1, half + 2)
        self._table = torch.view_as_real(table).contiguous().to(self.device)  # (cells, 8, 2)
        kx, ky = rfft_frequencies(n, self.device)
        inside = (kx**2 + ky**2) < (n / 2) ** 2  # strict: the Nyquist ring has no +/- pair
        self._where = torch.nonzero(inside.reshape(-1)).squeeze(1)
        # (3, M0): x, y, z of the sampled frequencies, pre-scaled to padded-grid units.
        k = torch.stack([kx[inside], ky[inside], torch.zeros_like(kx[inside])]).float()
        self._k = (k * pad).contiguous()

    def slices(self, rotations: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Fourier transforms of projections for (B, 3, 3) rotations: (B, n, n//2+1) complex64.

        The slice at frequency k is V^(A^T k), zero beyond Nyquist; its inverse rfft2 (then
        fftshift) is the projection with the volume's centre at pixel n//2.
        """
        a = torch.as_tensor(rotations, dtype=torch.float32, device=self.device).reshape(-1, 3, 3)
        b = a.shape[0]
        # A^T k for every image, laid out as three contiguous rows (x, y, z) of B*M0 values.
        x, y, z = torch.matmul(a.transpose(1, 2), self._k).transpose(0, 1).reshape(3, -1)
        flip = x < 0  # read the conjugate at -k: only kx >= 0 is stored
        half = self.size // 2
        sign = 1.0 - 2.0 * flip.float()
        x = x * sign
        y = y * sign + half
        z = z * sign + half
        xl = x.floor().clamp_(0, half)
        yl = y.floor().clamp_(0, self.size)
        zl = z.floor().clamp_(0, self.size)
        wx, wy, wz = x - xl, y - yl, z - zl
        cell = (zl.long() * self._dims[1] + yl.long()) * self._dims[2] + xl.long()
        vals = self._table.index_select(0, cell)  # (M, 8, 2), corners ordered z, y, x
        # Trilinear weights, contracted in two small batched products: over (z, y), then x.
        vy, vz = 1.0 - wy, 1.0 - wz
        wzy = torch.stack([vz * vy, vz * wy, wz * vy, wz * wy], 1)
        wxx = torch.stack([1.0 - wx, wx], 1)
        m = vals.shape[0]
        re_im = torch.bmm(wzy[:, None, :], vals.view(m, 4, 4)).view(m, 2, 2)
        re_im = torch.bmm(wxx[:, None, :], re_im).squeeze(1)
        re_im[:, 1] *= sign
        out = torch.zeros(b, self.n * (self.n // 2 + 1), dtype=torch.complex64, device=self.device)
        out[:, self._where] = torch.view_as_complex(re_im.contiguous()).reshape(b, -1)
        return out.reshape(b, self.n, self.n // 2 + 1)

    def project(self, rotations: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Real-space projections (B, n, n), centre at pixel n//2."""
        return slices_to_images(self.slices(rotations), self.n)


def slices_to_images(ft: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of the slice convention: rfft2-grid spectra (B, n, n//2+1) -> images (B, n, n)."""
    img = torch.fft.irfft2(ft, s=(n, n))
    return torch.fft.fftshift(img, dim=(-2, -1))


def images_to_slices(images: torch.Tensor) -> torch.Tensor:
    """Images (B, n, n) centred at n//2 -> spectra on the rfft2 grid (slice convention)."""
    return torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1)))


def shift_phase(shifts: torch.Tensor, n: int) -> torch.Tensor:
    """Phase factors moving image content by `shifts` (B, 2) = (dx, dy) px: (B, n, n//2+1)."""
    kx, ky = rfft_frequencies(n, shifts.device)
    s = shifts.to(torch.float32)
    arg = -2.0 * np.pi * (kx[None] * s[:, 0, None, None] + ky[None] * s[:, 1, None, None]) / n
    return torch.polar(torch.ones_like(arg), arg)
