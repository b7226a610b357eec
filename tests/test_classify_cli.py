"""`cryosift classify`: outputs (STAR round trip, averages, montage, stats), --select, bad input."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from cryosift.io import open_source, read_star
from cryosift.metrics import clustering_accuracy
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("clsim")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(n_images=200, box=40, pixel_size=4.8, snr=0.2, views=4,
                               in_plane=True, max_shift=1.0, seed=11)
        res = simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    return res


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")


def _classify(sim, out, *extra):
    return run_cli(["classify", str(sim.star), "-o", str(out), *extra])


def test_kmeans_outputs_round_trip(sim, tmp_path):
    out = tmp_path / "km"
    assert _classify(sim, out, "-k", "3", "--method", "kmeans", "--features", "raw",
                     "--no-phase-flip") == 0
    table = read_star(out / "classes.star")
    parts = table.particles
    assert len(parts) == 200 and table.optics is not None
    assert float(table.optics["rlnImagePixelSize"].iloc[0]) == pytest.approx(4.8)
    sizes = parts["rlnClassNumber"].value_counts().sort_index()
    assert list(sizes.index) == [1, 2, 3]
    assert list(sizes) == sorted(sizes, reverse=True)  # class 1 is the largest
    # the STAR still points at the input images, from the new folder
    np.testing.assert_array_equal(
        open_source(out / "classes.star").images(slice(None)),
        open_source(sim.star).images(slice(None)),
    )
    assert "cryosiftTrueView" in parts.columns  # input columns kept
    with mrcfile.open(out / "class_averages.mrcs", permissive=True) as m:
        avgs = np.asarray(m.data)
        assert avgs.shape == (3, 40, 40)
        assert float(m.voxel_size.x) == pytest.approx(4.8)
    stats = json.loads((out / "class_stats.json").read_text())
    assert [c["size"] for c in stats["classes"]] == list(sizes)
    assert (out / "class_stats.csv").read_text().startswith("class,size")
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prov = json.loads((out / "classify.json").read_text())
    assert prov["parameters"]["k"] == 3 and prov["parameters"]["method"] == "kmeans"
    # class averages are the means of their members (not phase-flipped: --no-phase-flip)
    assert "ctf_phase_flip" not in prov["parameters"]
    imgs = open_source(sim.star).images(slice(None))
    lab = parts["rlnClassNumber"].to_numpy()
    np.testing.assert_allclose(avgs[0], imgs[lab == 1].mean(0), atol=1e-4)
    assert not list(out.glob(".classify-*"))  # no temporary folder left


def test_align2d_writes_poses_and_finds_the_views(sim, tmp_path):
    out = tmp_path / "a2d"
    assert _classify(sim, out, "-k", "4", "--method", "align2d", "--psi-step", "10") == 0
    parts = read_star(out / "classes.star").particles
    truth = read_star(sim.star).particles
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert col in parts.columns
    assert np.all(np.abs(parts["rlnAnglePsi"]) <= 180)
    assert np.abs(parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()).max() <= 4 * 4.8 + 1
    assert clustering_accuracy(truth["cryosiftTrueView"], parts["rlnClassNumber"]) > 0.9
    stats = json.loads((out / "class_stats.json").read_text())
    assert "psi_circular_std_deg" in stats["classes"][0]
    prov = json.loads((out / "classify.json").read_text())
    assert prov["parameters"]["ctf_phase_flip"]  # the simulated STAR has CTF parameters


def test_align2d_search_options_reach_the_classifier(sim, tmp_path):
    out = tmp_path / "hard"
    assert _classify(sim, out, "-k", "4", "--method", "align2d", "--assignment", "hard",
                     "--candidates", "0", "--init-images", "0", "--iterations", "4") == 0
    parts = read_star(out / "classes.star").particles
    truth = read_star(sim.star).particles
    assert clustering_accuracy(truth["cryosiftTrueView"], parts["rlnClassNumber"]) > 0.9
    params = json.loads((out / "classify.json").read_text())["parameters"]
    assert params["assignment"] == "hard"
    assert params["candidates"] == 4  # 0 means every class: all 4 searched
    assert _classify(sim, tmp_path / "bad", "-k", "4", "--method", "align2d",
                     "--candidates", "-1") != 0
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_mrcs_input_and_other_methods(sim, tmp_path):
    stack = sim.star.parent / "particles.mrcs"
    out = tmp_path / "hc"
    assert run_cli(["classify", str(stack), "-k", "4", "--method", "hierarchical",
                    "--features", "rotinv", "-o", str(out)]) == 0
    parts = read_star(out / "classes.star").particles
    assert parts["rlnImageName"].iloc[0].startswith("1@")
    assert len(open_source(out / "classes.star")) == 200
    feats = tmp_path / "f.npy"
    np.save(feats, np.random.default_rng(0).normal(size=(200, 5)).astype(np.float32))
    assert _classify(sim, tmp_path / "npy", "-k", "2", "--features", str(feats)) == 0
    assert _classify(sim, tmp_path / "bsk", "-k", "4", "--method", "bskmeans") == 0
    assert _classify(sim, tmp_path / "reg", "-k", "4", "--method", "pca+hc") == 0


def test_select_writes_the_chosen_classes(sim, tmp_path):
    out = tmp_path / "km"
    assert _classify(sim, out, "-k", "4", "--features", "pca") == 0
    sub = tmp_path / "elsewhere" / "sub.star"
    assert run_cli(["classify", str(out / "classes.star"), "--select", "1,3", "-o", str(sub)]) == 0
    full = read_star(out / "classes.star").particles
    kept = read_star(sub).particles
    assert len(kept) == int(full["rlnClassNumber"].isin([1, 3]).sum())
    assert set(kept["rlnClassNumber"]) == {1, 3}
    # image paths still resolve from the new folder
    assert open_source(sub).images(slice(None)).shape == (len(kept), 40, 40)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-k", "201"], "larger than the number of images"),
        (["-k", "1"], "at least 2"),
        (["--method", "nonsense", "-k", "3"], "unknown --method"),
        (["-k", "3", "--features", "BADSHAPE"], "rows"),
        (["-k", "3", "--features", "BAD2D"], "2-D"),
        (["-k", "3", "--features", "nonsense"], "unknown features"),
        ([], "-k"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(sim, tmp_path, capsys, args, message):
    np.save(tmp_path / "badshape.npy", np.zeros((199, 4), np.float32))
    np.save(tmp_path / "bad2d.npy", np.zeros((200,), np.float32))
    args = [a.replace("BADSHAPE", str(tmp_path / "badshape.npy"))
            .replace("BAD2D", str(tmp_path / "bad2d.npy")) for a in args]
    out = tmp_path / "out"
    capsys.readouterr()
    assert _classify(sim, out, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_bad_select_one_line_exit_2_no_output(sim, tmp_path, capsys):
    out = tmp_path / "km"
    assert _classify(sim, out, "-k", "3") == 0
    sub = tmp_path / "sub.star"
    capsys.readouterr()
    for sel in ("2,7", "x"):
        assert run_cli(["classify", str(out / "classes.star"), "--select", sel,
                        "-o", str(sub)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--select" in err[0], err
        assert not sub.exists()
    # an unclassified STAR has no classes to select
    assert run_cli(["classify", str(sim.star), "--select", "1", "-o", str(sub)]) == 2
    assert "rlnClassNumber" in capsys.readouterr().err
    assert not sub.exists()
