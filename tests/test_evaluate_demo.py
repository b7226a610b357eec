"""`cryosift evaluate` (reference, halves, truth) through the CLI (the demo: test_pipeline_run)."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from cryosift.io import read_star, write_star
from cryosift.metrics.image import psnr
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("ev")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        cfg = SimulationConfig(
            n_images=200,
            box=40,
            pixel_size=5.0,
            snr=0.2,
            views=3,
            in_plane=False,
            junk_fraction=0.25,
            pairs=True,
            seed=9,
        )
        simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    return out


def test_evaluate_against_reference(sim, tmp_path, capsys):
    out = tmp_path / "raw.json"
    assert (
        run_cli(
            [
                "-q",
                "evaluate",
                str(sim / "particles.star"),
                "--reference",
                str(sim / "clean.mrcs"),
                "-o",
                str(out),
            ]
        )
        == 0
    ), capsys.readouterr().err
    r = json.loads(out.read_text())
    star = read_star(sim / "particles.star").particles
    keep = star["cryosiftIsParticle"].to_numpy().astype(bool)
    with mrcfile.open(sim / "particles.mrcs") as a, mrcfile.open(sim / "clean.mrcs") as c:
        expected = float(np.mean(psnr(a.data[keep].astype(np.float64), c.data[keep])))
    assert r["n_images"] == keep.sum()  # particles only by default
    assert r["psnr"] == pytest.approx(expected, abs=1e-6)
    assert 2 * 5.0 <= r["frc_resolution_A"] <= 40 * 5.0
    assert {"si_psnr", "cc", "ssim", "provenance"} <= set(r)
    assert (tmp_path / "raw_frc.png").stat().st_size > 1000


def test_evaluate_halves_estimates_the_snr(sim, tmp_path):
    out = tmp_path / "halves.json"
    assert (
        run_cli(
            [
                "-q",
                "evaluate",
                str(sim / "particles.mrcs"),
                "--half-b",
                str(sim / "particles_b.mrcs"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    true = json.loads((sim / "simulation.json").read_text())["measured_snr"]
    # junk images (a quarter, at similar signal level) are included here: the estimate tracks
    # the stack's signal variance; 200 images x 1600 px gives ~1 % noise on each variance
    assert r["snr"] == pytest.approx(true, rel=0.25)
    assert r["frc_threshold"] == 0.143 and len(r["frc"]["ssnr"]) == 21


def test_evaluate_labels_against_truth(sim, tmp_path):
    table = read_star(sim / "particles.star")
    parts = table.particles.copy()
    view = parts["cryosiftTrueView"].to_numpy()
    parts["rlnClassNumber"] = np.where(view >= 0, (view + 1) % 3 + 1, 1)  # a relabelling: ACC 1
    parts["cryosiftParticleScore"] = parts["cryosiftIsParticle"].to_numpy() * 0.8 + 0.1
    sub = tmp_path / "sub"
    sub.mkdir()
    parts["rlnImageName"] = [
        f"{n.split('@')[0]}@{sim / 'particles.mrcs'}" for n in table.particles["rlnImageName"]
    ]
    write_star(sub / "labels.star", parts.iloc[::2], table.optics)  # a subset, matched by name
    out = tmp_path / "labels.json"
    assert (
        run_cli(
            [
                "-q",
                "evaluate",
                str(sub / "labels.star"),
                "--truth",
                str(sim / "particles.star"),
                "-o",
                str(out),
            ]
        )
        == 0
    )
    r = json.loads(out.read_text())
    assert r["clustering"]["acc"] == pytest.approx(1.0)
    assert r["screening"]["accuracy"] == pytest.approx(1.0) and r["screening"]["roc_auc"] == 1.0


def test_evaluate_refuses_bad_requests(sim, tmp_path, capsys):
    out = tmp_path / "x.json"
    assert run_cli(["evaluate", str(sim / "particles.mrcs"), "-o", str(out)]) == 2
    assert "exactly one" in capsys.readouterr().err
    assert (
        run_cli(
            [
                "evaluate",
                str(sim / "particles.mrcs"),
                "--reference",
                str(tmp_path / "missing.mrcs"),
                "-o",
                str(out),
            ]
        )
        == 2
    )
    assert "missing.mrcs" in capsys.readouterr().err
    assert not out.exists()
