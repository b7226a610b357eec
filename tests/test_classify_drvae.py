"""DRVAE + BSK-means++ (seed 001): the ResNet VAE, the iterated denoise-and-cluster loop on
simulated SpCas9 views, determinism, safe model files, registration and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryosift.classify.balanced import min_class_size
from cryosift.classify.drvae import (
    DRVAE,
    DRVAEConfig,
    drvae_bsk,
    drvae_denoise,
    load_drvae,
    save_drvae,
)
from cryosift.errors import CryosiftError, InputError
from cryosift.io import merged_metadata, open_source, read_star
from cryosift.metrics import psnr
from cryosift.metrics.clustering import clustering_accuracy
from cryosift.registry import ClusterTask, DenoiseTask, get
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file

FAST = dict(pretrain_epochs=2, round_epochs=1, max_rounds=1, n_init=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """240 SpCas9 images of 32 px, 3 fixed views with unequal weights, no in-plane rotation."""
    out = tmp_path_factory.mktemp("drvae")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=240, box=32, pixel_size=6.0, snr=0.1, views=3,
                               view_weights=(2.0, 1.5, 1.0), in_plane=False, seed=5)
        res = simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    meta = merged_metadata(read_star(res.star))
    noisy = open_source(res.star).images(slice(None))
    clean = open_source(res.clean).images(slice(None))
    return noisy, clean, meta


@pytest.mark.parametrize("box, work", [(32, 16), (40, 16), (36, None), (64, 16)])
def test_network_keeps_the_box_and_rejects_other_sizes(box, work):
    torch.manual_seed(0)
    model = DRVAE(DRVAEConfig(box=box, work=work, width=4, latent=3)).eval()
    x = torch.randn(2, 1, box, box)
    z = model.shrink(x)
    assert z.shape[-1] == (work or box)
    with torch.no_grad():
        rec, mu, logvar = model(z, sample=False)
    assert rec.shape == z.shape and mu.shape == logvar.shape == (2, 3)
    assert model.expand(rec).shape == x.shape
    with pytest.raises(CryosiftError, match=f"built for {box} px"):
        model.shrink(torch.randn(1, 1, box + 4, box + 4))


@pytest.mark.slow
def test_drvae_bsk_recovers_views_and_denoises(views):
    noisy, clean, meta = views
    truth = meta["cryosiftTrueView"].to_numpy()
    res = drvae_bsk(noisy, 3, seed=0, pretrain_epochs=25, round_epochs=4, max_rounds=3)
    assert clustering_accuracy(truth, res.labels) > 0.95
    assert np.bincount(res.labels, minlength=3).min() >= min_class_size(len(noisy), 3)
    assert res.averages.shape == (3, 32, 32) and res.denoised.shape == noisy.shape
    gain = np.mean(psnr(res.denoised.astype(np.float64), clean.astype(np.float64))) - np.mean(
        psnr(noisy.astype(np.float64), clean.astype(np.float64)))
    assert gain > 8.0  # dB over the raw images
    assert res.info["rounds"] and res.info["sigma2"] > 0


def test_loop_is_deterministic_with_a_seed_and_saves_and_loads(views, tmp_path):
    noisy = views[0][:90]
    a = drvae_bsk(noisy, 3, seed=1, **FAST)
    b = drvae_bsk(noisy, 3, seed=1, **FAST)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.denoised, b.denoised)
    for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    np.testing.assert_allclose(drvae_denoise(a.model, noisy), a.denoised, rtol=1e-5, atol=1e-5)
    save_drvae(tmp_path / "m", a.model, {"k": 3})
    model, meta = load_drvae(tmp_path / "m")
    assert meta["k"] == 3 and meta["architecture"]["work"] == 16
    np.testing.assert_allclose(drvae_denoise(model, noisy), a.denoised, rtol=1e-5, atol=1e-5)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="bad.pt"):
        load_drvae(tmp_path / "bad.pt")
    # continuing from a given model (copied, the original untouched)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = drvae_bsk(noisy, 3, seed=1, model=model, **FAST)
    assert c.labels.shape == (90,)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_registered_as_clusterer_and_denoiser(views):
    noisy, _, meta = views
    sub, sub_meta = noisy[:60], meta.iloc[:60].reset_index(drop=True)
    run = get("clusterer", "drvae+bsk").build(device="cpu", **FAST)
    res = run(ClusterTask(sub, 3, 6.0, metadata=sub_meta, seed=2))
    assert res.labels.shape == (60,) and set(res.labels) <= {0, 1, 2}
    assert res.averages.shape == (3, 32, 32)
    den = get("denoiser", "drvae").build(device="cpu", **FAST)
    out = den(DenoiseTask(sub, 6.0, metadata=sub_meta, seed=2))
    assert out.shape == sub.shape and out.dtype == np.float32
    assert den.params["k"] == 3 and "views" in den.params["k_from"]
    assert get("denoiser", "drvae").quick and get("clusterer", "drvae+bsk").quick


@pytest.mark.parametrize(
    "shape, k, match",
    [
        ((20, 32, 32), 1, "K must be"),
        ((20, 32, 32), 21, "K must be"),
        ((20, 32), 2, "stack"),
        ((20, 32, 30), 2, "stack"),
    ],
)
def test_bad_input_is_a_clear_error(shape, k, match):
    with pytest.raises(CryosiftError, match=match):
        drvae_bsk(np.zeros(shape, dtype=np.float32), k, **FAST)


def test_nan_images_and_bad_options_are_errors():
    x = np.random.default_rng(0).normal(size=(20, 32, 32)).astype(np.float32)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(CryosiftError, match="NaN"):
        drvae_bsk(bad, 2, **FAST)
    with pytest.raises(CryosiftError, match="features"):
        drvae_bsk(x, 2, features="pixels", **FAST)
    with pytest.raises(CryosiftError, match="working size"):
        DRVAE(DRVAEConfig(box=32, work=40))
