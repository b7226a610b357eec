"""SURE (Stein's unbiased risk estimate) of a denoiser and the SURE-fitted output stage."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cryosift.denoise.sure import (
    RING_WIDTH,
    WHITE_TOLERANCE,
    SureBlend,
    fit_sure_blend,
    noise_colour,
)
from cryosift.errors import CryosiftError
from cryosift.io import open_source
from cryosift.metrics import psnr
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli

SIGMA = 0.5  # white noise of the synthetic stacks


def blobs(n: int = 256, box: int = 32, seed: int = 0) -> np.ndarray:
    """Clean images: three Gaussian blobs each, of random place, width and sign."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box].astype(np.float64)
    out = np.zeros((n, box, box))
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.uniform(8, box - 8, 2)
            w = rng.uniform(1.5, 4.0)
            out[i] += rng.choice([-1.0, 1.0]) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)
                                                        / (2 * w * w))
    return out.astype(np.float32)


def noisy_pair(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    clean = blobs(seed=seed)
    rng = np.random.default_rng(seed + 100)
    return clean, (clean + SIGMA * rng.standard_normal(clean.shape)).astype(np.float32)


def gaussian_blur(images: np.ndarray, sigma_px: float) -> np.ndarray:
    box = images.shape[-1]
    f = np.fft.fftfreq(box)
    h = np.exp(-2 * (np.pi * sigma_px) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    return np.real(np.fft.ifft2(np.fft.fft2(images) * h)).astype(np.float32)


def soft_threshold_blur(images: np.ndarray) -> np.ndarray:
    """A nonlinear denoiser: blur, then shrink small values to 0 (divergence data-dependent)."""
    b = gaussian_blur(images, 1.0)
    return (np.sign(b) * np.maximum(np.abs(b) - 0.15, 0.0)).astype(np.float32)


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def test_sure_estimates_a_nonlinear_denoisers_error_without_the_clean_images():
    clean, noisy = noisy_pair()
    blend = fit_sure_blend(soft_threshold_blur, noisy, noise_var=SIGMA**2)
    true = mse(soft_threshold_blur(noisy), clean)
    # SURE's own spread here is ~sigma^2 sqrt(2 / 262,144 pixels) = 7e-4; the probe's is smaller
    assert blend.mse_network == pytest.approx(true, abs=4e-3), (blend.mse_network, true)
    assert blend.mse_blend == pytest.approx(mse(blend.apply(noisy, soft_threshold_blur(noisy)),
                                                clean), abs=4e-3)


def test_blend_repairs_an_oversmoothing_denoiser():
    clean, noisy = noisy_pair()
    heavy = gaussian_blur(noisy, 3.0)  # far too smooth: loses the narrow blobs
    blend = fit_sure_blend(lambda y: gaussian_blur(y, 3.0), noisy, noise_var=SIGMA**2)
    out = blend.apply(noisy, heavy)
    wiener = fit_sure_blend(np.zeros_like, noisy, noise_var=SIGMA**2)  # no network at all
    assert mse(out, clean) < 0.7 * mse(heavy, clean)
    assert mse(out, clean) <= 1.02 * mse(wiener.apply(noisy, np.zeros_like(noisy)), clean)
    assert np.isfinite(blend.band_width) and blend.mse_blend < blend.mse_network


def test_a_denoiser_no_blend_can_improve_is_kept_as_it_is():
    clean, noisy = noisy_pair()

    def perfect(y: np.ndarray) -> np.ndarray:  # the clean image of each (probed) noisy one
        return _lookup(y, noisy, clean)

    blend = fit_sure_blend(perfect, noisy, noise_var=SIGMA**2)
    assert blend.band_width == np.inf and blend.a == (1.0,) and blend.c == (0.0,)
    np.testing.assert_array_equal(blend.apply(noisy, clean), clean)
    assert "network alone kept" in blend.summary()


def _lookup(y: np.ndarray, noisy: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The clean images of a chunk of ``noisy`` (or of it plus a small probe)."""
    out = np.empty_like(y)
    for i, img in enumerate(y):
        j = int(np.argmin(np.abs(noisy - img).reshape(len(noisy), -1).max(1)))
        out[i] = clean[j]
    return out


@pytest.mark.parametrize("box", [32, 33])
def test_blend_weights_cover_every_frequency(box):
    rng = np.random.default_rng(1)
    y = rng.standard_normal((4, box, box)).astype(np.float32)
    f = rng.standard_normal((4, box, box)).astype(np.float32)
    n_bands = int(np.ceil(np.sqrt(2) * box / 2 / RING_WIDTH)) + 2
    common = {"box": box, "band_width": RING_WIDTH, "noise_var": 1.0, "images": 4,
              "mse_network": 0.0, "mse_linear": 0.0, "mse_blend": 0.0}
    net = SureBlend(a=(1.0,) * n_bands, c=(0.0,) * n_bands, **common)
    raw = SureBlend(a=(0.0,) * n_bands, c=(1.0,) * n_bands, **common)
    np.testing.assert_allclose(net.apply(y, f), f, atol=1e-5)
    np.testing.assert_allclose(raw.apply(y, f), y, atol=1e-5)
    half = SureBlend(a=(0.5,) * n_bands, c=(0.5,) * n_bands, **common)
    np.testing.assert_allclose(half.apply(y, f), 0.5 * (y + f), atol=1e-5)
    with pytest.raises(CryosiftError, match="fitted on"):
        net.apply(y[:, :-1, :-1], f[:, :-1, :-1])


def test_fit_refuses_images_without_noise():
    clean = blobs(n=16)
    with pytest.raises(CryosiftError, match="noise variance"):
        fit_sure_blend(lambda y: y, clean, noise_var=0.0)
    with pytest.raises(CryosiftError, match="at least 2"):
        fit_sure_blend(lambda y: y, clean[:1], noise_var=1.0)


@pytest.fixture(scope="module")
def groel_low_snr(tmp_path_factory):
    """GroEL at SNR 0.01, which the general model (never trained on GroEL) under-smooths."""
    out = tmp_path_factory.mktemp("groel001")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=200, box=64, pixel_size=3.0, snr=0.01, seed=5)
        simulate(data_file("structures", "1aon.pdb.gz"), out, cfg)
    return out


def test_denoise_apply_sure_beats_the_general_model_alone(groel_low_snr, tmp_path, capsys):
    """The stage is on by default on white noise (what --sure forces) and off with --no-sure."""
    clean = open_source(groel_low_snr / "clean.mrcs").images(slice(None))
    scores = {}
    for name, extra in (("plain", ["--no-sure"]), ("default", []), ("sure", ["--sure"])):
        out = tmp_path / f"{name}.star"
        code = run_cli(["-q", "denoise", "apply", str(groel_low_snr / "particles.star"),
                        "--model", "general", "-o", str(out), "--device", "cpu", *extra])
        assert code == 0, capsys.readouterr().err
        scores[name] = float(np.mean(psnr(open_source(out).images(slice(None)), clean)))
    assert scores["sure"] > scores["plain"] + 0.15, scores  # measured +0.30 dB
    assert scores["default"] == scores["sure"], scores
    record = json.loads((tmp_path / "sure_filter.json").read_text())
    text = json.dumps(record)
    assert '"sure_blend"' in text and '"mse_blend"' in text
    assert '"sure_blend"' in (tmp_path / "default_filter.json").read_text()
    assert '"sure_blend"' not in (tmp_path / "plain_filter.json").read_text()


def _coloured(images: np.ndarray) -> np.ndarray:
    """Images filtered by sinc(f): the noise power spectrum of a counting detector."""
    f = np.fft.fftfreq(images.shape[-1])
    mtf = np.sinc(np.hypot(f[:, None], f[None, :]))
    return np.fft.ifft2(np.fft.fft2(images) * mtf).real.astype(np.float32)


def test_noise_colour_tells_white_from_detector_noise():
    noise = np.random.default_rng(3).standard_normal((300, 48, 48)).astype(np.float32)
    assert abs(noise_colour(noise)) < 0.02  # sampling error ~3e-3 here
    assert abs(noise_colour(5.0 * noise + 2.0)) < 0.02  # scale and offset do not matter
    assert noise_colour(_coloured(noise)) < -2 * WHITE_TOLERANCE  # measured -0.24


def test_default_stage_is_skipped_on_coloured_noise(tmp_path, capsys):
    """With noise coloured like a detector's, the default leaves the network's output alone
    and says why; --sure still fits the stage."""
    from cryosift.io.mrc import write_mrcs

    rng = np.random.default_rng(4)
    stack = _coloured(rng.standard_normal((64, 64, 64)).astype(np.float32) * 3.0)
    path = tmp_path / "coloured.mrcs"
    write_mrcs(path, stack, pixel_size=3.0)
    for name, extra in (("default", []), ("forced", ["--sure"])):
        code = run_cli(["denoise", "apply", str(path), "--model", "general", "--snr", "0.05",
                        "-o", str(tmp_path / f"{name}.star"), "--device", "cpu", *extra])
        assert code == 0
    err = capsys.readouterr().err
    assert "SURE output stage skipped: the noise is not white" in err
    assert '"sure_blend"' not in (tmp_path / "default_filter.json").read_text()
    assert '"sure_blend"' in (tmp_path / "forced_filter.json").read_text()


def test_default_stage_needs_enough_images_and_a_valid_choice():
    from cryosift.denoise.apply import SURE_MIN_IMAGES, denoise_array
    from cryosift.denoise.model_io import load_model

    model, _ = load_model("general", "cpu")
    few = np.random.default_rng(5).standard_normal((SURE_MIN_IMAGES - 1, 32, 32))
    plain = denoise_array(model, few, snr=0.1, sure=False)
    np.testing.assert_array_equal(denoise_array(model, few, snr=0.1, sure="auto"), plain)
    with pytest.raises(CryosiftError, match="sure must be"):
        denoise_array(model, few, snr=0.1, sure="yes")
