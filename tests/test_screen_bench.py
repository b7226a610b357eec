"""Benchmark B3 through `cryosift bench`: every screener is trained on a separately simulated set
(same spec, another seed) and scored on the test set beside the matched-filter oracle."""

from __future__ import annotations

import json

import pytest
import torch

from cryosift.bench.protocol import DatasetSpec
from cryosift.bench.screening import TRAIN_SEED_OFFSET
from sim_helpers import data_file, run_cli

TINY_B3 = DatasetSpec("5F9R.pdb", 240, 32, 6.0, 0.03, junk_fraction=0.5, junk_types=("noise",),
                      in_plane=True, seed=7, tasks=("screen",))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks gain nothing from threads, and oversubscribed CPUs lose a lot to them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def tiny_b3(monkeypatch):
    data_file("structures", "5F9R.pdb")
    settings = {"snr=0.03": TINY_B3}
    import cryosift.bench.runner as runner

    monkeypatch.setattr(runner, "benchmark_settings", lambda bid, quick: settings)
    monkeypatch.setattr(runner, "structure_path", lambda name: data_file("structures", name))
    return settings


@pytest.mark.slow
def test_b3_scores_every_screener_beside_the_oracle(tiny_b3, tmp_path, capsys):
    out = tmp_path / "b3"
    code = run_cli(["-q", "bench", "B3", "--quick", "-o", str(out), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    r = json.loads((out / "results.json").read_text())["B3"]["snr=0.03"]
    assert {"rbm", "rbm_nopre", "cnn", "matched_filter_oracle"} <= set(r)
    oracle = r["matched_filter_oracle"]
    for name in ("rbm", "rbm_nopre", "cnn"):
        s = r[name]
        assert s["kind"] == "screener" and not s["oracle"]
        assert s["accuracy"] > 0.7 and s["n_pos"] + s["n_neg"] == 240
        assert s["n_train"] == 240  # its own training set, not the test images
        assert s["roc_auc"] <= oracle["roc_auc"] + 0.01  # nothing beats the oracle
    assert r["rbm"]["params"]["preprocess"]["chain"]
    assert not r["rbm_nopre"]["params"]["preprocess"]["chain"]
    assert not r["cnn"]["params"]["preprocess"]["chain"]
    train = json.loads(next((out / "data" / "B3").glob("*_train/bench_spec.json")).read_text())
    assert train["seed"] == TINY_B3.seed + TRAIN_SEED_OFFSET
    md = (out / "results.md").read_text()
    assert "matched_filter_oracle (oracle)" in md and "| rbm_nopre |" in md
