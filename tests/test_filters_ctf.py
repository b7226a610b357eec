"""CTF phase flipping and Wiener filtering (RELION's CTF from the STAR rows)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import torch

from cryosift.errors import CryosiftError
from cryosift.filters import BatchContext, batch_ctf, make_filter
from cryosift.io import merged_metadata, read_star
from cryosift.metrics.image import cc
from shared_data import SHARED_DATA

STRUCTURE = SHARED_DATA / "structures" / "5F9R.pdb"
BOX, PX = 48, 4.0


def _meta(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = rng.uniform(8000, 30000, n)
    return pd.DataFrame({
        "rlnDefocusU": df + 150, "rlnDefocusV": df - 150,
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnVoltage": 300.0,
        "rlnSphericalAberration": 2.7, "rlnAmplitudeContrast": 0.1,
    })


def _smooth_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = np.fft.rfft2(rng.normal(size=(n, BOX, BOX)))
    ky = np.fft.fftfreq(BOX)[:, None]
    kx = np.fft.rfftfreq(BOX)[None, :]
    return np.fft.irfft2(f * np.exp(-(kx**2 + ky**2) / 0.02), s=(BOX, BOX)).astype(np.float32)


def _apply_ctf(images: np.ndarray, ctf: torch.Tensor) -> np.ndarray:
    f = np.fft.rfft2(images.astype(np.float64)) * ctf.numpy().astype(np.float64)
    return np.fft.irfft2(f, s=images.shape[-2:]).astype(np.float32)


def test_phase_flip_twice_is_identity():
    imgs = np.random.default_rng(1).normal(size=(8, BOX, BOX)).astype(np.float32)
    meta = _meta(8)
    ctx = BatchContext(PX, meta)
    flip = make_filter("phaseflip")
    sign = flip.transfer(meta, BOX, PX).numpy()
    assert (batch_ctf(meta, BOX, PX) != 0).all()
    # sign(CTF) is +-1 everywhere except on the Nyquist column of astigmatic CTFs, where the
    # two aliases of one frequency can disagree (averaged to 0 there)
    assert (np.abs(sign[..., :-1]) == 1).all()
    defined = np.abs(sign) == 1
    twice = np.fft.rfft2(flip(flip(imgs, ctx), ctx).astype(np.float64))
    f_in = np.fft.rfft2(imgs.astype(np.float64))
    np.testing.assert_allclose(twice[defined], f_in[defined], atol=1e-3)
    np.testing.assert_allclose(twice[~defined], 0, atol=1e-3)
    isotropic = meta.assign(rlnDefocusV=meta["rlnDefocusU"])  # no astigmatism: all defined
    ctx_iso = BatchContext(PX, isotropic)
    np.testing.assert_allclose(flip(flip(imgs, ctx_iso), ctx_iso), imgs, atol=1e-5)
    once = flip(imgs, ctx)
    assert np.abs(once - imgs).max() > 0.1  # it does change the images
    # sign(CTF(0)) = +1 (RELION: CTF(0) = +Q0-ish), so each image keeps its mean
    np.testing.assert_allclose(once.mean(axis=(1, 2)), imgs.mean(axis=(1, 2)), atol=1e-5)


def test_wiener_with_high_snr_approaches_ctf_inversion():
    clean = _smooth_images(6)
    meta = _meta(6, seed=2)
    ctf = batch_ctf(meta, BOX, PX).numpy().astype(np.float64)
    modulated = _apply_ctf(clean, torch.from_numpy(ctf))
    f_clean = np.fft.rfft2(clean.astype(np.float64))
    strong = np.abs(ctf) > 0.2  # away from the zeros, where inversion is stable
    errors = []
    for snr in (10.0, 1e3, 1e6):
        out = make_filter("wiener", snr=snr)(modulated, BatchContext(PX, meta))
        f_out = np.fft.rfft2(out.astype(np.float64))
        rel = np.abs(f_out - f_clean)[strong] / np.abs(f_clean).max()
        errors.append(rel.max())
        # exact relation: F_out = CTF^2 / (CTF^2 + 1/snr) F_clean
        gain = ctf**2 / (ctf**2 + 1.0 / snr)
        inner = np.s_[..., :-1]  # the Nyquist column holds averaged aliases (hermitian_nyquist)
        np.testing.assert_allclose(f_out[inner], (gain * f_clean)[inner],
                                   atol=1e-4 * np.abs(f_clean).max())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-4


def test_wiener_and_phaseflip_refuse_missing_ctf():
    imgs = np.zeros((2, BOX, BOX), np.float32)
    for name, params in (("phaseflip", {}), ("wiener", {"snr": 1.0})):
        f = make_filter(name, **params)
        assert f.needs_ctf
        with pytest.raises(CryosiftError, match="bare stack"):
            f(imgs, BatchContext(PX, None))
        with pytest.raises(CryosiftError, match="rlnDefocusU"):
            f(imgs, BatchContext(PX, _meta(2).drop(columns=["rlnDefocusU"])))
        with pytest.raises(CryosiftError, match="pixel size"):
            f(imgs, BatchContext(None, _meta(2)))
    with pytest.raises(CryosiftError, match="positive"):
        make_filter("wiener", snr=0)
    bad = _meta(2)
    bad.loc[1, "rlnDefocusV"] = np.nan
    with pytest.raises(CryosiftError, match="rlnDefocusV.*row 2"):
        make_filter("phaseflip")(imgs, BatchContext(PX, bad))


def test_mixed_optics_groups_use_their_own_constants():
    meta = _meta(4)
    meta.loc[2:, "rlnVoltage"] = 200.0
    both = batch_ctf(meta, BOX, PX)
    np.testing.assert_array_equal(both[:2], batch_ctf(meta.iloc[:2], BOX, PX))
    np.testing.assert_array_equal(both[2:], batch_ctf(meta.iloc[2:].reset_index(drop=True),
                                                      BOX, PX))
    assert not torch.allclose(batch_ctf(meta.assign(rlnVoltage=300.0), BOX, PX)[2:], both[2:])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(CTF-modulated clean images, CTF-free clean images, merged STAR rows) of SpCas9."""
    if not STRUCTURE.is_file():
        pytest.skip(f"shared structure not found: {STRUCTURE}")
    from cryosift.simulate import SimulationConfig, simulate

    out = {}
    for ctf in (True, False):
        folder = tmp_path_factory.mktemp(f"sim_ctf_{ctf}")
        cfg = SimulationConfig(n_images=12, box=BOX, pixel_size=PX, snr=1.0, ctf=ctf, seed=5,
                               defocus_range=(1.0, 3.0))
        res = simulate(STRUCTURE, folder, cfg)
        out[ctf] = (mrcfile.read(res.clean).astype(np.float32), read_star(res.star))
    with_ctf, table = out[True]
    without_ctf, table_no = out[False]
    angles = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    # same seed, same views: the two stacks differ only by the CTF
    np.testing.assert_array_equal(table.particles[angles], table_no.particles[angles])
    return with_ctf, without_ctf, merged_metadata(table)


def test_phase_flip_restores_correlation_with_ctf_free_projection(simulated):
    with_ctf, truth, meta = simulated
    flipped = make_filter("phaseflip")(with_ctf, BatchContext(PX, meta))
    before, after = cc(with_ctf, truth), cc(flipped, truth)
    assert (after > before).all(), (before, after)
    assert after.mean() > before.mean() + 0.05, (before.mean(), after.mean())
    # on noise-free images a Wiener filter with a high SNR inverts the CTF: the simulator's CTF
    # (grid, sign, astigmatism angle) and ours agree, so the CTF-free image comes back almost
    # exactly (what is lost sits at the CTF zeros, where the gain CTF²/(CTF² + 1/snr) dips)
    wiener = make_filter("wiener", snr=1000.0)(with_ctf, BatchContext(PX, meta))
    assert (cc(wiener, truth) > 0.99).all(), cc(wiener, truth)
