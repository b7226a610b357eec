"""Particle screening, the parts: preprocessing, the RBM's free energy, calibration, selection,
training-set loaders. No simulation; fast."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch

from cryosift.errors import CryosiftError, InputError
from cryosift.io import image_names, make_optics_table, write_mrcs, write_star
from cryosift.screen.apply import check_selection, select
from cryosift.screen.calibration import apply_platt, balanced_weights, fit_platt
from cryosift.screen.data import (
    from_good_classes,
    from_label_column,
    from_two_sources,
    load_training_set,
    parse_classes,
)
from cryosift.screen.preprocess import PreprocessConfig, fourier_crop_images, preprocess
from cryosift.screen.rbm import ClassificationRBM
from cryosift.screen.screener import check_labels, stratified_split


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks gain nothing from threads, and oversubscribed CPUs lose a lot to them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fourier_crop_keeps_low_frequencies_and_the_mean():
    n, m = 64, 32
    yy, xx = np.mgrid[:n, :n]
    img = (3.0 + np.cos(2 * np.pi * 3 * xx / n) + np.sin(2 * np.pi * 2 * yy / n))[None]
    out = fourier_crop_images(img.astype(np.float32), m)
    ys, xs = np.mgrid[:m, :m]
    want = 3.0 + np.cos(2 * np.pi * 3 * xs / m) + np.sin(2 * np.pi * 2 * ys / m)
    np.testing.assert_allclose(out[0], want, atol=1e-4)
    assert fourier_crop_images(img.astype(np.float32), 64).shape == (1, 64, 64)


def test_preprocess_chain_switch_and_standardisation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 40, 40)).astype(np.float32)
    x[:, 15:25, 15:25] += 2.0
    on = preprocess(x, PreprocessConfig(chain=True, work_box=64))  # no resampling at 40 px
    off = preprocess(x, PreprocessConfig(chain=False))
    assert on.shape == off.shape == (4, 40, 40)
    assert preprocess(x, PreprocessConfig()).shape == (4, 32, 32)  # the chain's 32 px box
    for out in (on, off):
        np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-5)
        np.testing.assert_allclose(out.std(axis=(1, 2)), 1, atol=1e-4)
    # without the chain: only standardisation; with it the bilateral filter has smoothed
    ref = (x - x.mean(axis=(1, 2), keepdims=True)) / x.std(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(off, ref, atol=1e-5)
    from cryosift.filters import FilterChain, make_filter
    from cryosift.screen.preprocess import standardise

    chain = FilterChain([make_filter("bilateral"), make_filter("histeq")])
    np.testing.assert_allclose(on, standardise(chain(x)), atol=1e-5)  # the seed's chain
    assert np.abs(on - off).mean() > 0.1
    small = preprocess(rng.normal(size=(2, 128, 128)), PreprocessConfig(work_box=64))
    assert small.shape == (2, 64, 64)
    assert preprocess(np.zeros((0, 32, 32)), PreprocessConfig()).shape == (0, 32, 32)


def test_rbm_free_energy_and_label_posterior_match_brute_force():
    torch.manual_seed(0)
    rbm = ClassificationRBM(n_visible=5, n_hidden=4).double()
    with torch.no_grad():
        for p in rbm.parameters():
            p.normal_(0, 0.7)
    v = torch.randn(3, 5, dtype=torch.float64)
    hs = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4)), dtype=torch.float64)
    for label in (0, 1):
        y = torch.zeros(3, 2, dtype=torch.float64)
        y[:, label] = 1
        # F(v, y) = -log sum_h exp(-E(v, y, h))
        energy = (0.5 * ((v - rbm.b) ** 2).sum(1)[:, None] - (y @ rbm.d)[:, None]
                  - hs @ rbm.c - (hs @ (rbm.W @ v.T + rbm.U @ y.T)).T)
        brute = -torch.logsumexp(-energy, dim=1)
        torch.testing.assert_close(rbm.free_energy(v, y), brute)
    fe = rbm.label_free_energies(v)
    full = torch.stack([rbm.free_energy(v, torch.eye(2, dtype=v.dtype)[[c] * 3])
                        for c in (0, 1)], 1)
    torch.testing.assert_close(fe - fe[:, :1], full - full[:, :1])  # same up to a v term
    torch.testing.assert_close(rbm.particle_logit(v), full[:, 0] - full[:, 1])
    vs, ys = rbm.gibbs(v, torch.eye(2, dtype=v.dtype)[[0, 1, 1]], k=2)
    assert vs.shape == v.shape and torch.all(ys.sum(1) == 1)


def test_platt_recovers_a_known_calibration():
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3, size=20000)
    p = 1 / (1 + np.exp(-(0.5 * z - 0.8)))
    y = (rng.random(z.size) < p).astype(int)
    # the fit is class-balanced: compare with the balanced target
    cal = fit_platt(z, y)
    q = apply_platt(z, cal)
    assert 0.0 <= q.min() and q.max() <= 1.0
    assert cal["a"] == pytest.approx(0.5, rel=0.1)
    t = fit_platt(z, y, temperature_only=True)
    assert t["b"] == 0.0 and t["a"] > 0
    w = balanced_weights(np.array([1, 1, 1, 0]))
    assert w[:3].sum() == pytest.approx(w[3])


def test_select_by_threshold_and_keep_fraction():
    s = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    kept, t = select(s, None, None)
    assert t == 0.5 and kept.tolist() == [True, False, True, True, False]
    kept, t = select(s, 0.8, None)
    assert kept.tolist() == [True, False, False, False, False]
    kept, t = select(s, None, 0.4)
    assert kept.sum() == 2 and kept[0] and kept[3] and t == 0.7
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(CryosiftError, match="threshold"):
            check_selection(bad, None)
    for bad in (0.0, 1.2):
        with pytest.raises(CryosiftError, match="keep-fraction"):
            check_selection(None, bad)
    with pytest.raises(CryosiftError, match="not both"):
        check_selection(0.5, 0.5)


def test_labels_and_split():
    with pytest.raises(InputError, match="only one class"):
        check_labels(np.ones(10, int))
    with pytest.raises(InputError, match="0 .junk. or 1"):
        check_labels(np.array([0, 1, 2]))
    y = np.array([1] * 40 + [0] * 60)
    tr, va = stratified_split(y, 0.25, 0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == 100
    assert y[va].sum() == 10 and (1 - y[va]).sum() == 15
    tr, va = stratified_split(np.array([1, 1, 0, 0]), 0.25, 0)  # too small: no split
    assert len(va) == 0 and len(tr) == 4


def _star(folder, name, images, **cols):
    write_mrcs(folder / f"{name}.mrcs", images.astype(np.float32), 4.0)
    parts = pd.DataFrame({"rlnImageName": image_names(len(images), f"{name}.mrcs"), **cols})
    write_star(folder / f"{name}.star", parts, make_optics_table(4.0, images.shape[-1]))
    return folder / f"{name}.star"


def test_training_set_loaders(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(12, 16, 16))
    pos = _star(tmp_path, "pos", imgs[:5])
    neg = _star(tmp_path, "neg", imgs[5:])
    ts = from_two_sources(pos, neg)
    assert ts.counts == {"particles": 5, "junk": 7} and ts.pixel_size == 4.0
    np.testing.assert_allclose(ts.images[:5], imgs[:5], atol=1e-6)
    assert from_two_sources(pos, neg, max_per_class=3).counts == {"particles": 3, "junk": 3}
    lab = _star(tmp_path, "lab", imgs, cryosiftIsParticle=[1, 0] * 6,
                rlnClassNumber=[1, 2, 3, 4] * 3)
    ts = from_label_column(lab)
    assert ts.counts == {"particles": 6, "junk": 6}
    np.testing.assert_allclose(ts.images[ts.labels == 1], imgs[::2], atol=1e-6)
    ts = from_good_classes(lab, "1,3")
    assert ts.counts == {"particles": 6, "junk": 6}
    ts = from_good_classes(lab, "1", bad="2")
    assert ts.counts == {"particles": 3, "junk": 3}
    assert parse_classes("7, 1,4") == [1, 4, 7]
    with pytest.raises(InputError, match="do not occur"):
        from_good_classes(lab, "9")
    with pytest.raises(InputError, match="only one class"):
        from_good_classes(lab, "1,2,3,4")
    with pytest.raises(InputError, match="both as good and as bad"):
        from_good_classes(lab, "1", bad="1")
    with pytest.raises(InputError, match="no _myLabel column"):
        from_label_column(lab, "myLabel")
    with pytest.raises(InputError, match="only one class"):
        from_label_column(_star(tmp_path, "ones", imgs[:4], cryosiftIsParticle=[1] * 4))
    bad = _star(tmp_path, "bad", imgs[:4], cryosiftIsParticle=[1, 0, 2, 1])
    with pytest.raises(InputError, match="must hold 0 or 1"):
        from_label_column(bad)
    other_box = _star(tmp_path, "big", rng.normal(size=(3, 20, 20)))
    with pytest.raises(InputError, match="same box size"):
        from_two_sources(pos, other_box)
    with pytest.raises(InputError, match="exactly one training set"):
        load_training_set(positives=pos, negatives=neg, labels_star=lab)
    with pytest.raises(InputError, match="go together"):
        load_training_set(positives=pos)


def test_screener_model_files_get_the_zip_bomb_check(tmp_path):
    """Screener files go through the same reader as denoisers: a deflated entry (torch never
    compresses) is refused from the zip directory, before anything is inflated."""
    import zipfile

    from cryosift.screen.model_io import load_screener

    folder = tmp_path / "bomb"
    folder.mkdir()
    with zipfile.ZipFile(folder / "model.pt", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        zf.writestr("archive/data/0", bytes(32 << 20))  # 32 MB of zeros, ~32 kB on disk
    assert (folder / "model.pt").stat().st_size < 1 << 20
    with pytest.raises(InputError, match="compressed"):
        load_screener(folder)
