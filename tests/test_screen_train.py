"""Screeners learn on tiny simulated SpCas9 (5F9R) particles vs noise images: the RBM and the CNN
beat chance by far, probabilities are calibrated, saved models score identically."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosift.errors import InputError
from cryosift.io import open_source, read_star
from cryosift.metrics import screening_metrics
from cryosift.screen import PreprocessConfig, train_screener
from cryosift.screen.cnn import CNNConfig
from cryosift.screen.model_io import load_screener, save_screener
from cryosift.screen.rbm import RBMConfig
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file

BOX, PX, SNR = 32, 6.0, 0.05
RBM_FAST = RBMConfig(epochs=15, n_hidden=64)
CNN_FAST = CNNConfig(epochs=8)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks gain nothing from threads, and oversubscribed CPUs lose a lot to them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def simulate_screening_set(folder, n, seed, snr=SNR, box=BOX):
    """Half SpCas9 particles, half pure-noise images (B3's setting, tiny)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=n, box=box, pixel_size=PX, snr=snr, ctf=False,
                               junk_fraction=0.5, junk_types=("noise",), seed=seed)
        simulate(data_file("structures", "5F9R.pdb"), folder, cfg)
    star = folder / "particles.star"
    labels = read_star(star).particles["cryosiftIsParticle"].to_numpy().astype(int)
    return open_source(star).images(slice(None)), labels


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    train = simulate_screening_set(tmp_path_factory.mktemp("train"), 400, seed=1)
    test = simulate_screening_set(tmp_path_factory.mktemp("test"), 300, seed=2)
    return train, test


@pytest.fixture(scope="module")
def rbm(sets):
    (x, y), _ = sets
    return train_screener(x, y, "rbm", RBM_FAST, PreprocessConfig(), pixel_size=PX)


def _ece(p, y, bins=5):
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return sum(abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).mean()
               for b in range(bins) if (idx == b).any())


def test_rbm_separates_particles_from_noise(sets, rbm):
    _, (xt, yt) = sets
    p = rbm.predict_proba(xt)
    m = screening_metrics(yt, p)
    assert m["accuracy"] > 0.9 and m["roc_auc"] > 0.97  # chance is 0.5
    assert rbm.info["val_accuracy"] > 0.85 and rbm.info["n_val"] > 0
    assert _ece(p, yt) < 0.1
    assert rbm.preprocess.chain and rbm.box == BOX and rbm.pixel_size == PX


def test_preprocessing_switch_changes_what_the_rbm_sees(sets, rbm):
    (x, y), (xt, yt) = sets
    raw = train_screener(x, y, "rbm", RBM_FAST, PreprocessConfig(chain=False), pixel_size=PX)
    assert not raw.preprocess.chain
    assert not np.allclose(raw.prepare(xt[:4]), rbm.prepare(xt[:4]))
    m = screening_metrics(yt, raw.predict_proba(xt))
    assert m["accuracy"] > 0.75  # easy at this SNR even without the chain


def test_generative_and_persistent_cd_also_learn(sets):
    (x, y), (xt, yt) = sets
    cfg = RBMConfig(epochs=10, n_hidden=64, mode="generative", persistent=True, cd_k=2)
    s = train_screener(x, y, "rbm", cfg, PreprocessConfig(), pixel_size=PX)
    assert screening_metrics(yt, s.predict_proba(xt))["roc_auc"] > 0.8


def test_cnn_beats_chance_with_calibrated_probabilities(sets):
    (x, y), (xt, yt) = sets
    # imbalance: 3 particles for every junk image, as in the seed's real training set
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    keep = np.sort(np.concatenate([pos, neg[: len(pos) // 3]]))
    s = train_screener(x[keep], y[keep], "cnn", CNN_FAST, PreprocessConfig(chain=False),
                       pixel_size=PX)
    p = s.predict_proba(xt)
    assert p.min() >= 0.0 and p.max() <= 1.0
    m = screening_metrics(yt, p)
    assert m["accuracy"] > 0.85 and m["roc_auc"] > 0.95
    assert m["recall"] > 0.8 and m["tn"] / m["n_neg"] > 0.8  # imbalance did not bias it
    assert _ece(p, yt) < 0.12


@pytest.mark.parametrize("method", ["rbm", "cnn"])
def test_save_load_round_trip_scores_identically(sets, rbm, tmp_path, method):
    (x, y), (xt, _) = sets
    s = rbm if method == "rbm" else train_screener(x, y, "cnn", CNNConfig(epochs=2),
                                                   pixel_size=PX)
    save_screener(tmp_path / "m", s)
    back = load_screener(tmp_path / "m")
    assert back.method == method and back.box == BOX and back.calibration == s.calibration
    np.testing.assert_array_equal(back.predict_proba(xt), s.predict_proba(xt))
    with pytest.raises(InputError, match="trained on 32 px"):
        back.check_images(48, PX)
    with pytest.raises(InputError, match="Å/px"):
        back.check_images(BOX, 3 * PX)
