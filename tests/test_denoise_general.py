"""The shipped general model: offline denoising of an unseen protein, with its limits enforced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosift.denoise.general import GENERAL_CONFIGS, GeneralRecipe, random_crops
from cryosift.denoise.model_io import load_model, resolve_model_path
from cryosift.io import open_source, write_mrcs
from cryosift.metrics import psnr
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli


@pytest.fixture(scope="module")
def groel(tmp_path_factory):
    """GroEL is not in the general model's training set: this measures generalisation."""
    out = tmp_path_factory.mktemp("groel")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=64, box=64, pixel_size=3.0, snr=0.1, ctf=True, seed=3)
        simulate(data_file("structures", "1aon.pdb.gz"), out, cfg)
    return out


def test_shipped_model_is_small_safe_and_documents_its_training():
    path = resolve_model_path("general")
    assert path.is_file() and path.stat().st_size < 5_000_000
    payload = torch.load(path, weights_only=True)  # plain tensors and containers only
    meta = payload["meta"]
    assert meta["method"] == "n2n" and meta["name"] == "general"
    lo, hi = meta["pixel_size_range"]
    assert (lo, hi) == GeneralRecipe().pixel_size_range
    structures = {c[0] for c in meta["recipe"]["configs"]}
    assert structures == {c[0] for c in GENERAL_CONFIGS} and "1aon.pdb.gz" not in structures
    model, _ = load_model("general")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_general_model_denoises_an_unseen_protein_through_the_cli(groel, tmp_path, capsys):
    out = tmp_path / "den.star"
    args = ["-q", "denoise", "apply", str(groel / "particles.star"), "--model", "general",
            "-o", str(out)]
    assert run_cli(args) == 0, capsys.readouterr().err
    noisy = open_source(groel / "particles.star").images(slice(None))
    clean = open_source(groel / "clean.mrcs").images(slice(None))
    den = open_source(out)
    assert den.pixel_size == pytest.approx(3.0)
    gain = float(np.mean(psnr(den.images(slice(None)), clean)) - np.mean(psnr(noisy, clean)))
    assert gain > 10.0, gain  # raw ~4 dB at SNR 0.1


def test_general_model_refuses_a_sampling_it_was_not_trained_for(groel, tmp_path, capsys):
    noisy = open_source(groel / "particles.star").images(slice(0, 8))
    write_mrcs(tmp_path / "coarse.mrcs", noisy, pixel_size=12.0)
    out = tmp_path / "x.star"
    code = run_cli(["-q", "denoise", "apply", str(tmp_path / "coarse.mrcs"), "--model",
                    "general", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Å/px" in err and err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".mrcs").exists()


def test_training_crops_keep_pairs_aligned_and_cover_the_whole_box():
    """The general model's data: one crop per image at a random position, the same in both
    noise realisations (else Noise2Noise would learn to blur away the misalignment)."""
    n, box, size = 400, 32, 16
    a = np.arange(n * box * box, dtype=np.float32).reshape(n, box, box)
    ca, cb = random_crops((a, -a), size, np.random.default_rng(0))
    assert ca.shape == (n, size, size) and np.array_equal(cb, -ca)
    starts = (ca[:, 0, 0] - np.arange(n) * box * box).astype(int)  # row * box + col of corner
    rows, cols = starts // box, starts % box
    assert rows.min() == 0 and cols.min() == 0  # every offset 0..16 occurs in 400 draws
    assert rows.max() == box - size and cols.max() == box - size
    assert np.array_equal(np.diff(ca, axis=2), np.ones((n, size, size - 1)))  # contiguous crops


def test_shipped_model_is_conditioned_on_the_stack_snr(groel):
    """The general model takes the stack's SNR as an input plane: told a much lower SNR than
    the stack's it smooths more (less high-frequency power), told a much higher one less, and
    the SNR estimated from the stack itself does better than either wrong value."""
    from cryosift.denoise.apply import denoise_array
    from cryosift.denoise.cwf import estimate_snr

    model, meta = load_model("general")
    assert model.config.conditions == 1 and meta["recipe"]["conditions"] == 1
    noisy = open_source(groel / "particles.star").images(slice(None))
    clean = open_source(groel / "clean.mrcs").images(slice(None))
    assert 0.07 < estimate_snr(noisy) < 0.14  # simulated at 0.1
    outputs = {s: denoise_array(model, noisy, snr=s) for s in (0.005, None, 2.0)}

    def high_power(x):  # power above half Nyquist
        f = np.abs(np.fft.rfft2(x)) ** 2
        k = np.hypot(*np.meshgrid(np.fft.fftfreq(x.shape[-1]), np.fft.rfftfreq(x.shape[-1]),
                                  indexing="ij"))
        return float(f[..., k > 0.25].sum())

    assert high_power(outputs[0.005]) < high_power(outputs[None]) < high_power(outputs[2.0])
    scores = {s: float(np.mean(psnr(out, clean))) for s, out in outputs.items()}
    assert scores[None] > max(scores[0.005], scores[2.0]) + 0.3, scores
