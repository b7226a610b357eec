"""`cryosift simulate` on bad input: exit code 2, one line on stderr naming the file (or the
option) and the problem, and no stack or STAR left in the output folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sim_helpers import data_file, run_cli

GOOD = ["--n-images", "8", "--box", "48", "--pixel-size", "4", "--seed", "0"]


@pytest.fixture(autouse=True)
def _no_progress(monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")


def run_failing(capsys, model: Path | str, out: Path, *extra: str) -> str:
    """Run the CLI quietly (-q: no info log lines), expect exit code 2 and exactly one line on
    stderr in the CLI's error format; return that line. Nothing may be written to stdout, and
    the output folder (hidden staging folders included) must hold no stack or STAR."""
    rc = run_cli(["-q", "simulate", str(model), "-o", str(out), *GOOD, *extra])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("cryosift: error: ")
    assert captured.out == ""
    if out.exists():
        left = [p for p in out.rglob("*") if p.suffix in (".mrcs", ".star", ".mrc")]
        assert not left, left
    return lines[0]


def test_unknown_structure_suffix(capsys, tmp_path):
    model = tmp_path / "model.txt"
    model.write_text("ATOM      1  CA  ALA A   1       0.000   0.000   0.000\n")
    line = run_failing(capsys, model, tmp_path / "out")
    assert "model.txt" in line and "unknown structure format" in line


def test_missing_structure(capsys, tmp_path):
    line = run_failing(capsys, tmp_path / "nothere.pdb", tmp_path / "out")
    assert "nothere.pdb" in line and "not found" in line


@pytest.mark.parametrize(
    "content",
    [b"this is not a PDB file\njust some text\n", bytes(range(256)) * 8],
    ids=["text", "binary"],
)
def test_corrupt_pdb(capsys, tmp_path, content):
    """gemmi reads garbage text (and binary noise) as a PDB with no atoms: 'holds no atoms'."""
    model = tmp_path / "broken.pdb"
    model.write_bytes(content)
    line = run_failing(capsys, model, tmp_path / "out")
    assert "broken.pdb" in line and ("no atoms" in line or "cannot read" in line)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.pdb", b""),
        ("broken.cif", b"garbage here\n"),
        ("noatoms.cif", b"data_x\nloop_\n_atom_site.id\n1 2 3\n"),
    ],
)
def test_corrupt_or_empty_models(capsys, tmp_path, name, content):
    model = tmp_path / name
    model.write_bytes(content)
    line = run_failing(capsys, model, tmp_path / "out")
    assert name in line


def test_truncated_gzipped_model(capsys, tmp_path):
    src = data_file("structures", "1aon.pdb.gz")
    model = tmp_path / "truncated.pdb.gz"
    model.write_bytes(src.read_bytes()[:3000])
    line = run_failing(capsys, model, tmp_path / "out")
    assert "truncated.pdb.gz" in line


def test_corrupt_gzipped_cif(capsys, tmp_path):
    model = tmp_path / "broken.cif.gz"
    model.write_bytes(b"\x1f\x8b\x08\x00garbage that is not deflate data")
    line = run_failing(capsys, model, tmp_path / "out")
    assert "broken.cif.gz" in line


def test_box_too_small_for_the_structure(capsys, tmp_path):
    """GroEL (radius ~115 Å) in a 32-px box at 1.5 Å/px (48 Å)."""
    model = data_file("structures", "1aon.pdb.gz")
    line = run_failing(capsys, model, tmp_path / "out", "--box", "32", "--pixel-size", "1.5")
    assert "1aon.pdb.gz" in line and "too small" in line


def test_map_without_voxel_size_needs_pixel_size(capsys, tmp_path):
    model = data_file("maps", "clean70SRibosome_vol_65p.mrc")
    rc = run_cli(["-q", "simulate", str(model), "-o", str(tmp_path / "out"), "--n-images", "4",
                  "--box", "64"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert model.name in err[0] and "--pixel-size" in err[0]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--box", "33"], ["--box", "33"]),
        (["--box", "4"], ["--box"]),
        (["--snr", "-1"], ["--snr"]),
        (["--snr", "0"], ["--snr"]),
        (["--snr", "nan"], ["--snr"]),
        (["--junk-fraction", "1.5"], ["--junk-fraction"]),
        (["--junk-fraction", "0.2", "--junk-types", "noise,dust"], ["junk-types", "dust"]),
        (["--views", "3", "--view-weights", "1,2"], ["--view-weights"]),
        (["--view-weights", "1,2"], ["--view-weights"]),  # weights without --views
        (["--views", "2", "--view-weights", "1,x"], ["--view-weights"]),
        (["--views", "2", "--view-angles", "0,10;5"], ["--view-angles"]),
        (["--max-shift", "-1"], ["--max-shift"]),
        (["--defocus-range", "2", "1"], ["--defocus-range"]),
        (["--amplitude-contrast", "1"], ["--amplitude-contrast"]),
        (["--n-images", "0"], ["--n-images"]),
        (["--pixel-size", "-2"], ["--pixel-size"]),
        (["--noise", "poisson", "--dose", "0"], ["--dose"]),
    ],
)
def test_bad_options(capsys, tmp_path, extra, words):
    model = data_file("structures", "5F9R.pdb")
    line = run_failing(capsys, model, tmp_path / "out", *extra)
    for w in words:
        assert w in line, (w, line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_on_a_cpu_only_machine(capsys, tmp_path):
    """No silent fallback to the CPU (SPEC): the user asked for CUDA."""
    model = data_file("structures", "5F9R.pdb")
    line = run_failing(capsys, model, tmp_path / "out", "--device", "cuda")
    assert "cuda" in line.lower() and "not available" in line


def test_unknown_device(capsys, tmp_path):
    model = data_file("structures", "5F9R.pdb")
    line = run_failing(capsys, model, tmp_path / "out", "--device", "tpu")
    assert "tpu" in line


def test_images_without_any_signal_leave_no_output(capsys, tmp_path):
    """Only pure-noise junk: the failure comes after the clean stack was written to the staging
    folder; the staging folder must be gone and nothing published."""
    model = data_file("structures", "5F9R.pdb")
    out = tmp_path / "out"
    line = run_failing(capsys, model, out, "--junk-fraction", "1", "--junk-types", "noise")
    assert "signal" in line
    assert not any(out.iterdir()) if out.exists() else True


def test_existing_outputs_survive_a_failed_run(capsys, tmp_path):
    """A failing run into a folder that already holds a dataset leaves that dataset untouched."""
    model = data_file("structures", "5F9R.pdb")
    out = tmp_path / "out"
    assert run_cli(["-q", "simulate", str(model), "-o", str(out), *GOOD]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc = run_cli(["-q", "simulate", str(model), "-o", str(out), *GOOD, "--junk-fraction", "1",
                  "--junk-types", "noise"])  # fmt: skip
    assert rc == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
