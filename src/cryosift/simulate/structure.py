"""Turn an atomic model (PDB/mmCIF via gemmi) or a density map (.mrc) into a sampled volume.

Atomic models: gemmi computes the electrostatic potential from electron scattering factors
(International Tables C 4.3.2.2, with each atom's B-factor plus an optional extra blur) on a grid
twice as fine as the requested pixel size; the volume is then band-limited to the pixel size's
Nyquist frequency by Fourier cropping, so images carry no aliasing from the atoms' sharp cores.
The model's centre of mass goes to the volume's centre voxel (index N//2 on every axis).
Volumes are float32 arrays indexed [z, y, x].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryosift.errors import InputError

MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")
MAP_SUFFIXES = (".mrc", ".map", ".mrc.gz", ".map.gz", ".ccp4")


@dataclass
class Volume:
    """A cubic density sampled at `pixel_size` Å, centred on voxel N//2, indexed [z, y, x]."""

    data: np.ndarray
    pixel_size: float
    radius: float  # radius (Å) of the sphere around the centre that holds the structure
    source: str = ""

    @property
    def size(self) -> int:
        return int(self.data.shape[0])


@dataclass
class AtomicModel:
    """Atom coordinates (Å), elements and B-factors of one model, with its source path."""

    structure: object  # gemmi.Structure, centred on its centre of mass
    positions: np.ndarray  # (n, 3) x, y, z after centring
    path: str

    @property
    def radius(self) -> float:
        return float(np.linalg.norm(self.positions, axis=1).max())

    @property
    def radius_p90(self) -> float:
        return float(np.percentile(np.linalg.norm(self.positions, axis=1), 90))


def _has_suffix(path: Path, suffixes: tuple[str, ...]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def is_atomic_model(path: str | Path) -> bool:
    return _has_suffix(Path(path), MODEL_SUFFIXES)


def is_density_map(path: str | Path) -> bool:
    return _has_suffix(Path(path), MAP_SUFFIXES)


def load_atomic_model(path: str | Path) -> AtomicModel:
    """Read the first model of a PDB/mmCIF file without hydrogens or waters, centred on its
    centre of mass (weighted by atomic number, the dominant term of electron scattering)."""
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputError("structure file not found", path)
    if not is_atomic_model(path):
        raise InputError(
            "unknown structure format (expected .pdb, .cif, .mmcif, optionally .gz, or a map .mrc)",
            path,
        )
    try:
        st = gemmi.read_structure(str(path))
    except (RuntimeError, ValueError, OSError) as exc:
        raise InputError(f"cannot read atomic model: {exc}", path) from exc
    if len(st) == 0:
        raise InputError("atomic model holds no models", path)
    st.remove_hydrogens()
    st.remove_waters()
    while len(st) > 1:
        del st[len(st) - 1]
    model = st[0]
    atoms = [
        (a.pos.x, a.pos.y, a.pos.z, a.element.atomic_number) for ch in model for r in ch for a in r
    ]
    if not atoms:
        raise InputError("atomic model holds no atoms", path)
    arr = np.asarray(atoms, dtype=np.float64)
    centre = (arr[:, :3] * arr[:, 3:4]).sum(0) / arr[:, 3].sum()
    model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*(-centre))))
    return AtomicModel(structure=st, positions=arr[:, :3] - centre, path=str(path))


def fourier_crop(volume: np.ndarray, size: int) -> np.ndarray:
    """Resample a cubic [z,y,x] volume to `size`^3 voxels by cropping or zero-padding its Fourier
    transform: band-limited resampling that keeps the centre voxel N//2 fixed and the density
    values (not their sum) on the same scale. float32 rFFTs keep memory near 2x the volume."""
    import torch

    n = volume.shape[0]
    vol = torch.from_numpy(np.array(volume, dtype=np.float32, order="C"))
    if n == size:
        return vol.numpy().copy()
    ft = torch.fft.rfftn(torch.fft.ifftshift(vol))
    del vol
    m = min(n, size)
    out = torch.zeros((size, size, size // 2 + 1), dtype=torch.complex64)
    h = m // 2
    for zs, zd in ((slice(0, h), slice(0, h)), (slice(n - h, n), slice(size - h, size))):
        for ys, yd in ((slice(0, h), slice(0, h)), (slice(n - h, n), slice(size - h, size))):
            out[zd, yd, : h + 1] = ft[zs, ys, : h + 1]
    del ft
    res = torch.fft.fftshift(torch.fft.irfftn(out, s=(size,) * 3)) * (size / n) ** 3
    return res.numpy()


def model_to_volume(
    model: AtomicModel, pixel_size: float, size: int, bfactor: float = 0.0, oversample: int = 2
) -> Volume:
    """Electron-scattering potential of `model` on a size^3 grid at `pixel_size` Å.

    gemmi evaluates the atoms on a grid `oversample` times finer; Fourier cropping to `size` then
    removes everything beyond Nyquist. `bfactor` (Å^2) blurs every atom further.
    """
    import gemmi

    fine = size * oversample
    side = size * pixel_size
    st = model.structure.clone()
    st.cell = gemmi.UnitCell(side, side, side, 90.0, 90.0, 90.0)
    st.spacegroup_hm = "P 1"
    shift = gemmi.Vec3(side / 2.0, side / 2.0, side / 2.0)
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), shift))
    dc = gemmi.DensityCalculatorE()
    dc.d_min = 2.0 * pixel_size / oversample
    dc.rate = 1.0  # grid spacing d_min / (2 rate) = pixel_size / oversample
    dc.blur = float(bfactor)
    dc.grid.set_unit_cell(st.cell)
    dc.grid.set_size(fine, fine, fine)
    dc.put_model_density_on_grid(st[0])
    grid = np.array(dc.grid, copy=False)  # indexed [x, y, z], spacing side / grid size
    if len(set(grid.shape)) != 1:
        raise RuntimeError(f"gemmi returned a non-cubic grid {grid.shape}")
    data = fourier_crop(grid.transpose(2, 1, 0), size)
    del dc
    return Volume(data=data, pixel_size=pixel_size, radius=model.radius, source=model.path)


def load_density_map(path: str | Path, pixel_size: float | None = None) -> Volume:
    """Read a cubic density map, resampled to exactly `pixel_size` when that differs from the
    map's voxel size (see resample_volume)."""
    import mrcfile

    path = Path(path)
    if not path.is_file():
        raise InputError("density map not found", path)
    try:
        with mrcfile.open(str(path), permissive=False) as mrc:
            data = np.asarray(mrc.data, dtype=np.float32)
            voxel = float(mrc.voxel_size.x)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read density map: {exc}", path) from exc
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputError(f"density map must be a cubic 3D volume, got shape {data.shape}", path)
    if not np.isfinite(data).all():
        raise InputError("density map contains NaN or Inf values", path)
    if voxel <= 0:
        if pixel_size is None:
            raise InputError("density map has no voxel size in its header; pass --pixel-size", path)
        voxel = pixel_size
    if pixel_size is None or abs(pixel_size - voxel) <= 1e-4 * voxel:
        pixel_size = voxel
    data = resample_volume(data, voxel, pixel_size)
    radius = _map_radius(data) * pixel_size
    return Volume(data=data, pixel_size=float(pixel_size), radius=radius, source=str(path))


def resample_volume(data: np.ndarray, voxel: float, pixel_size: float) -> np.ndarray:
    """Resample a cubic [z,y,x] map from `voxel` to exactly `pixel_size` Å, even-sized output.

    The old centre voxel n//2 stays the physical centre (new voxel m//2). When the new size is
    an exact even integer, Fourier cropping/padding does it exactly. Otherwise downsampling first
    removes frequencies beyond the new Nyquist (Fourier mask) so nothing aliases, and values come
    from cubic-spline interpolation at the new grid points. Equal sizes and pixel sizes return
    the map unchanged (odd sizes padded by one leading voxel, keeping the centre).
    """
    from scipy import ndimage

    n = data.shape[0]
    if abs(pixel_size - voxel) <= 1e-6 * voxel:
        if n % 2:
            return np.pad(data, ((1, 0),) * 3).astype(np.float32)
        return data.astype(np.float32, copy=False)
    exact = n * voxel / pixel_size
    if abs(exact - round(exact)) < 1e-5 * exact and round(exact) % 2 == 0 and n % 2 == 0:
        return fourier_crop(data, int(round(exact)))  # exact band-limited resampling
    m = int(math.ceil(exact))
    m += m % 2
    src = data.astype(np.float32)
    if pixel_size > voxel:
        k = np.fft.fftfreq(n) / voxel
        kr = np.fft.rfftfreq(n) / voxel
        k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + kr[None, None, :] ** 2
        ft = np.fft.rfftn(src) * (k2 <= (0.5 / pixel_size) ** 2)
        src = np.fft.irfftn(ft, s=src.shape, axes=(0, 1, 2)).astype(np.float32)
    coord = (np.arange(m) - m // 2) * (pixel_size / voxel) + n // 2
    zz, yy, xx = np.meshgrid(coord, coord, coord, indexing="ij")
    out = ndimage.map_coordinates(src, [zz, yy, xx], order=3, mode="constant", cval=0.0)
    return out.astype(np.float32)


def _map_radius(data: np.ndarray) -> float:
    """Radius (voxels) around the centre that holds 99% of the map's positive density."""
    n = data.shape[0]
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    pos = np.clip(data, 0, None).ravel()
    if pos.sum() <= 0:
        return n / 2.0
    order = np.argsort(r.ravel())
    cum = np.cumsum(pos[order]) / pos.sum()
    return float(r.ravel()[order][np.searchsorted(cum, 0.99)])


def pad_volume(volume: Volume, size: int) -> Volume:
    """Zero-pad (or centre-crop) a volume to size^3 keeping its centre voxel."""
    n = volume.size
    if n == size:
        return volume
    out = np.zeros((size,) * 3, dtype=np.float32)
    m = min(n, size)
    src = slice(n // 2 - m // 2, n // 2 - m // 2 + m)
    dst = slice(size // 2 - m // 2, size // 2 - m // 2 + m)
    out[dst, dst, dst] = volume.data[src, src, src]
    return Volume(
        data=out, pixel_size=volume.pixel_size, radius=volume.radius, source=volume.source
    )
