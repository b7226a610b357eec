"""Noise2Noise / Noise2Void: the network, the blind-spot masking, training, checkpoints, resume,
saving/loading (safely), and the `cryosift denoise` CLI on tiny simulated data."""

from __future__ import annotations

import json
import pickle
import tempfile

import mrcfile
import numpy as np
import pytest
import torch

from cryosift.denoise.apply import denoise_array, dihedral_average
from cryosift.denoise.model_io import load_model, save_model
from cryosift.denoise.networks import UNet, UNetConfig
from cryosift.denoise.training import (
    TrainConfig,
    WeightAverage,
    _crops,
    _loss,
    _swap_pairs,
    batch_for_box,
    n2v_mask,
    train_denoiser,
)
from cryosift.errors import CryosiftError, InputError
from cryosift.io import open_source
from cryosift.metrics import psnr
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli

TINY = dict(epochs=3, batch_size=16, crop=32, depth=3, width=4, patience=10)


@pytest.mark.parametrize("box", [30, 32, 48])
def test_unet_keeps_any_box_and_is_scale_equivariant(box):
    torch.manual_seed(0)
    net = UNet(UNetConfig(depth=3, width=4)).eval()
    x = torch.randn(2, 1, box, box)
    with torch.no_grad():
        y = net(x)
        y2 = net(3.0 * x + 5.0)  # per-image standardisation inside the network
    assert y.shape == x.shape
    torch.testing.assert_close(y2, 3.0 * y + 5.0, rtol=1e-4, atol=1e-4)


def test_tta_output_is_exactly_rotation_and_flip_equivariant():
    torch.manual_seed(0)
    net = UNet(UNetConfig(depth=3, width=4)).eval()
    x = torch.randn(3, 1, 32, 32)
    rot = lambda t: torch.rot90(t, 1, dims=(-2, -1))  # noqa: E731
    flip = lambda t: torch.flip(t, dims=(-2,))  # noqa: E731
    with torch.no_grad():
        y = dihedral_average(net, x)
        for g in (rot, flip):
            torch.testing.assert_close(dihedral_average(net, g(x)), g(y), rtol=1e-5, atol=1e-5)
        # the network alone is not equivariant: the property comes from the averaging
        assert (net(rot(x)) - rot(net(x))).abs().max() > 1e-3
        # 8 forward passes: the mean of the 8 back-transformed outputs
        assert torch.allclose(dihedral_average(lambda t: t, x), x, atol=1e-6)


@pytest.mark.parametrize("mode", ["uniform", "median"])
def test_n2v_mask_replaces_a_fraction_with_other_pixels(mode):
    x = torch.arange(4 * 64 * 64, dtype=torch.float32).reshape(4, 1, 64, 64)  # all values unique
    inp, mask = n2v_mask(x, 0.05, mode, torch.Generator().manual_seed(0))
    frac = mask.float().mean().item()
    assert frac == pytest.approx(0.05, abs=0.01)  # 16k pixels: sd 0.002
    assert (inp[mask] != x[mask]).all()  # never the pixel itself: a true blind spot
    assert torch.equal(inp[~mask], x[~mask])


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("den")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=160, box=32, pixel_size=6.0, snr=0.2, ctf=False,
                               pairs=True, seed=2)
        simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    return out


def _stacks(folder):
    return [open_source(folder / n).images(slice(None))
            for n in ("particles.mrcs", "particles_b.mrcs", "clean.mrcs")]


@pytest.mark.parametrize("method", ["n2n", "n2v"])
def test_training_raises_psnr_and_writes_a_loadable_model(pairs, tmp_path, method):
    a, b, clean = _stacks(pairs)
    summary = train_denoiser(a, tmp_path / "m", TrainConfig(method=method, **TINY), images_b=b,
                             pixel_size=6.0)
    assert len(summary["history"]) == 3 and summary["best_epoch"] >= 0
    model, meta = load_model(tmp_path / "m")
    assert meta["method"] == method and meta["pixel_size"] == 6.0
    out = denoise_array(model, a)
    gain = np.mean(psnr(out, clean)) - np.mean(psnr(a, clean))
    assert gain > 6.0  # raw is ~4 dB at SNR 0.2; even a 3-epoch tiny U-Net gains well over 6 dB
    # The views are isotropic in-plane, so each of the 8 rotated/flipped passes is as good as
    # the plain one; their mean has a lower MSE (Jensen) unless all 8 agree exactly.
    tta_gain = np.mean(psnr(denoise_array(model, a, tta=True), clean)) - np.mean(psnr(out, clean))
    assert tta_gain > 0
    saved = json.loads((tmp_path / "m" / "training.json").read_text())
    assert saved["train_config"]["method"] == method


def test_crop_zero_trains_on_whole_boxes_with_a_batch_scaled_to_the_box():
    stack = np.arange(5 * 24 * 24, dtype=np.float32).reshape(5, 24, 24)  # unique values
    (whole,) = _crops([stack], np.array([1, 3]), 0, torch.Generator().manual_seed(0))
    assert whole.shape == (2, 1, 24, 24)
    for got, want in zip(whole[:, 0].numpy(), stack[[1, 3]], strict=True):
        assert np.array_equal(np.sort(got, axis=None), np.sort(want, axis=None))  # rot/flip only
    assert _crops([stack], np.array([0]), 16, torch.Generator())[0].shape == (1, 1, 16, 16)
    # as many pixels per step as 32 crops of 64 px, never fewer than 8 images
    assert [batch_for_box(b) for b in (32, 64, 128, 256)] == [32, 32, 8, 8]
    assert batch_for_box(96) == 14 and batch_for_box(256, crop=64) == 32
    with pytest.raises(CryosiftError, match="whole box"):
        TrainConfig(crop=4).validate()


def test_whole_box_training_learns_that_the_box_edges_are_background(pairs):
    """Particles sit at the box centre: trained on whole boxes, the network cleans the outer
    ring of the box (clean there is ~0), which random 16-px crops cannot teach it (they do not
    tell the network where the box edge is). Measured: ring MSE 3.7-4.4x lower over 2 seeds."""
    a, b, clean = _stacks(pairs)
    ring = np.ones((32, 32), bool)
    ring[5:-5, 5:-5] = False
    err = {}
    for crop in (0, 16):
        cfg = TrainConfig(method="n2n", **{**TINY, "crop": crop, "steps_per_epoch": 30})
        with tempfile.TemporaryDirectory() as tmp:
            train_denoiser(a, tmp, cfg, images_b=b)
            model, _ = load_model(tmp)
        err[crop] = float(np.mean((denoise_array(model, a) - clean)[:, ring] ** 2))
    assert err[0] < 0.5 * err[16]


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_resume_continues_to_the_same_result(pairs, tmp_path, ema):
    a, b, _ = _stacks(pairs)
    opts = {**TINY, "ema": ema}
    full = TrainConfig(method="n2n", **{**opts, "epochs": 4})
    train_denoiser(a, tmp_path / "full", full, images_b=b)
    # train 2 epochs, then resume with a 4-epoch budget: the same run as 4 epochs at once
    part = tmp_path / "part"
    train_denoiser(a, part, TrainConfig(method="n2n", **{**opts, "epochs": 2}), images_b=b)
    other = TrainConfig(method="n2n", **{**opts, "epochs": 4, "lr": 5e-4})
    with pytest.raises(CryosiftError, match="other parameters"):
        train_denoiser(a, part, other, images_b=b, resume=True)
    train_denoiser(a, part, full, images_b=b, resume=True)
    ck_full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    ck_part = torch.load(part / "checkpoint.pt", weights_only=True)
    for k in ck_full["model"]:
        torch.testing.assert_close(ck_part["model"][k], ck_full["model"][k], rtol=1e-5, atol=1e-6)
    # the saved model is the same too (with ema: the averaged weights, which the resumed run
    # must have carried on from the checkpoint rather than restarted)
    m_full, _ = load_model(tmp_path / "full")
    m_part, _ = load_model(part)
    for p, q in zip(m_part.parameters(), m_full.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if ema:
        live = dict(UNet(UNetConfig(TINY["depth"], TINY["width"])).named_parameters())
        saved = dict(m_full.named_parameters())
        assert any(not torch.allclose(saved[k], ck_full["model"][k]) for k in live)


def test_weight_average_follows_the_weights_and_swaps_back():
    net = torch.nn.Linear(3, 1)
    avg = WeightAverage(net, decay=0.5)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    for _ in range(40):  # constant weights: the average converges to them geometrically
        avg.update()
    avg.swap()
    for p, s in zip(net.parameters(), start, strict=True):
        torch.testing.assert_close(p, s + 1.0, rtol=0, atol=1e-6)
    avg.swap()
    avg.swap()
    avg.swap()  # an even number of swaps more: back to the live weights
    for p, s in zip(net.parameters(), start, strict=True):
        torch.testing.assert_close(p, s + 1.0, rtol=0, atol=1e-6)
    state = avg.state_dict()
    other = WeightAverage(torch.nn.Linear(3, 1), decay=0.5)
    other.load_state_dict(state)
    assert other.steps == 40
    with pytest.raises(ValueError):
        WeightAverage(torch.nn.Linear(3, 2, bias=False), 0.5).load_state_dict(
            {"steps": 1, "shadow": []})


@pytest.mark.parametrize("method", ["n2n", "n2v"])
def test_per_image_weight_makes_the_loss_blind_to_each_images_scale(method):
    """The U-Net is scale-equivariant, so scaling one image of a pair (input and target) by c
    scales its squared error by c^2; weighted by 1 / input variance, the loss does not move,
    so a loud (low-SNR or high-dose) image cannot rule a mixed training set."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(depth=3, width=4)).eval()
    a, b = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
    scale = torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None, None, None]

    def loss(cfg, x, y):
        with torch.no_grad():
            batch = [x, y] if method == "n2n" else [x]
            return float(_loss(net, cfg, batch, torch.Generator().manual_seed(1), "cpu"))

    weighted = TrainConfig(method=method, per_image_weight=True)
    plain = TrainConfig(method=method)
    assert loss(weighted, a * scale, b * scale) == pytest.approx(loss(weighted, a, b), rel=1e-4)
    assert loss(plain, a * scale, b * scale) > 5 * loss(plain, a, b)


def test_model_files_are_loaded_safely(tmp_path):
    net = UNet(UNetConfig(depth=3, width=4))
    save_model(tmp_path / "ok.pt", net, {"architecture": {"depth": 3, "width": 4}, "method": "n2v"})
    load_model(tmp_path / "ok.pt")
    save_model(tmp_path / "wrong.pt", net, {"architecture": {"depth": 4, "width": 4}})
    with pytest.raises(InputError, match="do not fit"):
        load_model(tmp_path / "wrong.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt.pt"):
        load_model(tmp_path / "corrupt.pt")

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "cryosift-denoiser", "x": Evil()}, f)
    with pytest.raises(InputError, match="refused"):
        load_model(tmp_path / "evil.pt")
    assert not marker.exists()  # the pickle's payload never ran
    with pytest.raises(InputError):
        load_model(tmp_path / "missing")


def test_cli_train_and_apply_keep_pixel_size(pairs, tmp_path, capsys):
    model = tmp_path / "model"
    code = run_cli(["-q", "denoise", "train", str(pairs / "particles.star"), "--method", "n2v",
                    "-o", str(model), "--epochs", "2", "--crop", "32", "--depth", "3",
                    "--width", "4", "--batch-size", "16", "--device", "cpu",
                    "--schedule", "cosine", "--ema", "0.9"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((model / "training.json").read_text())
    assert record["train_config"]["schedule"] == "cosine"
    assert record["train_config"]["ema"] == 0.9
    assert record["history"][-1]["lr"] < 1e-6  # decayed to 0 by the end of the last epoch
    out = tmp_path / "den.star"
    code = run_cli(["-q", "denoise", "apply", str(pairs / "particles.star"), "--model", str(model),
                    "-o", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    src = open_source(out)
    assert len(src) == 160 and src.pixel_size == pytest.approx(6.0)
    with mrcfile.open(out.with_suffix(".mrcs")) as mrc:
        assert float(mrc.voxel_size.x) == pytest.approx(6.0)
    assert "cryosiftIsParticle" in src.metadata  # STAR metadata kept
    tta = tmp_path / "den_tta.star"
    code = run_cli(["-q", "denoise", "apply", str(pairs / "particles.star"), "--model", str(model),
                    "-o", str(tta), "--device", "cpu", "--tta"])
    assert code == 0, capsys.readouterr().err
    plain, averaged = src.images(slice(None)), open_source(tta).images(slice(None))
    assert averaged.shape == plain.shape and not np.allclose(averaged, plain, atol=1e-4)
    assert '"tta": true' in tta.with_name("den_tta_filter.json").read_text()  # provenance


def test_cli_refuses_bad_requests(pairs, tmp_path, capsys):
    star = str(pairs / "particles.star")
    assert run_cli(["denoise", "train", star, "--method", "n2n", "-o", str(tmp_path / "a")]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert run_cli(["denoise", "train", star, "--method", "n2v", "--ema", "1.5", "-o",
                    str(tmp_path / "e")]) == 2
    assert "--ema" in capsys.readouterr().err and not (tmp_path / "e").exists()
    # a model trained at 6 Å/px refuses images at 2 Å/px
    net = UNet(UNetConfig(depth=3, width=4))
    save_model(tmp_path / "m.pt", net, {"architecture": {"depth": 3, "width": 4},
                                        "pixel_size": 2.0})
    out = tmp_path / "x.star"
    assert run_cli(["denoise", "apply", star, "--model", str(tmp_path / "m.pt"), "-o",
                    str(out)]) == 2
    err = capsys.readouterr().err
    assert "Å/px" in err and len(err.strip().splitlines()) <= 2
    assert not out.exists() and not out.with_suffix(".mrcs").exists()
    assert run_cli(["denoise", "apply", star, "--model", str(tmp_path / "nope"), "-o",
                    str(out)]) == 2


def test_swap_pairs_trains_in_both_directions_and_keeps_each_pair_together():
    a = torch.arange(64.0).reshape(64, 1, 1, 1)
    b = -a
    x, y = _swap_pairs([a, b], torch.Generator().manual_seed(0))
    assert torch.equal(x, -y)  # input and target still come from the same pair
    swapped = (x < 0).flatten()
    assert 16 < int(swapped.sum()) < 48  # about half each way (binomial sd 4)
    assert torch.equal(x[~swapped], a[~swapped]) and torch.equal(x[swapped], b[swapped])
