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
    a = align2d(images[:120], 3, iterations=2, min_iterations=2, mem_mb=512, seed=1,
                candidates=2)
    b = align2d(images[:120], 3, iterations=2, min_iterations=2, mem_mb=8, seed=1,
                candidates=2)
    assert b.params["chunk_images"] < a.params["chunk_images"]
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.psi, b.psi, atol=1e-3)


def _true_references(images, table, k):
    """Class averages of the images un-turned and re-centred with their true poses."""
    x = torch.as_tensor(np.asarray(images, np.float32))
    org = torch.tensor(table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 4.8,
                       dtype=torch.float32)
    psi = torch.tensor(table["rlnAnglePsi"].to_numpy(), dtype=torch.float32)
    al = rotate(shift(x, org), -psi)
    views = table["cryosiftTrueView"].to_numpy()
    return torch.stack([al[torch.as_tensor(views == j)].mean(0) for j in range(k)])


def test_candidate_pruning_with_every_class_is_the_exhaustive_search(rotated_views):
    from cryosift.classify.align2d import _Aligner
    from cryosift.classify.features import disk_mask, standardise

    images, table = rotated_views
    mask = disk_mask(40)
    refs = standardise(_true_references(images, table, 4), mask)
    xs = standardise(images[:100], mask)
    al = _Aligner(40, 10.0, 4.0, torch.device("cpu"))
    al.set_references(refs)
    full = al.align(xs)
    perm = torch.stack([torch.randperm(4, generator=torch.Generator().manual_seed(i))
                        for i in range(len(xs))])  # every class, in any order: M = K
    pruned = al.align(xs, perm)
    for key in ("labels", "psi", "origin", "score"):
        torch.testing.assert_close(pruned[key], full[key], rtol=0, atol=0)
    # M < K: the ranking keeps each image's best class (at its found shift) among 2 of 4
    cand = al.rank(xs, full["origin"], None, 2)
    assert (cand == full["labels"][:, None]).any(1).float().mean() > 0.95
    # and align2d with candidates >= k is the exhaustive run
    a = align2d(images[:120], 3, iterations=2, min_iterations=2, seed=1, candidates=3)
    b = align2d(images[:120], 3, iterations=2, min_iterations=2, seed=1, candidates=None)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.psi, b.psi)


def test_pruned_align2d_finds_the_rotated_views(rotated_views):
    images, table = rotated_views
    views = table["cryosiftTrueView"].to_numpy()
    res = align2d(images, 4, seed=0, candidates=2)
    assert res.params["candidates"] == 2
    assert all(h["classes_searched"] == 2 for h in res.history if h["phase"] == "classify")
    assert clustering_accuracy(views, res.labels) > 0.95


def test_soft_assignment_gives_valid_labels_and_poses(rotated_views):
    images, table = rotated_views
    views = table["cryosiftTrueView"].to_numpy()
    res = align2d(images, 4, seed=0, assignment="soft", iterations=6)
    assert res.labels.shape == (len(images),) and res.labels.min() >= 0 and res.labels.max() < 4
    assert np.all((res.psi > -180) & (res.psi <= 180)) and np.isfinite(res.origins).all()
    assert np.abs(res.origins).max() <= 0.1 * 40 + 0.5
    assert np.isfinite(res.averages).all() and res.averages.shape == (4, 40, 40)
    cls = [h for h in res.history if h["phase"] == "classify"]
    assert cls and all(h["assignment"] == "soft" and h["noise_variance"] > 0 for h in cls)
    assert clustering_accuracy(views, res.labels) > 0.9
    with pytest.raises(Exception, match="assignment"):
        align2d(images[:20], 2, assignment="fuzzy")


def test_split_largest_moves_the_worst_fitting_half():
    from cryosift.classify.align2d import _split_largest

    labels = torch.tensor([0, 0, 0, 0, 2, 2, 0, 2])  # class 1 empty, class 0 the largest (5)
    score = torch.tensor([5.0, 1.0, 4.0, 2.0, 9.0, 9.0, 3.0, 9.0])
    splits = _split_largest([1], labels, score)
    assert len(splits) == 1
    j, big, moved, kept = splits[0]
    assert (j, big) == (1, 0)
    assert sorted(moved.tolist()) == [1, 3]  # the two worst of the five
    assert sorted(kept.tolist()) == [0, 2, 6]
    assert labels.tolist() == [0, 1, 0, 1, 2, 2, 0, 2]


def test_an_empty_class_is_reseeded_from_the_largest_class(rotated_views, monkeypatch):
    """Two classes start from the same image: one of them gets no image (ties go to the first)
    and must be re-seeded by splitting the largest class, which holds two views."""
    import cryosift.classify.align2d as a2d

    images, table = rotated_views
    views = table["cryosiftTrueView"].to_numpy()
    first = [int(np.flatnonzero(views == v)[0]) for v in range(3)]

    def fake_kmeans(feats, k, seed=0, n_init=4):
        seeds = [*first, first[2]]  # view 3 has no seed; classes 2 and 3 are the same image
        return np.minimum(views, 2), np.asarray(feats)[seeds]

    monkeypatch.setattr(a2d, "kmeans_pp", fake_kmeans)
    res = align2d(images, 4, seed=0, init_iterations=0, candidates=None)
    assert res.history[0]["empty_classes_reseeded"] == 1
    assert np.bincount(res.labels, minlength=4).min() > 0
    assert clustering_accuracy(views, res.labels) > 0.95


def test_initial_classes_from_a_subset_of_the_images(rotated_views):
    images, table = rotated_views
    views = table["cryosiftTrueView"].to_numpy()
    res = align2d(images, 4, seed=0, init_images=120, iterations=6)
    assert res.params["init_images"] == 120
    assert res.labels.min() >= 0 and np.bincount(res.labels, minlength=4).min() > 0
    assert clustering_accuracy(views, res.labels) > 0.9
