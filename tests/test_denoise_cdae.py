"""CDAE (seed 004): the autoencoder block, nearest-neighbour targets, pre-training on simulated
TRPV1, fine-tuning on a target stack, safe model files and the benchmark registration."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from cryosift.denoise.cdae import (
    CDAE,
    PAPER_WIDTHS,
    DAEBlock,
    DAEConfig,
    cdae_denoise,
    finetune_cdae,
    histeq_keep_range,
    knn_indices,
    knn_mean_targets,
    load_cdae,
    parameter_count,
    pca_features,
    pretrain_cdae,
    pretrain_single_dae,
    save_cdae,
)
from cryosift.errors import InputError
from cryosift.io import open_source, write_mrcs
from cryosift.metrics import psnr
from cryosift.registry import DenoiseTask, get
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli

TINY_PRE = dict(box=32, pixel_size=6.0, n_per_view=40, views=2, epochs=2, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("box", [32, 40, 64, 36])
def test_block_and_cascade_keep_the_box_and_are_scale_equivariant(box):
    torch.manual_seed(0)
    model = CDAE().eval()
    x = torch.randn(2, 1, box, box)
    with torch.no_grad():
        y = model(x)
        y2 = model(3.0 * x + 5.0)  # per-image standardisation inside every block
        y1 = model(x, upto=1)
    assert y.shape == y1.shape == x.shape
    torch.testing.assert_close(y2, 3.0 * y + 5.0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y1, model.blocks[0](x))
    with torch.no_grad():
        torch.testing.assert_close(model(x, upto=0), x)


def test_skips_start_blocks_two_and_three_as_the_identity_and_survive_saving(tmp_path):
    torch.manual_seed(0)
    model = CDAE(skip=True).eval()
    assert [b.residual for b in model.blocks] == [False, True, True]
    x = torch.randn(3, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, upto=1), rtol=0, atol=0)
        torch.testing.assert_close(model(2.0 * x - 1.0), 2.0 * model(x) - 1.0,
                                   rtol=1e-4, atol=1e-4)
        for block in model.blocks[1:]:  # trained blocks add a correction to their input
            block.decoder[-1].bias.fill_(0.5)
        y = model(x)
        mid = model(x, upto=2)
        std = mid.std(dim=(-2, -1), keepdim=True)
        torch.testing.assert_close(y, mid + 0.5 * std, rtol=1e-5, atol=1e-5)
    save_cdae(tmp_path / "skip.pt", model, {"method": "cdae"})
    loaded, meta = load_cdae(tmp_path / "skip.pt")
    assert loaded.skip and meta["skip"] is True
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    payload = torch.load(tmp_path / "skip.pt", weights_only=True)
    del payload["meta"]["skip"]  # a file from before skips existed: 004's plain cascade
    torch.save(payload, tmp_path / "old.pt")
    assert not load_cdae(tmp_path / "old.pt")[0].skip
    payload["meta"]["skip"] = "yes"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(InputError, match="skip"):
        load_cdae(tmp_path / "bad.pt")


def test_architecture_matches_004_and_the_stated_parameter_count():
    block = DAEBlock()
    convs = [m for m in block.encoder if isinstance(m, nn.Conv2d)]
    pools = [m for m in block.encoder if isinstance(m, nn.MaxPool2d)]
    deconvs = [m for m in block.decoder if isinstance(m, nn.ConvTranspose2d)]
    last = [m for m in block.decoder if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and len(pools) == 3  # 3 modules of 2 convolutions + pooling
    assert len(deconvs) == 3 and len(last) == 1 and last[0].out_channels == 1
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32, 32]
    assert sum(p.numel() for p in block.parameters()) == parameter_count() == 33145
    assert sum(p.numel() for p in CDAE().parameters()) == 3 * 33145
    paper = DAEBlock(DAEConfig(widths=PAPER_WIDTHS))
    assert paper.decoder[-1].in_channels == 32  # 004: the last convolution combines 32 -> 1
    assert sum(p.numel() for p in paper.parameters()) == parameter_count(PAPER_WIDTHS) == 526561


def test_dropout_is_half_and_active_in_training_only():
    torch.manual_seed(0)
    block = DAEBlock()
    drops = [m for m in block.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 2 and all(d.p == 0.5 for d in drops)  # one in encoder, one in decoder
    x = torch.randn(4, 1, 32, 32)
    block.train()
    assert not torch.allclose(block(x), block(x))
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), block(x))


def _templates(n_views=4, per_view=60, box=24, sigma=1.0, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box] - box / 2
    tmpl = []
    for _ in range(n_views):  # a few random blobs per view: distinct, smooth templates
        img = np.zeros((box, box))
        for cy, cx in rng.uniform(-box / 4, box / 4, (3, 2)):
            img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.5**2))
        tmpl.append(img / img.std())
    labels = np.repeat(np.arange(n_views), per_view)
    clean = np.stack(tmpl)[labels].astype(np.float32)
    noisy = clean + sigma * rng.standard_normal(clean.shape).astype(np.float32)
    return noisy, clean, labels


def test_knn_mean_is_close_to_the_template_and_excludes_the_image_itself():
    noisy, clean, labels = _templates()
    k = 10
    ind = knn_indices(noisy, k)
    assert ind.shape == (len(noisy), k)
    assert not (ind == np.arange(len(noisy))[:, None]).any()  # never its own neighbour
    assert (labels[ind] == labels[:, None]).mean() > 0.99  # neighbours share the view
    target = knn_mean_targets(noisy, k)
    mse_noisy = np.mean((noisy - clean) ** 2)
    mse_knn = np.mean((target - clean) ** 2)
    assert mse_noisy / mse_knn == pytest.approx(k, rel=0.25)  # averaging k independent noises
    # "auto" PCA keeps the components above the noise: 4 templates span 3 centred dimensions
    feats, info = pca_features(noisy)
    assert feats.shape == (len(noisy), 3) and info["n_components"] == 3
    assert info["noise_variance"] == pytest.approx(1.0, rel=0.1)  # sigma = 1
    # an exact duplicate is found as a neighbour, but the image itself still is not
    dup = np.concatenate([noisy, noisy[:1]])
    ind = knn_indices(dup, 3, n_components=None)
    assert ind[0, 0] == len(noisy) and ind[-1, 0] == 0
    assert 0 not in ind[0] and len(noisy) not in ind[-1]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cdae")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        trpv1 = data_file("structures", "3J5P_refined_locscale.pdb")
        pretrain_cdae(trpv1, out / "cdae", **TINY_PRE)
        pretrain_single_dae(trpv1, out / "dae", **TINY_PRE)
    return out


def test_pretraining_writes_loadable_weights_and_a_record(pretrained):
    model, meta = load_cdae(pretrained / "cdae")
    assert isinstance(model, CDAE) and model.n_blocks == 3 and not model.training
    assert model.skip and meta["pretrain"]["skip"] is True  # the default: skips around 2 and 3
    assert meta["pixel_size"] == 6.0 and meta["train_box"] == 32
    record = json.loads((pretrained / "cdae" / "pretrain.json").read_text())
    stages = [(b["input_snr"], b["target"]) for b in record["blocks"]]
    assert stages == [(0.1, 0.4), (0.4, 0.6), (0.6, "clean")]
    assert all(len(b["history"]) == 2 for b in record["blocks"])
    assert record["simulation"]["n_images"] == 80
    single, meta1 = load_cdae(pretrained / "dae" / "model.pt")
    assert single.n_blocks == 1 and meta1["method"] == "dae"
    rec1 = json.loads((pretrained / "dae" / "pretrain.json").read_text())
    assert [(b["input_snr"], b["target"]) for b in rec1["blocks"]] == [(0.1, "clean")]
    files = {p.name for p in (pretrained / "cdae").iterdir()}
    assert files == {"model.pt", "model.json", "pretrain.json"}  # simulation scratch removed


def test_model_files_are_checked(tmp_path):
    save_cdae(tmp_path / "ok.pt", CDAE(n_blocks=2), {"method": "cdae"})
    assert load_cdae(tmp_path / "ok.pt")[0].n_blocks == 2
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(InputError, match="corrupt.pt"):
        load_cdae(tmp_path / "corrupt.pt")
    torch.save({"format": "cryosift-denoiser", "meta": {}}, tmp_path / "unet.pt")
    with pytest.raises(InputError, match="not a cryosift CDAE"):
        load_cdae(tmp_path / "unet.pt")
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    payload["meta"]["n_blocks"] = 3
    torch.save(payload, tmp_path / "wrong.pt")
    with pytest.raises(InputError, match="do not fit"):
        load_cdae(tmp_path / "wrong.pt")
    with pytest.raises(InputError):
        load_cdae(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def target_stack(tmp_path_factory):
    out = tmp_path_factory.mktemp("spcas9")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=160, box=32, pixel_size=6.0, snr=0.1, views=4,
                               in_plane=False, ctf=False, seed=11)
        simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    return (open_source(out / "particles.mrcs").images(slice(None)),
            open_source(out / "clean.mrcs").images(slice(None)))


def test_finetuned_cascade_raises_psnr_on_another_protein(pretrained, target_stack):
    noisy, clean = target_stack
    model, _ = load_cdae(pretrained / "cdae")
    before = [p.detach().clone() for p in model.parameters()]
    tuned, summary = finetune_cdae(model, noisy, k=30, epochs=2, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert [b["block"] for b in summary["blocks"]] == [1, 2, 3]
    out = cdae_denoise(tuned, noisy)
    raw = float(np.mean(psnr(noisy, clean)))
    gain = float(np.mean(psnr(out, clean))) - raw
    assert gain > 8.0, (raw, gain)  # raw ~5 dB at SNR 0.1, box 32; measured gain ~10 dB
    eq = cdae_denoise(tuned, noisy, histeq=True)
    assert eq.shape == noisy.shape  # equalised, then mapped back onto each image's own range
    assert np.allclose(eq.max((1, 2)), out.max((1, 2)), atol=1e-5)
    assert (eq.min((1, 2)) >= out.min((1, 2)) - 1e-5).all()


def test_skips_let_blocks_two_and_three_improve_on_block_one(pretrained, target_stack,
                                                             tmp_path):
    """The reason for the skips (module doc): fine-tuned on the same k-NN targets, the plain
    cascade's blocks 2 and 3 redraw the image and lose PSNR, the blocks with skips add to it.
    Measured on this stack: skips 15.98 -> 16.48 -> 16.80 dB, plain 15.98 -> 15.43 -> 16.09."""
    noisy, clean = target_stack
    trpv1 = data_file("structures", "3J5P_refined_locscale.pdb")
    pretrain_cdae(trpv1, tmp_path / "plain", skip=False, **TINY_PRE)
    scores = {}
    for name, folder in (("skip", pretrained / "cdae"), ("plain", tmp_path / "plain")):
        tuned, _ = finetune_cdae(load_cdae(folder)[0], noisy, k=30, epochs=4, seed=0)
        x = torch.from_numpy(noisy)[:, None]
        with torch.no_grad():
            scores[name] = [float(np.mean(psnr(tuned(x, upto=j)[:, 0].numpy(), clean)))
                            for j in (1, 2, 3)]
    skip, plain = scores["skip"], scores["plain"]
    assert skip[0] == pytest.approx(plain[0], abs=1e-4)  # block 1 is the same in both
    assert skip[0] < skip[1] < skip[2], scores
    assert skip[2] > skip[0] + 0.4 and skip[2] > plain[2] + 0.3, scores


def test_bench_methods_are_registered_and_share_the_fine_tuning(tmp_path, monkeypatch,
                                                                 target_stack):
    monkeypatch.setenv("CRYOSIFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    noisy, _ = target_stack
    task = DenoiseTask(noisy=noisy[:40], pixel_size=6.0, seed=1)
    tiny = dict(n_per_view=10, views=2, pretrain_epochs=1, epochs=1, k=5)
    plain = get("denoiser", "cdae").build(**tiny)
    out = plain(task)
    assert out.shape == task.noisy.shape and out.dtype == np.float32
    assert len(list((tmp_path / "cdae").glob("cdae-box32-px6-*/model.pt"))) == 1
    eq = get("denoiser", "cdae+histeq").build(**tiny)(task)  # same fine-tuned output, equalised
    np.testing.assert_allclose(eq, histeq_keep_range(out), atol=1e-6)
    assert plain.params["histeq"] is False and plain.params["k"] == 5
    assert get("denoiser", "dae").defaults["k"] == 30
    get("denoiser", "cdae_plain").build(**tiny)(task)  # 004's cascade: its own weights
    folders = sorted((tmp_path / "cdae").glob("cdae-box32-px6-*"))
    assert len(folders) == 2
    assert sorted(load_cdae(f)[0].skip for f in folders) == [False, True]
    assert get("denoiser", "dae+histeq") is not None


def test_cli_pretrain_finetune_apply_end_to_end(target_stack, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    noisy, clean = target_stack
    write_mrcs(tmp_path / "stack.mrcs", noisy, pixel_size=6.0)
    trpv1 = str(data_file("structures", "3J5P_refined_locscale.pdb"))
    pre = ["-q", "denoise", "pretrain-cdae", trpv1, "-o", str(tmp_path / "pre"), "--box", "32",
           "--pixel-size", "6", "--views", "2", "--n-per-view", "40", "--epochs", "2"]
    assert run_cli(pre) == 0, capsys.readouterr().err
    assert {p.name for p in (tmp_path / "pre").iterdir()} == {"model.pt", "model.json",
                                                              "pretrain.json"}
    train = ["-q", "denoise", "train", str(tmp_path / "stack.mrcs"), "--method", "cdae",
             "--pretrained", str(tmp_path / "pre"), "-o", str(tmp_path / "tuned"),
             "--epochs", "2", "--k", "20", "--batch-size", "16"]
    assert run_cli(train) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "tuned" / "model.json").read_text())
    assert meta["phase"] == "finetuned" and meta["pixel_size"] == 6.0 and not meta["histeq"]
    record = json.loads((tmp_path / "tuned" / "finetune.json").read_text())
    assert record["finetune"]["k"] == 20 and len(record["finetune"]["blocks"]) == 3
    out = tmp_path / "den.star"
    args = ["-q", "denoise", "apply", str(tmp_path / "stack.mrcs"), "--model",
            str(tmp_path / "tuned"), "-o", str(out)]
    assert run_cli(args) == 0, capsys.readouterr().err
    src = open_source(out)
    assert src.pixel_size == pytest.approx(6.0) and len(src) == len(noisy)
    den = src.images(slice(None))
    assert float(np.mean(psnr(den, clean))) > float(np.mean(psnr(noisy, clean))) + 6.0


def test_cli_cdae_bad_requests_leave_nothing(target_stack, tmp_path, capsys, pretrained):
    noisy, _ = target_stack
    write_mrcs(tmp_path / "fine.mrcs", noisy[:40], pixel_size=2.0)  # pre-trained at 6 Å/px
    base = ["-q", "denoise", "train", str(tmp_path / "fine.mrcs"), "--method", "cdae", "-o"]
    assert run_cli([*base, str(tmp_path / "a")]) == 2
    assert "--pretrained" in capsys.readouterr().err
    code = run_cli([*base, str(tmp_path / "b"), "--pretrained", str(pretrained / "cdae")])
    err = capsys.readouterr().err
    assert code == 2 and "Å/px" in err and err.count("\n") == 1
    code = run_cli(["denoise", "pretrain-cdae", str(tmp_path / "none.pdb"), "-o",
                    str(tmp_path / "c")])
    assert code == 2 and "none.pdb" in capsys.readouterr().err
    code = run_cli(["denoise", "pretrain-cdae", str(data_file("structures", "5F9R.pdb")), "-o",
                    str(tmp_path / "d"), "--snrs", "0.1,0.4"])
    assert code == 2 and "three" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_shipped_phase1_weights_serve_the_benchmark_defaults():
    from cryosift.denoise.cdae import BENCH_DEFAULTS as B
    from cryosift.denoise.cdae import shipped_pretrained
    from cryosift.denoise.model_io import load_model

    pre = {"n_per_view": B["n_per_view"], "views": B["views"], "epochs": B["pretrain_epochs"],
           "widths": list(B["widths"]), "seed": B["pretrain_seed"]}
    cascade = shipped_pretrained("cdae", 64, 3.0, {**pre, "snrs": list(B["snrs"]), "skip": True})
    plain = shipped_pretrained("cdae", 64, 3.0, {**pre, "snrs": list(B["snrs"]), "skip": False})
    single = shipped_pretrained("dae", 64, 3.0, {**pre, "snr": B["snrs"][0]})
    assert cascade is not None and plain is not None and single is not None
    assert load_cdae(cascade)[0].skip and not load_cdae(plain)[0].skip  # 004's own cascade too
    assert shipped_pretrained("dae", 64, 3.0, {**pre, "snr": 0.2}) is None  # other recipe
    assert shipped_pretrained("cdae", 48, 3.0, {**pre, "snrs": list(B["snrs"])}) is None
    model, meta = load_model("cdae-trpv1-box64-px3")  # by shipped name, as the CLI does
    assert isinstance(model, CDAE) and model.n_blocks == 3 and meta["pixel_size"] == 3.0
    assert meta["pretrain"]["structure"] == "3J5P_refined_locscale.pdb"
    assert load_cdae(single)[0].n_blocks == 1


def test_dae_knn_is_004s_baseline_trained_on_neighbour_means_only(tmp_path, monkeypatch,
                                                                  target_stack):
    """004 section 4.3's single DAE: no simulated pre-training (nothing cached), k-NN-mean
    targets only, three times the cascade's fine-tuning epochs; it must still denoise."""
    monkeypatch.setenv("CRYOSIFT_CACHE", str(tmp_path))
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    noisy, clean = target_stack
    method = get("denoiser", "dae_knn")
    assert method.defaults["epochs"] == 3 * get("denoiser", "cdae").defaults["epochs"]
    run = method.build(k=30, epochs=6)
    out = run(DenoiseTask(noisy=noisy, pixel_size=6.0, seed=2))
    assert not any(tmp_path.iterdir())  # trained from random weights: no pre-training run
    assert run.params["pretrained"].startswith("none")
    gain = float(np.mean(psnr(out, clean))) - float(np.mean(psnr(noisy, clean)))
    assert gain > 8.0, gain  # as the cascade in its test; measured 14.4 dB
