"""`cryosift run` on a small simulated GroEL-GroES stack; reruns, bad input, real data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import starfile

from cryosift.io import read_star, write_star
from cryosift.pipeline.demo import demo_simulation, shipped_structure
from cryosift.simulate import simulate
from shared_data import SHARED_DATA
from sim_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STAGES = ("normalize", "denoise", "screen", "classify", "evaluate")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 48 px, 5 Å/px stack of 4 views with junk, and a labelled training set."""
    root = tmp_path_factory.mktemp("pipe")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        out = {}
        for name, n, seed in (("data", 320, 0), ("train", 400, 1)):
            cfg = demo_simulation(n, snr=0.1, views=4, seed=seed)
            cfg.box, cfg.pixel_size, cfg.max_shift = 48, 5.0, 1.5
            out[name] = simulate(shipped_structure(), root / name, cfg, command="test").star
    return root, out["data"], out["train"]


def _args(star: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "run", str(star), "-o", str(out), "--denoise", "general", "--classes", "4",
            "--iterations", "4", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    root, star, train = data
    out = tmp_path_factory.mktemp("runs") / "run1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        assert run_cli(_args(star, out, "--screen-labels", str(train))) == 0
    return out


def _stages(out: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads((out / "run.json").read_text())["stages"]}


def test_run_writes_every_stage_and_scores_them(finished):
    stages = _stages(finished)
    assert [s for s in stages] == list(STAGES)
    assert all(s["status"] == "done" for s in stages.values())
    for stage in stages.values():
        for rel in stage["outputs"].values():
            assert (finished / rel).exists(), rel
    m = json.loads((finished / "evaluate" / "metrics.json").read_text())
    den = m["denoise"]
    # the shipped model must make true particles closer to the clean images
    assert den["denoised"]["cc"] > den["raw"]["cc"] + 0.1
    assert m["screen"]["accuracy"] > 0.8 and m["screen"]["roc_auc"] > 0.85
    assert m["classify"]["acc"] > 0.6  # 4 views at SNR 0.1; chance is ~0.25
    matrix = np.array(m["classify"]["confusion"]["matrix"])
    assert matrix.sum() == m["classify"]["n_particles"]
    assert (finished / "report.html").stat().st_size > 10_000
    cfg = (finished / "config.toml").read_text()
    assert 'denoise = "general"' in cfg and "classes = 4" in cfg


def test_outputs_are_relion_star_files(finished, data):
    _, star, _ = data
    n_in = len(read_star(star).particles)
    kept = starfile.read(finished / "screen" / "kept.star", always_dict=True)
    rejected = starfile.read(finished / "screen" / "rejected.star", always_dict=True)
    assert set(kept) == {"optics", "particles"}
    assert len(kept["particles"]) + len(rejected["particles"]) == n_in
    classes = starfile.read(finished / "classify" / "classes.star", always_dict=True)
    parts = classes["particles"]
    assert len(parts) == len(kept["particles"])
    for col in ("rlnImageName", "rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnDefocusU", "rlnOpticsGroup"):
        assert col in parts.columns, col
    assert set(parts["rlnClassNumber"]) <= {1, 2, 3, 4}
    assert classes["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(5.0)
    # kept images point at the normalised stack, which exists relative to the STAR
    name = str(parts["rlnImageName"].iloc[0]).split("@")[1]
    assert (finished / "classify" / name).resolve().is_file()


def test_rerun_reuses_unchanged_stages_and_redoes_changed_ones(finished, data, tmp_path):
    _, star, train = data
    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        assert run_cli(_args(star, out, "--screen-labels", str(train))) == 0
        assert {s["status"] for s in _stages(out).values()} == {"reused"}
        unchanged = [p for p in stamp if p.suffix in (".mrcs", ".star", ".pt")]
        assert all(p.stat().st_mtime_ns == stamp[p] for p in unchanged)
        # a classification parameter changes: the stages before it are reused
        args = _args(star, out, "--screen-labels", str(train))
        args[args.index("--classes") + 1] = "3"
        assert run_cli(args) == 0
    st = _stages(out)
    assert [st[s]["status"] for s in STAGES] == ["reused"] * 3 + ["done"] * 2
    classes = read_star(out / "classify" / "classes.star").particles
    assert set(classes["rlnClassNumber"]) == {1, 2, 3}
    # test-time augmentation changes the denoised images: that stage and the evaluation of
    # them rerun; screening and align2d read the normalised images and are reused
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        assert run_cli([*args, "--denoise-tta"]) == 0
    st = _stages(out)
    assert [st[s]["status"] for s in STAGES] == ["reused", "done", "reused", "reused", "done"]
    assert '"tta": true' in (out / "denoise" / "denoised_filter.json").read_text()
    # so does the SURE output stage, and its fitted blend is recorded beside the output
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        assert run_cli([*args, "--denoise-tta", "--denoise-sure"]) == 0
    st = _stages(out)
    assert [st[s]["status"] for s in STAGES] == ["reused", "done", "reused", "reused", "done"]
    assert '"sure_blend"' in (out / "denoise" / "denoised_filter.json").read_text()


def test_run_denoises_with_the_covariance_wiener_filter(finished, data, tmp_path):
    """--denoise cwf fits the filter on the run's own normalised stack; switching to it from
    the general model reruns only the denoise stage and the evaluation."""
    _, star, train = data
    out = tmp_path / "cwf"
    shutil.copytree(finished, out)
    args = _args(star, out, "--screen-labels", str(train))
    args[args.index("--denoise") + 1] = "cwf"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        assert run_cli(args) == 0
    st = _stages(out)
    assert [st[s]["status"] for s in STAGES] == ["reused", "done", "reused", "reused", "done"]
    assert st["denoise"]["params"]["method"] == "cwf"
    record = json.loads((out / "denoise" / "denoised_filter.json").read_text())
    assert record["parameters"]["filters"][0]["name"] == "cwf"
    den = json.loads((out / "evaluate" / "metrics.json").read_text())["denoise"]
    assert den["denoised"]["cc"] > den["raw"]["cc"] + 0.2  # 4 views: the covariance is low-rank
    assert st["denoise"]["outputs"] == {"star": "denoise/denoised.star"}  # no model trained


def test_run_refuses_a_sure_stage_without_a_network(finished, data, tmp_path, capsys):
    _, star, _ = data
    out = tmp_path / "cwf_sure"
    args = _args(star, out)
    args[args.index("--denoise") + 1] = "cwf"
    assert run_cli([*args, "--denoise-sure"]) == 2
    err = capsys.readouterr().err
    assert "denoise_sure" in err and "cwf" in err and err.strip().count("\n") == 0
    assert not out.exists()  # refused before anything is written


def test_config_file_mirrors_flags_and_rejects_unknown_keys(finished, data, tmp_path, capsys):
    _, star, _ = data
    # the written config reruns the same run (everything reused)
    out = tmp_path / "again"
    shutil.copytree(finished, out)
    cfg = (out / "config.toml").read_text().replace(str(finished), str(out))
    (out / "config.toml").write_text(cfg)
    assert run_cli(["-q", "run", "--config", str(out / "config.toml")]) == 0
    assert {s["status"] for s in _stages(out).values()} == {"reused"}
    bad = tmp_path / "bad.toml"
    bad.write_text('classes = 4\ndenoize = "general"\n')
    assert run_cli(["-q", "run", str(star), "-o", str(tmp_path / "r"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "denoize" in err and len(err.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('classes = "four"\n')
    assert run_cli(["-q", "run", str(star), "-o", str(tmp_path / "r"), "--config", str(wrong)]) == 2
    assert "classes" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_input_is_refused_before_anything_is_written(finished, data, tmp_path, capsys):
    root, star, _ = data
    # another run's folder: refused, nothing touched
    other = tmp_path / "other"
    shutil.copytree(finished, other)
    before = {p: p.stat().st_mtime_ns for p in other.rglob("*")}
    train_star = root / "train" / "particles.star"
    assert run_cli(_args(train_star, other)) == 2
    assert "another run" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in other.rglob("*")} == before
    # a folder of unrelated files
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    assert run_cli(_args(star, junk)) == 2
    assert sorted(os.listdir(junk)) == ["notes.txt"]
    capsys.readouterr()
    # a STAR whose stack is missing
    table = read_star(star)
    parts = table.particles.copy()
    parts["rlnImageName"] = [f"{i + 1}@missing.mrcs" for i in range(len(parts))]
    broken = tmp_path / "broken.star"
    write_star(broken, parts, table.optics)
    assert run_cli(_args(broken, tmp_path / "r1")) == 2
    err = capsys.readouterr().err
    assert "missing.mrcs" in err and len(err.strip().splitlines()) == 1
    # mixed box sizes
    small = tmp_path / "small"
    cfg = demo_simulation(10, snr=0.1, views=2, seed=5)
    cfg.box, cfg.pixel_size = 40, 6.0
    other_star = simulate(shipped_structure(), small, cfg, command="test").star
    mixed = parts.iloc[:4].copy()
    mixed["rlnImageName"] = [f"{i}@{Path(star).parent / 'particles.mrcs'}" for i in (1, 2)] + [
        f"{i}@{Path(other_star).parent / 'particles.mrcs'}" for i in (1, 2)
    ]
    mixed_star = tmp_path / "mixed.star"
    write_star(mixed_star, mixed, table.optics)
    assert run_cli(_args(mixed_star, tmp_path / "r2")) == 2
    assert "box" in capsys.readouterr().err
    # unknown shipped model name, bad threshold
    assert run_cli(_args(star, tmp_path / "r3", "--denoise", "nosuchmodel")) == 2
    assert run_cli(_args(star, tmp_path / "r4", "--threshold", "1.5")) == 2
    capsys.readouterr()
    # a screening training set of another box size, a model for another pixel size
    assert run_cli(_args(star, tmp_path / "r5", "--screen-labels", str(other_star))) == 2
    assert "40 px" in capsys.readouterr().err
    assert run_cli(_args(star, tmp_path / "r6", "--pixel-size", "0.4")) == 2
    assert "Å/px" in capsys.readouterr().err
    for name in ("r1", "r2", "r3", "r4", "r5", "r6"):
        assert not (tmp_path / name).exists()


def test_interrupted_stage_is_rerun(data, tmp_path, monkeypatch):
    _, star, _ = data
    out = tmp_path / "crash"
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    import cryosift.classify.run as classify_run

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(classify_run, "classify_source", boom)
    args = _args(star, out, "--screen", "none")
    args[args.index("--classes") + 1] = "2"
    assert run_cli(args) == 130
    st = _stages(out)
    assert st["classify"]["status"] == "running" and not (out / "classify").exists()
    monkeypatch.undo()
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    assert run_cli(args) == 0
    st = _stages(out)
    assert st["normalize"]["status"] == "reused" and st["classify"]["status"] == "done"
    assert st["screen"]["status"] == "disabled"


@pytest.mark.slow
def test_run_on_real_relion_particles(tmp_path, monkeypatch):
    """The real RELION 3.1 stack in shared/data: N2V trained on it, 2 classes, STARs accepted."""
    star = SHARED_DATA / "particles" / "cryodrgn_tests" / "relion31.star"
    if not star.is_file():
        pytest.skip(f"shared test data not found: {star}")
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    out = tmp_path / "real"
    assert run_cli(["-q", "run", str(star), "-o", str(out), "--denoise-epochs", "1",
                    "--denoise-steps-per-epoch", "4", "--classes", "2", "--device", "cpu"]) == 0
    st = _stages(out)
    assert st["denoise"]["status"] == "done" and st["denoise"]["params"]["method"] == "n2v"
    assert st["screen"]["status"] == "disabled" and st["evaluate"]["status"] == "disabled"
    classes = starfile.read(out / "classify" / "classes.star", always_dict=True)
    assert len(classes["particles"]) == 5
    assert classes["optics"]["rlnImagePixelSize"].iloc[0] == pytest.approx(2.806, abs=1e-3)
    den = starfile.read(out / "denoise" / "denoised.star", always_dict=True)
    assert len(den["particles"]) == 5
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    out = tmp_path / "demo"
    assert run_cli(["-q", "demo", "-o", str(out), "--n-images", "400", "--n-train", "400",
                    "--views", "4", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'run' / 'report.html'}" in printed
    assert "screening (CNN): accuracy" in printed and "ACC" in printed
    m = json.loads((out / "run" / "evaluate" / "metrics.json").read_text())
    assert m["screen"]["accuracy"] > 0.85
    assert m["classify"]["acc"] > 0.7
    assert m["denoise"]["denoised"]["cc"] > m["denoise"]["raw"]["cc"]
