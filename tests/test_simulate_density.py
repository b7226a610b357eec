"""From structure to sampled volume: atomic models against gemmi's own density, Fourier
resampling, density maps (voxel size from the header or from --pixel-size)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from cryosift.errors import InputError
from cryosift.simulate import FourierProjector, load_atomic_model, load_density_map, model_to_volume
from cryosift.simulate.structure import fourier_crop, is_atomic_model, is_density_map, pad_volume
from sim_helpers import band_limit, corr, data_file, rel_l2

PIXEL, SIZE = 3.0, 64  # SpCas9 (diameter ~176 Å) inside a 192 Å periodic cell


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")


def gemmi_reference_volume(path, pixel: float, n: int, blur: float) -> np.ndarray:
    """gemmi.DensityCalculatorE sampled directly on the n^3 grid at `pixel` Å, [z, y, x].

    Written from scratch here: first model, no hydrogens or waters, centre of mass weighted by
    atomic number on voxel n//2 (coordinate n//2 * pixel = side/2), P1 cell of side n * pixel.
    """
    import gemmi

    st = gemmi.read_structure(str(path))
    st.remove_hydrogens()
    st.remove_waters()
    while len(st) > 1:
        del st[len(st) - 1]
    atoms = np.array(
        [
            (a.pos.x, a.pos.y, a.pos.z, a.element.atomic_number)
            for ch in st[0]
            for r in ch
            for a in r
        ]
    )
    com = (atoms[:, :3] * atoms[:, 3:]).sum(0) / atoms[:, 3].sum()
    side = n * pixel
    st.cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*(side / 2 - com))))
    dc = gemmi.DensityCalculatorE()
    dc.blur = blur
    dc.grid.set_unit_cell(st.cell)
    dc.grid.set_size(n, n, n)  # d_min left at 0: gemmi keeps this grid
    dc.put_model_density_on_grid(st[0])
    grid = np.array(dc.grid, copy=True)
    assert grid.shape == (n, n, n)
    return grid.transpose(2, 1, 0)  # gemmi's [x, y, z] -> [z, y, x]


@pytest.fixture(scope="module")
def cas9():
    path = data_file("structures", "5F9R.pdb")
    return path, load_atomic_model(path)


def test_atomic_model_projection_matches_gemmi_density(cas9):
    """The simulator samples atoms on a finer grid and Fourier-crops; the reference samples
    gemmi's density straight on the 3 Å grid. With atoms blurred by B + 40 Å^2 the reference's
    real-space sampling aliases a few % of the energy (its spectrum at Nyquist 1/6 Å^-1 is still
    exp(-(B+40)/4 * 1/36) ~ 0.5), so after band-limiting both to the same disk: relative L2 < 5 %
    (measured 3.0 %), correlation > 0.99 (measured 0.9993). The projector runs without gridding
    correction so that the comparison isolates the density step (the correction is tested in
    test_simulate_projection)."""
    path, model = cas9
    ref = gemmi_reference_volume(path, PIXEL, SIZE, blur=40.0)
    vol = model_to_volume(model, PIXEL, SIZE, bfactor=40.0).data
    assert vol.shape == (SIZE,) * 3 and vol.dtype == np.float32
    img = FourierProjector(vol, gridding_correction=False).project(np.eye(3)[None])[0].numpy()
    got, want = band_limit(img), band_limit(ref.sum(axis=0))
    assert rel_l2(got, want) < 0.05
    assert corr(got, want) > 0.99
    # the total scattering potential is the same (DC term, not affected by aliasing): 1e-3
    assert vol.sum() == pytest.approx(ref.sum(), rel=1e-3)
    # teeth: the transposed image ([x, y] instead of [y, x]) is far off
    assert rel_l2(got.T, want) > 0.3


def test_atomic_model_volume_matches_gemmi_in_3d(cas9):
    """Full 3D comparison (catches a z/x transposition that a z-projection would hide): with a
    heavy blur (B + 200 Å^2, spectrum at Nyquist exp(-(B+200)/144) < 0.2) the directly sampled
    reference is nearly alias-free: relative L2 < 5 % (measured 2.6 %)."""
    path, model = cas9
    ref = gemmi_reference_volume(path, PIXEL, SIZE, blur=200.0)
    vol = model_to_volume(model, PIXEL, SIZE, bfactor=200.0).data
    assert rel_l2(vol, ref) < 0.05
    assert rel_l2(vol.transpose(2, 1, 0), ref) > 0.3


def test_model_is_centred_on_its_centre_of_mass(cas9):
    """load_atomic_model moves the Z-weighted centre of mass to the origin, and model_to_volume
    puts the origin on voxel n//2: the density-weighted centre lies within 0.5 voxel of it."""
    _, model = cas9
    assert np.linalg.norm(model.positions.mean(0)) < 5.0  # unweighted centre: a few Å off
    assert model.radius == pytest.approx(np.linalg.norm(model.positions, axis=1).max())
    vol = model_to_volume(model, 4.0, 48).data
    c = np.arange(48) - 24
    w = vol / vol.sum()
    centre = [
        (w.sum(axis=(1, 2)) * c).sum(),
        (w.sum(axis=(0, 2)) * c).sum(),
        (w.sum(axis=(0, 1)) * c).sum(),
    ]
    assert np.abs(centre).max() < 0.5


# ----------------------------------------------------------------------------- fourier_crop


def _gaussian(n: int, sigma: float, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    dz, dy, dx = offset
    return np.exp(-((x - dx) ** 2 + (y - dy) ** 2 + (z - dz) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize(("n", "m"), [(64, 32), (64, 40), (56, 112), (40, 40)])
def test_fourier_crop_keeps_values_of_a_smooth_blob(n, m):
    """Band-limited resampling keeps the centre voxel and the density values: a Gaussian of
    sigma 4 px (off-centre by a few px) sampled on n^3 becomes, on the m^3 grid of voxel n/m,
    the same Gaussian (sigma 4 m/n). Its spectrum at the coarser Nyquist is exp(-2 pi^2 (4 m/n)^2
    / 4) < 1e-8 and its tails at the box edge < 1e-10, so the error is float32 rounding (measured
    < 4e-7): bound 1e-5.
    The integral scales with the voxel count: sum_m = sum_n (m/n)^3 (rel 1e-5)."""
    sigma, off = 4.0, (2.0, -3.0, 1.5)
    src = _gaussian(n, sigma, off).astype(np.float32)
    out = fourier_crop(src, m)
    assert out.shape == (m, m, m)
    s = m / n
    want = _gaussian(m, sigma * s, tuple(o * s for o in off))
    assert np.abs(out - want).max() < 1e-5
    assert out.sum() == pytest.approx(src.sum() * s**3, rel=1e-5)


def test_pad_volume_keeps_centre_voxel():
    from cryosift.simulate import Volume

    data = np.zeros((10, 10, 10), np.float32)
    data[5, 4, 6] = 1.0
    out = pad_volume(Volume(data, 2.0, 5.0), 16).data
    assert out.shape == (16,) * 3
    assert out[8, 7, 9] == 1.0 and out.sum() == 1.0


# ------------------------------------------------------------------------------- density maps


def test_load_density_map_with_voxel_size_in_header():
    path = data_file("maps", "EMD-3197.map")
    vol = load_density_map(path)
    assert vol.pixel_size == pytest.approx(11.4, rel=1e-5)
    assert vol.data.shape == (20, 20, 20)
    with mrcfile.open(path) as mrc:
        raw = np.asarray(mrc.data, dtype=np.float32)
    np.testing.assert_array_equal(vol.data, raw)
    assert 0 < vol.radius <= np.sqrt(3) * 10 * 11.4 + 1e-3
    # resampled to 5.7 Å (exactly half): 40 voxels, the same integral over the same volume
    fine = load_density_map(path, pixel_size=5.7)
    assert fine.pixel_size == 5.7 and fine.data.shape == (40, 40, 40)
    assert fine.data.sum() * 5.7**3 == pytest.approx(raw.sum() * 11.4**3, rel=1e-4)


def test_load_density_map_without_voxel_size_needs_pixel_size():
    path = data_file("maps", "clean70SRibosome_vol_65p.mrc")
    with pytest.raises(InputError) as err:
        load_density_map(path)
    assert path.name in str(err.value) and "pixel" in str(err.value)
    vol = load_density_map(path, pixel_size=3.0)
    assert vol.pixel_size == 3.0
    assert vol.data.shape == (66, 66, 66)  # odd maps are padded to an even size
    with mrcfile.open(path, permissive=True) as mrc:
        raw = np.asarray(mrc.data, dtype=np.float32)
    assert vol.data.sum() == pytest.approx(raw.sum(), rel=1e-5)


def _write_map(path, data, voxel):
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data.astype(np.float32))
        mrc.voxel_size = voxel
    return path


def _map_centre(vol) -> np.ndarray:
    n = vol.data.shape[0]
    c = np.arange(n) - n // 2
    w = vol.data / vol.data.sum()
    z = (w.sum(axis=(1, 2)) * c).sum()
    y = (w.sum(axis=(0, 2)) * c).sum()
    x = (w.sum(axis=(0, 1)) * c).sum()
    return np.array([z, y, x]) * vol.pixel_size


def test_resampled_odd_map_keeps_its_centre(tmp_path):
    """A 65^3 map's centre is voxel 32; a blob at (z, y, x) = (2, -5, 3) voxels from it must stay
    at (4, -10, 6) Å after resampling from 2 Å to 2.5 Å (Fourier resampling keeps N//2)."""
    path = _write_map(tmp_path / "odd.mrc", _gaussian(65, 4.0, (2.0, -5.0, 3.0)), 2.0)
    vol = load_density_map(path, pixel_size=2.5)
    assert vol.data.shape[0] % 2 == 0
    np.testing.assert_allclose(_map_centre(vol), [4.0, -10.0, 6.0], atol=0.05)


@pytest.mark.parametrize("pixel", [2.3, 1.7])
def test_resampled_map_has_the_requested_pixel_size(tmp_path, pixel):
    """2 Å -> 2.3 Å or 1.7 Å (64 * 2 / 2.3 = 55.7 voxels, not an integer): a blob 24 Å off-centre
    must stay 24 Å off-centre (0.05 Å; rounding the size to 56 and Fourier-cropping, i.e. a
    2.2857 Å voxel labelled 2.3 Å, would move it by 0.2 Å) and the integral sum * voxel^3 must be
    preserved (1e-3; that mislabelled voxel changes it by 1.9 %)."""
    src = _gaussian(64, 4.0, (0.0, 12.0, -8.0))
    path = _write_map(tmp_path / "blob.mrc", src, 2.0)
    vol = load_density_map(path, pixel_size=pixel)
    assert vol.pixel_size == pytest.approx(pixel)
    assert vol.data.shape[0] % 2 == 0 and vol.data.shape[0] * pixel >= 64 * 2.0 - pixel
    assert vol.data.sum() * pixel**3 == pytest.approx(src.sum() * 2.0**3, rel=1e-3)
    np.testing.assert_allclose(_map_centre(vol), [0.0, 24.0, -16.0], atol=0.05)


def test_padded_odd_map_keeps_its_centre(tmp_path):
    """Same blob, no resampling (pixel size = voxel size): only the even-size padding acts; it
    must add the voxel in front so that old voxel 32 becomes the new centre 33."""
    path = _write_map(tmp_path / "odd.mrc", _gaussian(65, 4.0, (2.0, -5.0, 3.0)), 2.0)
    vol = load_density_map(path)
    assert vol.data.shape == (66, 66, 66)
    np.testing.assert_allclose(_map_centre(vol), [4.0, -10.0, 6.0], atol=0.05)


def test_structure_suffixes():
    assert is_atomic_model("a/5F9R.pdb") and is_atomic_model("x.CIF.gz")
    assert is_density_map("m.mrc") and is_density_map("m.map") and not is_density_map("m.pdb")
    assert not is_atomic_model("notes.txt") and not is_density_map("notes.txt")


def test_load_atomic_model_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_atomic_model(tmp_path / "missing.pdb")
    txt = tmp_path / "model.txt"
    txt.write_text("ATOM\n")
    with pytest.raises(InputError, match="unknown structure format"):
        load_atomic_model(txt)
    garbage = tmp_path / "garbage.pdb"
    garbage.write_text("this is not a PDB file\nat all\n")
    with pytest.raises(InputError, match="no atoms|cannot read"):
        load_atomic_model(garbage)
