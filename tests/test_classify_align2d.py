"""align2d: reference-free alignment-aware 2D classification.

The sign conventions are checked against the simulator itself (RELION's: an image with
_rlnAnglePsi = psi and origin o is the psi = 0 view turned by RELION's in-plane Euler rotation and
moved by -o): aligning such images to the un-turned, centred view must give back psi and o.
On data with in-plane rotations align2d must find the views that non-aligning k-means cannot.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosift.classify.align2d import align2d, align_to_references, rotate, shift
from cryosift.classify.cluster import kmeans_pp
from cryosift.classify.features import compute_features
from cryosift.io import open_source, read_star
from cryosift.metrics import clustering_accuracy
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file


def _sim(out, **kw):
    cfg = dict(n_images=300, box=40, pixel_size=4.8, seed=7)
    cfg.update(kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        res = simulate(data_file("structures", "5F9R.pdb"), out, SimulationConfig(**cfg))
    return res, read_star(res.star).particles


def _circ_diff(a, b):
    return (np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0


def test_rotate_turns_content_as_relion_psi_and_shift_moves_it():
    n, c = 16, 8
    img = torch.zeros(1, n, n)
    img[0, c, c + 3] = 1.0  # x = +3 (column), y = 0
    out = rotate(img, torch.tensor([90.0]))[0]
    # RELION: p lands at [[cos, sin], [-sin, cos]] p = (0, -3): row c - 3, column c
    assert tuple(torch.nonzero(out > 0.99)[0].tolist()) == (c - 3, c)
    back = rotate(out[None], torch.tensor([-90.0]))[0]
    torch.testing.assert_close(back, img[0], atol=1e-5, rtol=0)
    moved = shift(img, torch.tensor([[-2.0, 1.0]]))[0]  # content moves by (dx, dy)
    assert tuple(torch.nonzero(moved > 0.99)[0].tolist()) == (c + 1, c + 1)


@pytest.mark.parametrize("snr", [None, 0.5])
def test_alignment_recovers_simulated_psi_and_origin(tmp_path, snr):
    torch.set_num_threads(1)
    view = ((40.0, 70.0),)
    ref, _ = _sim(tmp_path / "ref", n_images=2, views=1, view_angles=view, in_plane=False,
                  snr=1.0)
    imgs, table = _sim(tmp_path / "img", n_images=60, views=1, view_angles=view,
                       in_plane=True, max_shift=3.0, snr=snr or 1.0)
    reference = open_source(ref.clean).images(slice(0, 1))
    stack = open_source(imgs.clean if snr is None else imgs.star).images(slice(None))
    _, psi, origin, _ = align_to_references(stack, reference, psi_step=5.0, max_shift=5.0)
    dpsi = _circ_diff(psi, table["rlnAnglePsi"])
    dorg = origin * 4.8 - table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    tol_psi, tol_px = (4.0, 0.4) if snr is None else (8.0, 0.8)
    assert np.abs(dpsi).max() < tol_psi, dpsi
    assert np.abs(dpsi).mean() < tol_psi / 4, dpsi
    assert np.abs(dorg).max() / 4.8 < tol_px, dorg / 4.8
    assert np.all((psi > -180) & (psi <= 180))


@pytest.fixture(scope="module")
def rotated_views(tmp_path_factory):
    torch.set_num_threads(1)
    res, table = _sim(tmp_path_factory.mktemp("rot"), views=4, in_plane=True, max_shift=1.5,
                      snr=0.1)
    return open_source(res.star).images(slice(None)), table


def test_align2d_beats_non_aligning_kmeans_on_rotated_views(rotated_views):
    images, table = rotated_views
    views = table["cryosiftTrueView"].to_numpy()
    res = align2d(images, 4, seed=0)
    acc = clustering_accuracy(views, res.labels)
    kmeans = clustering_accuracy(views, kmeans_pp(compute_features(images, "pca"), 4)[0])
    assert acc > 0.95
    assert acc > kmeans + 0.3
    # within a class every image is the class average turned by its psi: psi_est - psi_true is
    # the same for all members (the average's own arbitrary orientation)
    for j in range(4):
        d = np.deg2rad(_circ_diff(res.psi[res.labels == j], table["rlnAnglePsi"][res.labels == j]))
        assert np.hypot(np.cos(d).mean(), np.sin(d).mean()) > 0.95
    assert res.averages.shape == (4, 40, 40)
    assert res.history and res.history[-1]["changed_fraction"] < 0.05


def test_align2d_is_independent_of_the_chunk_size(rotated_views):
    images, _ = rotated_views
    a = align2d(images[:120], 3, iterations=2, min_iterations=2, mem_mb=512, seed=1)
    b = align2d(images[:120], 3, iterations=2, min_iterations=2, mem_mb=8, seed=1)
    assert b.params["chunk_images"] < a.params["chunk_images"]
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.psi, b.psi, atol=1e-3)
