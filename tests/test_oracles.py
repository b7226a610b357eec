"""Oracles: the Wiener filters with true spectra, the nearest clean view, the matched filter.

Each oracle is checked against what the maths says it must achieve, so a wrong oracle (or a wrong
metric) cannot pass: the per-image Wiener oracle minimises each image's expected squared error
over all per-ring filters, hence no Gaussian low-pass at any cutoff may beat it; the ensemble
Wiener filter is the MMSE per-ring filter for the stack, so no single low-pass may beat its pooled
error; the matched filter's ROC-AUC for a known template against white noise is Phi(d'/sqrt(2)).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from cryosift.filters.ctf import batch_ctf
from cryosift.io import merged_metadata, open_source, read_star
from cryosift.metrics import psnr
from cryosift.oracles import (
    matched_filter_scores,
    nearest_clean_view,
    ring_power,
    wiener_ensemble,
    wiener_oracle,
)
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file


def gaussian_lowpass(images: np.ndarray, frac: float) -> np.ndarray:
    box = images.shape[-1]
    k = np.sqrt(np.fft.fftfreq(box)[:, None] ** 2 + np.fft.rfftfreq(box)[None, :] ** 2)
    h = np.exp(-np.log(2.0) * (k / (0.5 * frac)) ** 2)
    return np.fft.irfft2(np.fft.rfft2(images) * h, s=(box, box))


@pytest.fixture(scope="module", params=[False, True], ids=["no-ctf", "ctf"])
def dataset(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(
            n_images=300, box=48, pixel_size=4.0, snr=0.05, ctf=request.param, seed=3
        )
        res = simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    noisy = open_source(res.star).images(slice(None)).astype(np.float64)
    clean = open_source(res.clean).images(slice(None)).astype(np.float64)
    meta = merged_metadata(read_star(res.star))
    ctf = (lambda a, b: batch_ctf(meta.iloc[a:b], 48, 4.0).numpy()) if request.param else None
    return noisy, clean, ctf


CUTOFFS = np.geomspace(0.03, 1.0, 30)


def test_wiener_oracle_beats_every_lowpass_cutoff_image_by_image(dataset):
    noisy, clean, _ = dataset
    oracle = wiener_oracle(noisy, clean)
    err = ((oracle - clean) ** 2).mean(axis=(1, 2))
    oracle_psnr = np.mean(psnr(oracle, clean))
    for f in CUTOFFS:  # every fixed cutoff, including the one that is best for the stack
        out = gaussian_lowpass(noisy, f)
        lp_err = ((out - clean) ** 2).mean(axis=(1, 2))
        assert oracle_psnr > np.mean(psnr(out, clean))
        # optimal in expectation for each image: a noise realisation's cross term can tip a
        # near tie, so ask it of most images, not all
        assert (err <= lp_err).mean() > 0.7  # 0.79 at the stack-best cutoff, 1.0 far from it
    assert err.mean() < ((noisy - clean) ** 2).mean()


def test_ensemble_wiener_beats_every_single_lowpass_in_pooled_error(dataset):
    noisy, clean, ctf = dataset
    mse_ensemble = np.mean((wiener_ensemble(noisy, clean, ctf) - clean) ** 2)
    mse_lowpass = min(np.mean((gaussian_lowpass(noisy, f) - clean) ** 2) for f in CUTOFFS)
    mse_oracle = np.mean((wiener_oracle(noisy, clean) - clean) ** 2)
    assert mse_oracle < mse_ensemble < mse_lowpass


def test_wiener_filters_without_noise_are_the_identity(dataset):
    _, clean, ctf = dataset
    for out in (
        wiener_oracle(clean, clean, noise_var=0.0),
        wiener_ensemble(clean, clean, ctf, noise_var=0.0),
    ):
        # h = P / P = 1 wherever the signal has power; elsewhere the clean image has none
        assert np.abs(out - clean).max() < 1e-4 * np.abs(clean).max()


def test_ring_power_of_white_noise_is_flat():
    rng = np.random.default_rng(0)
    sigma, box, n = 2.0, 32, 400
    s, _ = ring_power(rng.normal(0, sigma, (n, box, box)))
    expected = sigma**2 * box * box  # E|DFT|^2 of white noise
    # ring r >= 2 holds >= ~12 coefficients x 400 images: relative sd <= 1/sqrt(4800) ~ 1.5 %
    assert np.allclose(s[2 : box // 2], expected, rtol=0.08)


def test_nearest_clean_view_is_exact_at_high_snr_and_degrades_at_low_snr():
    rng = np.random.default_rng(1)
    k, box, n = 5, 24, 500
    templates = rng.normal(size=(k, box, box))
    views = rng.integers(0, k, n)
    clean = templates[views]
    labels, found = nearest_clean_view(clean + rng.normal(0, 0.1, clean.shape), clean, views)
    assert (labels == views).all()
    np.testing.assert_allclose(found, templates, atol=1e-6)
    # very low SNR: |t_i - t_j| ~ sqrt(2*576) = 34, sigma = 30 -> pairwise error Q(0.57) ~ 0.28
    labels, _ = nearest_clean_view(clean + rng.normal(0, 30.0, clean.shape), clean, views)
    acc = (labels == views).mean()
    assert 1.0 / k + 0.05 < acc < 0.9


def test_matched_filter_auc_matches_theory():
    rng = np.random.default_rng(2)
    box, n, sigma = 16, 4000, 1.0
    t = rng.normal(size=(box, box))
    t *= 2.0 / np.linalg.norm(t)  # d' = |t| / sigma = 2
    is_particle = rng.random(n) < 0.5
    clean = np.where(is_particle[:, None, None], t, 0.0)
    noisy = clean + rng.normal(0, sigma, clean.shape)
    score = matched_filter_scores(noisy, clean, is_particle, sigma**2)
    pos, neg = score[is_particle], score[~is_particle]
    auc = (pos[:, None] > neg[None, :]).mean()
    expected = norm.cdf(2.0 / np.sqrt(2.0))  # 0.921
    # AUC standard error ~ sqrt(AUC(1-AUC)/min(n_pos, n_neg)) ~ 0.006
    assert auc == pytest.approx(expected, abs=0.025)
    # threshold 0 = |t|/(2 sigma): accuracy Phi(d'/2) = 0.841
    acc = ((score > 0) == is_particle).mean()
    assert acc == pytest.approx(norm.cdf(1.0), abs=0.02)


def test_matched_filter_needs_particles():
    with pytest.raises(ValueError):
        matched_filter_scores(np.zeros((3, 4, 4)), np.zeros((3, 4, 4)), np.zeros(3, bool), 1.0)


def test_ensemble_wiener_uses_the_ctf(dataset):
    noisy, clean, ctf = dataset
    if ctf is None:
        pytest.skip("CTF-aware path only")
    blind = wiener_ensemble(noisy, clean, None)
    aware = wiener_ensemble(noisy, clean, ctf)
    assert np.mean((aware - clean) ** 2) < np.mean((blind - clean) ** 2)
