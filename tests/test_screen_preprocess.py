"""The screeners' preprocessing configuration: defaults, σ_s scaled with the working box, and
saved models that keep the preprocessing they were trained with whatever the defaults become."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from cryosift.filters import FilterChain, make_filter
from cryosift.screen import PreprocessConfig, train_screener
from cryosift.screen.model_io import load_screener, save_screener
from cryosift.screen.preprocess import fourier_crop_images, preprocess, standardise
from cryosift.screen.rbm import RBMConfig

PREP = sys.modules["cryosift.screen.preprocess"]  # the package re-exports a function of that name

#: what every model saved so far records (all four fields were always written)
OLD_RECORD = {"chain": True, "work_box": 64, "bilateral_sigma_spatial_px": 2.0,
              "bilateral_sigma_range": 1.0}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_defaults_and_sigma_scaled_with_the_working_box():
    # the default chain works at 32 px with σ_s 1 px; a record of the old default reads back
    assert PreprocessConfig().to_dict() == {**OLD_RECORD, "work_box": 32,
                                            "bilateral_sigma_spatial_px": 1.0}
    assert PreprocessConfig.from_dict(OLD_RECORD).to_dict() == OLD_RECORD
    assert PreprocessConfig(chain=False).work_box == 64
    for box, sigma in ((64, 2.0), (48, 1.5), (32, 1.0)):
        cfg = PreprocessConfig(work_box=box)
        assert (cfg.work_box, cfg.bilateral_sigma_spatial_px) == (box, sigma)
        assert None not in cfg.to_dict().values()  # a saved model records numbers
    # an explicit σ_s is kept; the window follows σ_s (max(5, 2 ceil(3 σ_s) + 1))
    explicit = PreprocessConfig(work_box=32, bilateral_sigma_spatial_px=2.0)
    assert explicit.bilateral_sigma_spatial_px == 2.0
    assert make_filter("bilateral", sigma_spatial_px=1.0).window_px == 7


def test_default_working_box_can_differ_with_the_chain(monkeypatch):
    monkeypatch.setattr(PREP, "CHAIN_WORK_BOX", 32)
    assert PreprocessConfig().to_dict() == {**OLD_RECORD, "work_box": 32,
                                            "bilateral_sigma_spatial_px": 1.0}
    assert PreprocessConfig(chain=False).work_box == 64
    assert PreprocessConfig(work_box=64).bilateral_sigma_spatial_px == 2.0


def test_from_dict_reads_records_as_they_were_written(monkeypatch):
    monkeypatch.setattr(PREP, "CHAIN_WORK_BOX", 32)  # even if the default changes
    assert PreprocessConfig.from_dict(OLD_RECORD).to_dict() == OLD_RECORD
    rec = {"chain": True, "work_box": 24, "bilateral_sigma_spatial_px": 2.0,
           "bilateral_sigma_range": 1.5, "unknown_future_field": 1}
    back = PreprocessConfig.from_dict(rec)
    assert (back.work_box, back.bilateral_sigma_spatial_px, back.bilateral_sigma_range) == (
        24, 2.0, 1.5)
    # a field missing from a record means what it meant before defaults were resolved
    assert PreprocessConfig.from_dict({"chain": True}).to_dict() == OLD_RECORD
    assert PreprocessConfig.from_dict({"chain": False, "work_box": 32}).to_dict() == {
        **OLD_RECORD, "chain": False, "work_box": 32}


def test_saved_model_applies_the_preprocessing_it_recorded(tmp_path, monkeypatch):
    """A model trained with σ_s = 2 px at a 24 px working box (what `--work-box 24` gave before
    σ_s followed the box) is re-loaded, after the defaults changed, and prepares images exactly
    as its record says: Fourier crop to 24 px, bilateral σ_s = 2 px (13 px window), histeq."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 40, 40)).astype(np.float32)
    x[::2, 12:28, 14:26] += 1.0
    y = np.tile([1, 0], 40)
    old = PreprocessConfig(work_box=24, bilateral_sigma_spatial_px=2.0)
    s = train_screener(x, y, "rbm", RBMConfig(epochs=1, n_hidden=8), old, pixel_size=3.0)
    save_screener(tmp_path / "m", s)
    recorded = json.loads((tmp_path / "m" / "model.json").read_text())["preprocess"]
    assert recorded == {**OLD_RECORD, "work_box": 24}

    monkeypatch.setattr(PREP, "CHAIN_WORK_BOX", 32)
    back = load_screener(tmp_path / "m")
    assert back.preprocess.to_dict() == recorded
    chain = FilterChain([make_filter("bilateral", sigma_spatial_px=2.0, sigma_range=1.0),
                         make_filter("histeq")])
    assert chain.filters[0].window_px == 13
    want = standardise(chain(fourier_crop_images(x, 24)))
    np.testing.assert_array_equal(back.prepare(x), want)
    np.testing.assert_array_equal(back.predict_proba(x), s.predict_proba(x))
    # today's defaults at that box would filter differently (σ_s = 0.75 px): the record matters
    assert np.abs(preprocess(x, PreprocessConfig(work_box=24)) - want).max() > 0.1
