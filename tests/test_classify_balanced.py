"""BSK-means++ (seed 001): exact size-floored assignment, recovery of balanced and 4:1 unequal
classes, the floor itself, determinism, reliable samples and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linprog
from scipy.sparse import csr_matrix

from cryosift.classify.balanced import (
    balanced_assign,
    bsk_fit,
    bsk_means_pp,
    min_class_size,
    reliable_mask,
    squared_distances,
)
from cryosift.errors import CryosiftError
from cryosift.metrics.clustering import clustering_accuracy


def _lp_optimum(dist: np.ndarray, m: int) -> float:
    """The floored transportation problem solved by HiGHS (independent reference)."""
    n, k = dist.shape
    eq = csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), np.arange(n * k))), (n, n * k))
    ub = csr_matrix((-np.ones(n * k), (np.tile(np.arange(k), n), np.arange(n * k))), (k, n * k))
    res = linprog(dist.ravel(), A_ub=ub, b_ub=-m * np.ones(k), A_eq=eq, b_eq=np.ones(n),
                  bounds=(0, 1), method="highs")
    assert res.status == 0
    return float(res.fun)


@pytest.mark.parametrize("trial", range(12))
def test_balanced_assign_is_the_lp_optimum_and_respects_the_floor(trial):
    rng = np.random.default_rng(trial)
    n, k = int(rng.integers(30, 200)), int(rng.integers(2, 10))
    # a few classes everyone prefers, so the floor binds; rounded costs give ties
    dist = rng.random((n, k)) * rng.random(k) * 3 + rng.normal(size=(n, 1))
    if trial % 3 == 0:
        dist = np.round(dist, 1)
    m = int(rng.integers(1, n // k + 1))
    labels, prices = balanced_assign(dist, m)
    sizes = np.bincount(labels, minlength=k)
    assert sizes.min() >= m
    assert (prices >= 0).all()
    assert np.all(sizes[prices > 1e-12] == m)  # complementary slackness
    cost = dist[np.arange(n), labels].sum()
    assert cost == pytest.approx(_lp_optimum(dist, m), rel=1e-9, abs=1e-9)


def test_unconstrained_optimum_is_kept_when_the_floor_does_not_bind():
    rng = np.random.default_rng(0)
    dist = rng.random((100, 4))
    labels, prices = balanced_assign(dist, 1)
    np.testing.assert_array_equal(labels, dist.argmin(1))
    assert not prices.any()


def _blobs(sizes, dim=30, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * sep
    y = np.repeat(np.arange(len(sizes)), sizes)
    return centres[y] + rng.normal(size=(len(y), dim)), y


def test_balanced_classes_are_recovered():
    x, y = _blobs([60] * 5)
    labels, centres = bsk_means_pp(x, 5, seed=0)
    assert labels.shape == (300,) and centres.shape == (5, 30)
    assert labels.dtype.kind == "i" and set(labels) == set(range(5))
    assert clustering_accuracy(y, labels) == 1.0


def test_unequal_4_to_1_classes_are_not_split():
    sizes = [200, 140, 100, 70, 50]  # 4:1, smallest 0.45 of the mean as in B4
    x, y = _blobs(sizes, sep=2.0, seed=1)
    r = bsk_fit(x, 5, seed=0)
    assert r.min_size == min_class_size(560, 5) == 40
    assert clustering_accuracy(y, r.labels) > 0.98
    np.testing.assert_array_equal(np.sort(np.bincount(r.labels)), np.sort(np.bincount(y)))


def test_floor_binds_where_kmeans_would_leave_a_tiny_class():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(297, 5)), 40 + rng.normal(size=(3, 5))])
    labels, _ = bsk_means_pp(x, 3, seed=0)
    sizes = np.bincount(labels, minlength=3)
    assert sizes.min() >= min_class_size(300, 3) == 35
    assert sizes.min() > 300 / 3 / 3  # above 1/3 of the mean class size (issue 6)


def test_min_fraction_zero_is_plain_kmeans_assignment():
    x, _ = _blobs([30, 30, 30], seed=3)
    r = bsk_fit(x, 3, seed=0, min_fraction=0.0)
    assert r.min_size == 1
    d = squared_distances(x, r.centers)
    np.testing.assert_array_equal(r.labels, d.argmin(1))


def test_deterministic_with_seed():
    x, _ = _blobs([50, 40, 30, 20], sep=1.0, seed=4)
    a = bsk_means_pp(x, 4, seed=7)
    b = bsk_means_pp(x, 4, seed=7)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_reliable_samples_are_the_nearest_fraction_of_each_class():
    x, y = _blobs([40, 20], seed=5)
    labels, centres = bsk_means_pp(x, 2, seed=0)
    keep = reliable_mask(x, labels, centres, 0.25)
    for j in range(2):
        members = np.flatnonzero(labels == j)
        d = ((x[members] - centres[j]) ** 2).sum(1)
        n_keep = round(0.25 * len(members))
        assert keep[members].sum() == n_keep
        assert d[keep[members]].max() <= d[~keep[members]].min()
    with pytest.raises(CryosiftError, match="reliable fraction"):
        reliable_mask(x, labels, centres, 0.0)


@pytest.mark.parametrize(
    "features, k, match",
    [
        (np.zeros((10, 3)), 1, "at least 2"),
        (np.zeros((10, 3)), 11, "more than the 10 images"),
        (np.zeros((10, 3, 3)), 2, "2-D array"),
        (np.zeros(10), 2, "2-D array"),
        (np.full((10, 3), np.nan), 2, "NaN"),
        (np.zeros((10, 3)), 2.5, "integer"),
    ],
)
def test_bad_input_is_a_clear_error(features, k, match):
    with pytest.raises(CryosiftError, match=match):
        bsk_means_pp(features, k)
