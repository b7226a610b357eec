"""`cryosift screen train` / `apply` end to end on tiny simulated SpCas9 vs noise images, the
three ways of giving a training set, and every bad input of the issue (one line, exit 2, no
partial output)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cryosift.io import (
    image_names,
    make_optics_table,
    open_source,
    read_star,
    write_mrcs,
    write_star,
)
from sim_helpers import run_cli
from test_screen_train import simulate_screening_set

FAST_RBM = ["--method", "rbm", "--epochs", "10", "--hidden", "64", "--device", "cpu"]
FAST_CNN = ["--method", "cnn", "--epochs", "3", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny networks gain nothing from threads, and oversubscribed CPUs lose a lot to them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("screen_cli")
    simulate_screening_set(root / "train", 400, seed=1)
    simulate_screening_set(root / "test", 300, seed=2)
    return root


@pytest.fixture(scope="module")
def rbm_model(data):
    code = run_cli(["-q", "screen", "train", "--labels", str(data / "train" / "particles.star"),
                    *FAST_RBM, "-o", str(data / "rbm_model")])
    assert code == 0
    return data / "rbm_model"


def _fails(capsys, argv, *fragments, absent=()):
    code = run_cli(["-q", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("cryosift: error:"), err
    for f in fragments:
        assert f in err, err
    for p in absent:
        assert not p.exists(), f"{p} left behind"
    return err


def test_train_apply_partition_round_trips_through_star(data, rbm_model, tmp_path):
    assert {"model.pt", "model.json", "screen_train.json"} <= {
        p.name for p in rbm_model.iterdir()}
    meta = json.loads((rbm_model / "model.json").read_text())
    assert meta["method"] == "rbm" and meta["box"] == 32 and meta["preprocess"]["chain"]
    out = tmp_path / "screened"  # not the input's folder: image paths must be re-pointed
    star_in = data / "test" / "particles.star"
    assert run_cli(["-q", "screen", "apply", str(star_in), "--model", str(rbm_model),
                    "-o", str(out), "--device", "cpu"]) == 0
    for name in ("scores.star", "kept.star", "rejected.star", "score_histogram.png",
                 "montage.png", "screen_apply.json"):
        assert (out / name).is_file(), name
    src = read_star(star_in).particles
    scores = read_star(out / "scores.star").particles
    kept = read_star(out / "kept.star").particles
    rejected = read_star(out / "rejected.star").particles
    assert len(scores) == len(src) and len(kept) + len(rejected) == len(src)
    key = "cryosiftTrueView" if "cryosiftTrueView" in src.columns else "rlnAngleRot"
    ids = lambda t: list(zip(t["rlnImageName"].str.split("@").str[0], t[key], strict=True))  # noqa: E731
    assert sorted(ids(kept) + ids(rejected)) == sorted(ids(src))  # a partition of the input
    s = scores["cryosiftParticleScore"].to_numpy()
    assert 0 <= s.min() and s.max() <= 1
    assert (kept["cryosiftParticleScore"] >= 0.5).all()
    assert (rejected["cryosiftParticleScore"] < 0.5).all()
    truth = src["cryosiftIsParticle"].to_numpy().astype(bool)
    assert ((s >= 0.5) == truth).mean() > 0.85
    # the kept STAR reads the same pixels as the input rows it keeps, from another folder
    in_imgs = open_source(star_in).images(np.flatnonzero(s >= 0.5)[:5])
    np.testing.assert_array_equal(open_source(out / "kept.star").images(slice(0, 5)), in_imgs)
    assert read_star(out / "kept.star").optics.equals(read_star(star_in).optics)
    record = json.loads((out / "screen_apply.json").read_text())
    assert record["n_kept"] == len(kept) and record["threshold"] == 0.5


def test_keep_fraction_and_bare_stack_input(data, rbm_model, tmp_path):
    out = tmp_path / "frac"
    stack = data / "test" / "particles.mrcs"
    assert run_cli(["-q", "screen", "apply", str(stack), "--model", str(rbm_model), "-o",
                    str(out), "--keep-fraction", "0.3", "--chunk-size", "64"]) == 0
    kept = read_star(out / "kept.star").particles
    assert len(kept) == 90 and len(read_star(out / "rejected.star").particles) == 210
    assert read_star(out / "scores.star").optics["rlnImagePixelSize"].iloc[0] == 6.0
    np.testing.assert_array_equal(open_source(out / "scores.star").images(slice(0, 3)),
                                  open_source(stack).images(slice(0, 3)))


def test_cnn_from_two_stacks_and_rbm_from_good_classes(data, tmp_path):
    table = read_star(data / "train" / "particles.star")
    parts, optics = table.particles, table.optics
    truth = parts["cryosiftIsParticle"].astype(bool)
    train_dir = data / "train"  # the new STAR files sit beside the stack they point at
    write_star(train_dir / "pos.star", parts[truth], optics)
    write_star(train_dir / "neg.star", parts[~truth], optics)
    assert run_cli(["-q", "screen", "train", "--positives", str(train_dir / "pos.star"),
                    "--negatives", str(train_dir / "neg.star"), *FAST_CNN, "--max-per-class", "120",
                    "-o", str(tmp_path / "cnn")]) == 0
    assert not json.loads((tmp_path / "cnn" / "model.json").read_text())["preprocess"]["chain"]
    out = tmp_path / "cnn_out"
    assert run_cli(["-q", "screen", "apply", str(data / "test" / "particles.star"),
                    "--model", str(tmp_path / "cnn"), "-o", str(out), "--threshold", "0.5"]) == 0
    s = read_star(out / "scores.star").particles
    acc = ((s["cryosiftParticleScore"] >= 0.5) == s["cryosiftIsParticle"].astype(bool)).mean()
    assert acc > 0.7
    # 2D classes: particles in classes 1 and 3, junk split over 2 and 4
    classes = parts.copy()
    rng = np.random.default_rng(0)
    classes["rlnClassNumber"] = np.where(truth, rng.choice([1, 3], len(truth)),
                                         rng.choice([2, 4], len(truth)))
    write_star(train_dir / "classes.star", classes, optics)
    assert run_cli(["-q", "screen", "train", str(train_dir / "classes.star"), "--good-classes",
                    "1,3", "--bad-classes", "2", *FAST_RBM, "--epochs", "2",
                    "-o", str(tmp_path / "gc")]) == 0
    record = json.loads((tmp_path / "gc" / "screen_train.json").read_text())
    n2 = int((classes["rlnClassNumber"] == 2).sum())
    assert record["training_set"]["particles"] == int(truth.sum())
    assert record["training_set"]["junk"] == n2


def test_bad_training_input(data, tmp_path, capsys):
    table = read_star(data / "train" / "particles.star")
    ones = table.particles.copy()
    ones["cryosiftIsParticle"] = 1
    write_star(data / "train" / "ones.star", ones, table.optics)
    model = tmp_path / "m"
    _fails(capsys, ["screen", "train", "--labels", str(data / "train" / "ones.star"), *FAST_RBM,
                    "-o", str(model)], "only one class", absent=[model])
    _fails(capsys, ["screen", "train", "--labels", str(data / "train" / "particles.star"),
                    "--label-column", "nope", *FAST_RBM, "-o", str(model)], "_nope",
           absent=[model])
    _fails(capsys, ["screen", "train", *FAST_RBM, "-o", str(model)], "exactly one training set",
           absent=[model])
    write_mrcs(tmp_path / "big.mrcs", np.zeros((4, 48, 48), np.float32), 6.0)
    _fails(capsys, ["screen", "train", "--positives", str(data / "train" / "particles.mrcs"),
                    "--negatives", str(tmp_path / "big.mrcs"), *FAST_RBM, "-o", str(model)],
           "same box size", absent=[model])
    _fails(capsys, ["screen", "train", str(data / "train" / "particles.star"), "--good-classes",
                    "1", *FAST_RBM, "-o", str(model)], "_rlnClassNumber", absent=[model])


def test_bad_apply_input(data, rbm_model, tmp_path, capsys):
    star = str(data / "test" / "particles.star")
    out = tmp_path / "out"
    for flag, value, msg in (("--threshold", "1.5", "[0, 1]"), ("--threshold", "-0.1", "[0, 1]"),
                             ("--keep-fraction", "0", "(0, 1]")):
        _fails(capsys, ["screen", "apply", star, "--model", str(rbm_model), "-o", str(out),
                        flag, value], msg, absent=[out])
    _fails(capsys, ["screen", "apply", star, "--model", str(rbm_model), "-o", str(out),
                    "--threshold", "0.5", "--keep-fraction", "0.5"], "not both", absent=[out])
    # images of another box size than the model's
    big = tmp_path / "big.mrcs"
    write_mrcs(big, np.random.default_rng(0).normal(size=(6, 48, 48)).astype(np.float32), 6.0)
    _fails(capsys, ["screen", "apply", str(big), "--model", str(rbm_model), "-o", str(out)],
           "trained on 32 px", absent=[out])
    _fails(capsys, ["screen", "apply", star, "--model", str(tmp_path / "none"), "-o", str(out)],
           "not found", absent=[out])
    # a model file for another architecture, another box, corrupt, or not a screener
    payload = torch.load(rbm_model / "model.pt", weights_only=True)
    cases = {}
    arch = {**payload, "meta": {**payload["meta"],
                                "architecture": {**payload["meta"]["architecture"],
                                                 "n_hidden": 32}}}
    cases["arch"] = (arch, "do not fit")
    box = {**payload, "meta": {**payload["meta"], "box": 24}}  # below the 32 px work box
    cases["box"] = (box, "does not match its recorded box")
    cnn = {**payload, "meta": {**payload["meta"], "method": "cnn",
                               "architecture": {"widths": [8, 16]}}}
    cases["cnn"] = (cnn, "do not fit")
    cases["other"] = ({"format": "cryosift-denoiser", "meta": {}, "state_dict": {}},
                      "not a cryosift screening model")
    for name, (obj, msg) in cases.items():
        folder = tmp_path / f"bad_{name}"
        folder.mkdir()
        torch.save(obj, folder / "model.pt")
        _fails(capsys, ["screen", "apply", star, "--model", str(folder), "-o", str(out)], msg,
               absent=[out])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.pt").write_bytes((rbm_model / "model.pt").read_bytes()[:200])
    _fails(capsys, ["screen", "apply", star, "--model", str(corrupt), "-o", str(out)],
           "corrupt", absent=[out])


def test_apply_refuses_to_overwrite_its_input(data, rbm_model, tmp_path, capsys):
    folder = tmp_path / "same"
    folder.mkdir()
    imgs = open_source(data / "test" / "particles.mrcs").images(slice(0, 8))
    write_mrcs(folder / "p.mrcs", imgs, 6.0)
    write_star(folder / "kept.star", pd.DataFrame({"rlnImageName": image_names(8, "p.mrcs")}),
               make_optics_table(6.0, 32))
    before = (folder / "kept.star").read_bytes()
    _fails(capsys, ["screen", "apply", str(folder / "kept.star"), "--model", str(rbm_model),
                    "-o", str(folder)], "overwrite an input")
    assert (folder / "kept.star").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["kept.star", "p.mrcs"]
