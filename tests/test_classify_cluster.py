"""Clustering features and algorithms: k-means++ / Ward on pixels, PCA and rotation invariants.

Well-separated views at moderate SNR must be recovered almost perfectly; the rotation-invariant
features must not change when an image turns; bad feature matrices and K are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosift.classify.align2d import rotate
from cryosift.classify.cluster import (
    check_features,
    check_k,
    class_averages,
    kmeans_pp,
    order_by_size,
    ward,
)
from cryosift.classify.features import (
    compute_features,
    fourier_crop,
    raw_features,
    rotinv_features,
)
from cryosift.errors import CryosiftError, InputError
from cryosift.io import open_source, read_star
from cryosift.metrics import clustering_accuracy
from cryosift.registry import ClusterTask, get
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file


def _sim(out, **kw):
    cfg = dict(n_images=240, box=40, pixel_size=4.8, snr=0.1, views=4, seed=5)
    cfg.update(kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        res = simulate(data_file("structures", "5F9R.pdb"), out, SimulationConfig(**cfg))
    images = open_source(res.star).images(slice(None))
    views = read_star(res.star).particles["cryosiftTrueView"].to_numpy()
    return images, views


@pytest.fixture(scope="module")
def fixed_views(tmp_path_factory):
    """4 views, no in-plane rotation, SNR 0.1 (the seed-004 setting, small)."""
    torch.set_num_threads(1)
    return _sim(tmp_path_factory.mktemp("fixed"), in_plane=False)


@pytest.mark.parametrize("name", ["kmeans_raw", "pca+kmeans", "pca+hc", "hc_raw", "pca+bsk"])
def test_registered_clusterers_recover_well_separated_views(fixed_views, name):
    images, views = fixed_views
    fn = get("clusterer", name).build()
    res = fn(ClusterTask(images, 4, 4.8, seed=0))
    assert res.labels.shape == views.shape
    assert set(np.unique(res.labels)) <= set(range(4))
    assert clustering_accuracy(views, res.labels) > 0.95
    assert res.averages.shape == (4, 40, 40)


def test_class_averages_are_member_means_and_size_order():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 8, 8)).astype(np.float32)
    labels = rng.integers(0, 3, 30)
    avg = class_averages(images, labels, 4)
    for j in range(3):
        np.testing.assert_allclose(avg[j], images[labels == j].mean(0), atol=1e-5)
    assert not avg[3].any()  # empty class
    new, order = order_by_size(labels, 4)
    sizes = np.bincount(new, minlength=4)
    assert list(sizes) == sorted(sizes, reverse=True)
    np.testing.assert_array_equal(order[new], labels)


def test_fourier_crop_keeps_centre_and_scale():
    img = np.zeros((1, 32, 32), np.float32)
    img[0, 16, 16] = 1.0
    small = fourier_crop(img, 16).numpy()[0]
    assert np.unravel_index(np.argmax(small), small.shape) == (8, 8)
    const = fourier_crop(np.full((1, 32, 32), 3.0, np.float32), 16).numpy()
    np.testing.assert_allclose(const, 3.0, atol=1e-5)


def test_rotation_invariant_features_do_not_change_with_rotation(fixed_views):
    images, _ = fixed_views
    x = images[:40]
    turned = rotate(torch.as_tensor(x), torch.full((40,), 37.0)).numpy()
    # a quarter turn about pixel box//2 (np.rot90 turns about (box-1)/2: roll back one row)
    quarter = np.roll(np.rot90(x, 1, axes=(1, 2)), 1, axis=1).copy()
    f = rotinv_features(np.concatenate([x, turned, quarter]), n_components=None)
    a, b, c = f[:40], f[40:80], f[80:]
    spread = np.linalg.norm(a - a.mean(0), axis=1).mean()
    assert np.linalg.norm(a - c, axis=1).mean() < 0.05 * spread  # exact grid symmetry
    assert np.linalg.norm(a - b, axis=1).mean() < 0.5 * spread  # interpolation only
    # raw pixels, by contrast, change completely
    r = raw_features(np.concatenate([x, quarter]))
    assert np.linalg.norm(r[:40] - r[40:], axis=1).mean() > np.linalg.norm(
        r[:40] - r[:40].mean(0), axis=1).mean()


def test_bad_features_and_k_are_refused():
    with pytest.raises(InputError, match="at least 2"):
        check_k(1, 10)
    with pytest.raises(InputError, match="larger than the number of images"):
        check_k(11, 10)
    with pytest.raises(InputError, match="2-D"):
        check_features(np.zeros((10,)), 2)
    with pytest.raises(InputError, match="rows"):
        check_features(np.zeros((9, 3)), 2, n=10)
    with pytest.raises(InputError, match="finite"):
        check_features(np.full((10, 3), np.nan), 2)
    with pytest.raises(InputError, match="larger"):
        kmeans_pp(np.zeros((3, 2)), 4)
    with pytest.raises(InputError, match="larger"):
        ward(np.zeros((3, 2)), 4)
    with pytest.raises(CryosiftError, match="unknown features"):
        compute_features(np.zeros((4, 8, 8), np.float32), "nonsense")
