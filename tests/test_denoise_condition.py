"""SNR-conditioned U-Nets (the general model) and fine-tuning a saved model on a stack:
the stack SNR estimate, the condition plane, training with per-image SNRs, --init, --snr."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cryosift.denoise.apply import denoise_array
from cryosift.denoise.cwf import estimate_snr
from cryosift.denoise.model_io import load_model
from cryosift.denoise.networks import UNet, UNetConfig, build_network, snr_condition
from cryosift.denoise.training import TrainConfig, train_denoiser
from cryosift.errors import CryosiftError
from cryosift.io import open_source
from cryosift.metrics import psnr
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(epochs=3, batch_size=16, crop=32, depth=3, width=4, patience=10)


def _simulate(out, snr, seed, n=200, box=48):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=n, box=box, pixel_size=4.0, snr=snr, ctf=True,
                               pairs=True, seed=seed)
        simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    return [open_source(out / f).images(slice(None))
            for f in ("particles.mrcs", "particles_b.mrcs", "clean.mrcs")]


@pytest.fixture(scope="module")
def two_snrs(tmp_path_factory):
    """The same protein at SNR 0.03 and 1: stacks a conditioned model must treat differently."""
    root = tmp_path_factory.mktemp("cond")
    return {snr: _simulate(root / str(snr), snr, seed) for snr, seed in ((0.03, 4), (1.0, 5))}


def test_stack_snr_estimate_matches_the_simulated_snr(two_snrs):
    for snr, (a, _, _) in two_snrs.items():
        # 200 images of 48 px: ~96k corner pixels, 72 % of their spectrum above 0.3 cycles/px,
        # so the noise variance is known to sqrt(2 / 69k) = 0.54 % (1 sd) and the SNR to
        # 0.0054 (1 + SNR): 3 sd allowed, plus 2 % for the CTF fringes reaching the corners.
        # The estimate is invariant to the stack's scale and offset.
        est = estimate_snr(a)
        assert abs(est - snr) < 3 * 0.0054 * (1 + snr) + 0.02 * snr, (snr, est)
        assert estimate_snr(3.0 * a + 7.0) == pytest.approx(est, rel=1e-4)
    with pytest.raises(CryosiftError, match="empty"):
        estimate_snr(np.zeros((0, 32, 32), np.float32))


def test_conditioned_unet_needs_and_uses_its_condition():
    torch.manual_seed(0)
    net = UNet(UNetConfig(depth=3, width=4, conditions=1)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        low, high = net(x, snr_condition(0.01)), net(x, snr_condition(0.5))
        per_image = net(x, torch.tensor([[snr_condition(0.01)], [snr_condition(0.5)]]))
        with pytest.raises(ValueError, match="conditioned"):
            net(x)
    assert (low - high).abs().max() > 1e-4
    torch.testing.assert_close(per_image[0], low[0])
    torch.testing.assert_close(per_image[1], high[1])
    assert snr_condition(0.01) == pytest.approx(-(2 - 1.15) / 0.85)  # SNR 0.01..0.5 -> ~-1..1
    # models saved before conditioning existed have no "conditions" key: plain U-Nets
    assert build_network({"kind": "unet", "depth": 3, "width": 4}).config.conditions == 0


def test_conditioned_training_learns_to_blur_low_snr_stacks_more(two_snrs, tmp_path):
    """One model trained on a mixture of SNR 0.03 and SNR 1 images, each with its SNR: on the
    low-SNR stack, the right condition must beat the wrong one (the model would otherwise
    apply one compromise to both)."""
    (a_lo, b_lo, clean_lo), (a_hi, b_hi, clean_hi) = two_snrs[0.03], two_snrs[1.0]
    a, b = np.concatenate([a_lo, a_hi]), np.concatenate([b_lo, b_hi])
    snr = np.repeat([estimate_snr(a_lo), estimate_snr(a_hi)], len(a_lo))
    cfg = TrainConfig(method="n2n", conditions=1, **{**TINY, "epochs": 8, "steps_per_epoch": 40})
    train_denoiser(a, tmp_path / "m", cfg, images_b=b, snr=snr)
    model, meta = load_model(tmp_path / "m")
    assert meta["architecture"]["conditions"] == 1

    def score(images, clean, s):
        return float(np.mean(psnr(denoise_array(model, images, snr=s), clean)))

    right, wrong = score(a_lo, clean_lo, 0.03), score(a_lo, clean_lo, 1.0)
    assert right > wrong + 0.5, (right, wrong)
    assert score(a_hi, clean_hi, 1.0) > score(a_hi, clean_hi, 0.03)
    # without an explicit SNR the stack's is estimated: the same as giving it
    auto = float(np.mean(psnr(denoise_array(model, a_lo), clean_lo)))
    assert auto == pytest.approx(score(a_lo, clean_lo, estimate_snr(a_lo)), abs=1e-4)


def test_condition_jitter_perturbs_the_training_conditions_reproducibly(two_snrs, tmp_path):
    """condition_jitter adds seeded noise to each training image's condition: the weights
    differ from training without it, the same seed gives the same weights, and nonsense
    values are refused."""
    a, b, _ = two_snrs[0.03]
    weights = {}
    for name, jitter in (("plain", 0.0), ("j1", 0.3), ("j2", 0.3)):
        cfg = TrainConfig(method="n2n", conditions=1, condition_jitter=jitter,
                          **{**TINY, "epochs": 1, "steps_per_epoch": 5})
        train_denoiser(a, tmp_path / name, cfg, images_b=b, snr=0.03)
        weights[name] = load_model(tmp_path / name)[0].state_dict()
    same = [torch.equal(weights["j1"][k], weights["j2"][k]) for k in weights["j1"]]
    differ = [not torch.equal(weights["j1"][k], weights["plain"][k]) for k in weights["j1"]]
    assert all(same) and any(differ)
    with pytest.raises(CryosiftError, match="condition_jitter"):
        TrainConfig(method="n2n", conditions=1, condition_jitter=-0.1).validate()


def test_init_fine_tunes_from_the_saved_weights_and_architecture(two_snrs, tmp_path):
    a, b, _ = two_snrs[1.0]
    train_denoiser(a, tmp_path / "base", TrainConfig(method="n2n", **TINY), images_b=b)
    base, _ = load_model(tmp_path / "base")
    # asks for width 16 but inherits the init's width 4; a vanishing learning rate and one
    # step leave the weights where the init put them
    cfg = TrainConfig(method="n2v", **{**TINY, "width": 16, "epochs": 1, "steps_per_epoch": 1,
                                       "lr": 1e-12}, init=str(tmp_path / "base"))
    train_denoiser(a, tmp_path / "tuned", cfg)
    tuned, meta = load_model(tmp_path / "tuned")
    assert meta["architecture"]["width"] == 4 and meta["init"] == str(tmp_path / "base")
    for (name, p), q in zip(base.state_dict().items(), tuned.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-8, rtol=0, msg=name)
    with pytest.raises(CryosiftError):
        train_denoiser(a, tmp_path / "x", TrainConfig(method="n2v", init=str(tmp_path / "no")))


def test_fine_tuning_the_general_model_through_the_cli(two_snrs, tmp_path, capsys):
    from cryosift.io import write_mrcs

    a, _, clean = two_snrs[0.03]
    write_mrcs(tmp_path / "stack.mrcs", a, pixel_size=4.0)
    model_dir = tmp_path / "tuned"
    # no --init and no architecture: the general model is fine-tuned
    args = ["-q", "denoise", "train", str(tmp_path / "stack.mrcs"), "--method", "n2v",
            "--epochs", "1", "--crop", "32", "-o", str(model_dir), "--device", "cpu"]
    assert run_cli(args) == 0, capsys.readouterr().err
    _, meta = load_model(model_dir)
    _, general_meta = load_model("general")
    assert meta["init"] == "general"
    arch = UNetConfig.from_dict(meta["architecture"])
    assert arch == UNetConfig.from_dict(general_meta["architecture"])
    # apply with a given SNR: recorded beside the output
    out = tmp_path / "den.star"
    args = ["-q", "denoise", "apply", str(tmp_path / "stack.mrcs"), "--model", str(model_dir),
            "--snr", "0.03", "-o", str(out), "--device", "cpu"]
    assert run_cli(args) == 0, capsys.readouterr().err
    record = json.loads(out.with_name("den_filter.json").read_text())
    assert "0.03" in json.dumps(record)
    den = open_source(out).images(slice(None))
    assert np.mean(psnr(den, clean)) > np.mean(psnr(a, clean)) + 10
    # refused: a cascade cannot be an --init; an SNR that is not positive; no output left
    bad = tmp_path / "bad.star"
    code = run_cli(["-q", "denoise", "apply", str(tmp_path / "stack.mrcs"), "--model", "general",
                    "--snr", "-1", "-o", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "--snr" in err and err.count("\n") == 1 and not bad.exists()
    code = run_cli(["-q", "denoise", "train", str(tmp_path / "stack.mrcs"), "--method", "cdae",
                    "--pretrained", "x", "--init", "general", "-o", str(tmp_path / "c")])
    assert code == 2 and "--init" in capsys.readouterr().err
    code = run_cli(["-q", "denoise", "train", str(tmp_path / "stack.mrcs"), "--method", "n2v",
                    "--init", "general", "--width", "4", "-o", str(tmp_path / "w")])
    assert code == 2 and "--init none" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
    # an architecture alone means random weights
    scratch = tmp_path / "scratch"
    args = ["-q", "denoise", "train", str(tmp_path / "stack.mrcs"), "--method", "n2v",
            "--epochs", "1", "--crop", "32", "--depth", "3", "--width", "4", "-o", str(scratch),
            "--device", "cpu"]
    assert run_cli(args) == 0, capsys.readouterr().err
    _, meta = load_model(scratch)
    assert "init" not in meta and meta["architecture"]["width"] == 4
