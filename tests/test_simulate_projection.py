"""Projection geometry of the simulator: Fourier-slice projector, RELION Euler convention,
uniform orientations, Fourier shifts.

Reference images are built independently: sums of the sampled volume along z (numpy), atomic
models rotated by gemmi before sampling, rotation matrices written out from RELION's ZYZ
definition.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cryosift.simulate import (
    FourierProjector,
    euler_to_matrix,
    load_atomic_model,
    matrix_to_euler,
    model_to_volume,
    random_orientations,
)
from cryosift.simulate.orientations import spread_view_directions
from cryosift.simulate.projector import images_to_slices, shift_phase, slices_to_images
from sim_helpers import (
    band_limit,
    corr,
    data_file,
    rel_l2,
    rfft_disk,
    spectrum,
)

PIXEL, SIZE = 4.0, 48  # SpCas9 (radius ~88 Å) fills a 48-px field at 4 Å/px
IDENTITY = np.eye(3)[None]


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def cas9_model():
    return load_atomic_model(data_file("structures", "5F9R.pdb"))


@pytest.fixture(scope="module")
def cas9_volume(cas9_model):
    return model_to_volume(cas9_model, PIXEL, SIZE).data


# --------------------------------------------------------------------------- projection along z


def test_identity_projection_is_sum_along_z_without_gridding_correction(cas9_volume):
    """With A = I every slice sample falls on a node of the 2x padded grid, where trilinear
    interpolation is exact: the slice equals the 2D DFT of the z-sum, up to float32 FFT rounding
    (~1e-6 relative). Compared on the open disk |k| < n/2 (see the Nyquist test below for the
    edge), so the tolerance 1e-4 (spectrum) / 1e-3 (image) leaves a wide margin."""
    proj = FourierProjector(cas9_volume, gridding_correction=False)
    ref_ft = spectrum(cas9_volume.sum(axis=0))
    got_ft = proj.slices(IDENTITY)[0].numpy()
    inside = rfft_disk(SIZE, strict=True)
    assert rel_l2(got_ft[inside], ref_ft[inside]) < 1e-4
    # nothing beyond Nyquist
    assert np.abs(got_ft[~rfft_disk(SIZE, strict=False)]).max() == 0.0

    img = proj.project(IDENTITY)[0].numpy()
    assert img.shape == (SIZE, SIZE)
    assert rel_l2(band_limit(img), band_limit(cas9_volume.sum(axis=0))) < 1e-3


def test_identity_projection_with_gridding_correction(cas9_volume):
    """The gridding correction divides voxel (z, y, x) by prod_i sinc^2(x_i / (pad n)) before the
    FFT. On grid nodes trilinear interpolation loses nothing, so at A = I the projection is the
    z-sum of the *corrected* volume exactly (checked to 1e-4), and differs from the plain z-sum by
    the over-correction 1/prod sinc^2 - 1 ~ pi^2 r^2 / (3 (pad n)^2) = pi^2 r^2 / (12 n^2) at
    radius r px. Density-weighted over SpCas9 (radius of gyration ~9 px in a 48-px cube) that is
    ~3 %: hence the 5 % bound, and the measured error must match the prediction to +-50 %."""
    n, pad = SIZE, 2
    c = np.arange(n) - n // 2
    s = np.sinc(c / (pad * n)) ** 2
    corrected = cas9_volume / (s[:, None, None] * s[None, :, None] * s[None, None, :])
    img = FourierProjector(cas9_volume).project(IDENTITY)[0].numpy()
    assert rel_l2(band_limit(img), band_limit(corrected.sum(axis=0))) < 1e-4

    plain = band_limit(cas9_volume.sum(axis=0))
    err = rel_l2(band_limit(img), plain)
    assert err < 0.05
    w = np.clip(cas9_volume, 0, None)
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    predicted = np.pi**2 * float((w * r2).sum() / w.sum()) / (12 * n**2)
    assert 0.5 * predicted < err < 1.5 * predicted, (err, predicted)


def test_nyquist_band_limit_is_rotation_symmetric(cas9_volume):
    """Both Nyquist samples of the rfft grid that lie on the disk |k| = n/2, (kx=+n/2, ky=0) and
    (kx=0, ky=-n/2), must be treated alike (both kept and equal to the z-sum's DFT, or both
    dropped): otherwise the band limit is not symmetric under a 90-degree in-plane rotation."""
    proj = FourierProjector(cas9_volume, gridding_correction=False)
    got = proj.slices(IDENTITY)[0].numpy()
    ref = spectrum(cas9_volume.sum(axis=0))
    h = SIZE // 2
    at_x, at_y = got[0, h], got[h, 0]  # (ky=0, kx=+n/2) and (ky=-n/2, kx=0)
    assert abs(ref[0, h]) > 1e-3 and abs(ref[h, 0]) > 1e-3  # the test has teeth
    if at_x == 0 or at_y == 0:
        assert at_x == 0 and at_y == 0
    else:
        np.testing.assert_allclose([at_x, at_y], [ref[0, h], ref[h, 0]], rtol=1e-4)


def test_projector_rejects_odd_or_non_cubic_volumes():
    with pytest.raises(ValueError):
        FourierProjector(np.zeros((15, 15, 15), np.float32))
    with pytest.raises(ValueError):
        FourierProjector(np.zeros((16, 16, 8), np.float32))


# ------------------------------------------------------------------- rotation convention (gemmi)


def _rotated_volume(path, a: np.ndarray) -> np.ndarray:
    import gemmi

    model = load_atomic_model(path)
    model.structure[0].transform_pos_and_adp(
        gemmi.Transform(gemmi.Mat33(a.tolist()), gemmi.Vec3(0, 0, 0))
    )
    return model_to_volume(model, PIXEL, SIZE).data


def test_projection_of_rotated_model_matches_rotated_projection(cas9_volume):
    """RELION convention: a point p of the volume lands at A p. Rotating the atoms by A with gemmi
    and summing along z must give FourierProjector(vol).project(A).

    Off the grid nodes trilinear interpolation attenuates by ~sinc^2 and the gridding correction
    undoes it only on average, leaving ~1.5-2 % L2 error (measured 1.6-1.8 % here): bound 3 %.
    The transposed matrix (the other common convention) gives 50-70 % here; requiring it to be at
    least 3x worse keeps the test able to tell the conventions apart."""
    path = data_file("structures", "5F9R.pdb")
    proj = FourierProjector(cas9_volume)
    rng = np.random.default_rng(20240611)
    angles = np.vstack([[30.0, 70.0, 110.0], random_orientations(3, rng)])
    for rot, tilt, psi in angles:
        a = euler_to_matrix(rot, tilt, psi)[0]
        ref = band_limit(_rotated_volume(path, a).sum(axis=0))
        got = band_limit(proj.project(a[None])[0].numpy())
        wrong = band_limit(proj.project(a.T[None])[0].numpy())
        err = rel_l2(got, ref)
        assert err < 0.03, (rot, tilt, psi, err)
        assert corr(got, ref) > 0.999
        assert rel_l2(wrong, ref) > 3 * err, (rot, tilt, psi)


def test_projections_of_a_batch_equal_single_projections(cas9_volume):
    """Batched slicing must not mix images: each row equals its own single projection."""
    proj = FourierProjector(cas9_volume)
    rots = euler_to_matrix(*random_orientations(5, np.random.default_rng(3)).T)
    batch = proj.project(rots).numpy()
    for i in range(5):
        np.testing.assert_allclose(batch[i], proj.project(rots[i : i + 1])[0].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- Euler angles


def _rz(a: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(b: float) -> np.ndarray:
    c, s = np.cos(np.deg2rad(b)), np.sin(np.deg2rad(b))
    return np.array([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]])


def test_euler_matrix_is_relion_zyz_product():
    """RELION's Euler_angles2matrix is A = Rz(psi) Ry(tilt) Rz(rot) with the frame rotations
    written out in _rz/_ry (Heymann, Chagoyen & Belnap 2005, ZYZ)."""
    rng = np.random.default_rng(0)
    angles = rng.uniform([-180, 0, -180], [180, 180, 180], size=(20, 3))
    mats = euler_to_matrix(*angles.T)
    for (rot, tilt, psi), m in zip(angles, mats, strict=True):
        np.testing.assert_allclose(m, _rz(psi) @ _ry(tilt) @ _rz(rot), atol=1e-12)


def test_euler_known_cases():
    np.testing.assert_allclose(
        euler_to_matrix(90.0, 0.0, 0.0)[0], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12
    )
    # tilt 90 at rot 0 views along x: the volume's x axis becomes the projection (z) axis
    np.testing.assert_allclose(
        euler_to_matrix(0.0, 90.0, 0.0)[0], [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12
    )
    np.testing.assert_allclose(euler_to_matrix(0.0, 0.0, 0.0)[0], np.eye(3), atol=1e-15)


def test_euler_matrices_are_rotations_and_round_trip():
    rng = np.random.default_rng(1)
    rot = rng.uniform(-179.9, 179.9, 500)
    tilt = rng.uniform(0.1, 179.9, 500)
    psi = rng.uniform(-179.9, 179.9, 500)
    m = euler_to_matrix(rot, tilt, psi)
    assert m.shape == (500, 3, 3)
    np.testing.assert_allclose(
        m @ m.transpose(0, 2, 1), np.broadcast_to(np.eye(3), m.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(m), 1.0, atol=1e-12)
    r2, t2, p2 = matrix_to_euler(m)
    np.testing.assert_allclose(t2, tilt, atol=1e-8)
    np.testing.assert_allclose(r2, rot, atol=1e-8)
    np.testing.assert_allclose(p2, psi, atol=1e-8)
    # degenerate tilt 0: rot and psi are not unique (only rot + psi is), the matrix is
    a = euler_to_matrix(37.0, 0.0, -61.0)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(a)), a, atol=1e-12)


def test_euler_round_trip_at_tilt_180():
    a = euler_to_matrix(37.0, 180.0, -61.0)
    np.testing.assert_allclose(euler_to_matrix(*matrix_to_euler(a)), a, atol=1e-12)


# ------------------------------------------------------------------------------- orientations


def test_random_orientations_are_uniform_on_so3():
    """Haar measure: rot, psi uniform on [0, 360), cos(tilt) uniform on [-1, 1]; the viewing
    direction (third row of A) has mean 0 with per-component sd sqrt(1/(3n)): bound 5 sd."""
    n = 20000
    ang = random_orientations(n, np.random.default_rng(12345))
    assert ang.shape == (n, 3)
    rot, tilt, psi = ang.T
    assert stats.kstest(np.cos(np.deg2rad(tilt)), stats.uniform(-1, 2).cdf).pvalue > 1e-3
    assert stats.kstest(rot, stats.uniform(0, 360).cdf).pvalue > 1e-3
    assert stats.kstest(psi, stats.uniform(0, 360).cdf).pvalue > 1e-3
    view = euler_to_matrix(rot, tilt, psi)[:, 2, :]
    np.testing.assert_allclose(np.linalg.norm(view, axis=1), 1.0, atol=1e-12)
    assert np.abs(view.mean(0)).max() < 5 * np.sqrt(1 / (3 * n))
    # second moments of a uniform direction: E[v v^T] = I / 3 (sd of each entry < 0.3/sqrt(n))
    np.testing.assert_allclose(view.T @ view / n, np.eye(3) / 3, atol=5 * 0.3 / np.sqrt(n))

    no_psi = random_orientations(100, np.random.default_rng(1), in_plane=False)
    assert np.all(no_psi[:, 2] == 0)


def test_spread_view_directions_are_well_separated():
    """k Fibonacci directions on the sphere are ~sqrt(4 pi / k) rad apart; require half that."""
    for k in (4, 10, 50):
        dirs = spread_view_directions(k, np.random.default_rng(k))
        v = euler_to_matrix(dirs[:, 0], dirs[:, 1], np.zeros(k))[:, 2, :]
        cosines = np.clip(v @ v.T, -1, 1) - 2 * np.eye(k)
        min_angle = np.arccos(cosines.max())
        assert min_angle > 0.5 * np.sqrt(4 * np.pi / k), (k, np.rad2deg(min_angle))


# ----------------------------------------------------------------------------------- shifts


def test_integer_shift_phase_equals_roll():
    """Phase factors exp(-2 pi i k.s / n) with integer s are an exact circular shift, also at the
    Nyquist row/column where they are real (+-1): float32 rounding only."""
    n = 32
    rng = np.random.default_rng(5)
    imgs = rng.normal(size=(3, n, n)).astype(np.float32)
    shifts = np.array([[3.0, -5.0], [-7.0, 2.0], [16.0, 0.0]])  # (dx, dy) px
    ft = images_to_slices(torch.from_numpy(imgs)) * shift_phase(torch.from_numpy(shifts), n)
    moved = slices_to_images(ft, n).numpy()
    for img, out, (dx, dy) in zip(imgs, moved, shifts, strict=True):
        np.testing.assert_allclose(out, np.roll(img, (int(dy), int(dx)), axis=(0, 1)), atol=1e-5)


def test_fractional_shifts_compose():
    """Two half-pixel shifts of a band-limited image equal one whole-pixel shift."""
    n = 32
    img = band_limit(np.random.default_rng(6).normal(size=(1, n, n)))
    ft = images_to_slices(torch.from_numpy(img.astype(np.float32)))
    half = shift_phase(torch.tensor([[0.5, -0.5]]), n)
    twice = slices_to_images(ft * half * half, n).numpy()[0]
    np.testing.assert_allclose(twice, np.roll(img[0], (-1, 1), axis=(0, 1)), atol=1e-4)
