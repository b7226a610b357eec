"""`cryosift denoise cwf`: the covariance Wiener filter on a stack, streamed, from the CLI.

The command must give what the library filter gives on the same images (the stack is only read
in chunks), keep the pixel size and every STAR column, use the STAR's CTFs unless told not to,
beat the best Gaussian low-pass on a 10-view stack, and refuse bad input in one line with
nothing written.
"""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from cryosift.denoise.cwf import cwf_denoise
from cryosift.io import merged_metadata, open_source, read_star
from cryosift.metrics import psnr
from cryosift.simulate import SimulationConfig, simulate
from sim_helpers import data_file, run_cli
from test_denoise_cwf import best_lowpass

BOX, PIXEL = 48, 4.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """SpCas9, 10 views with in-plane rotations and CTF, 400 images at SNR 0.05."""
    out = tmp_path_factory.mktemp("cwf_cli")
    cfg = SimulationConfig(n_images=400, box=BOX, pixel_size=PIXEL, snr=0.05, views=10,
                           ctf=True, in_plane=True, seed=21)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CRYOSIFT_NO_PROGRESS", "1")
        res = simulate(data_file("structures", "5F9R.pdb"), out, cfg)
    return res.star, res.clean


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")


def _run(args, capsys):
    code = run_cli(["-q", "denoise", "cwf", *map(str, args)])
    return code, capsys.readouterr().err


def test_cli_gives_the_library_filter_streamed_and_keeps_the_metadata(stack, tmp_path, capsys):
    star, clean_path = stack
    out = tmp_path / "cwf" / "den.star"
    code, err = _run([star, "-o", out, "--chunk-size", "96"], capsys)
    assert code == 0, err
    den = open_source(out)
    assert den.pixel_size == pytest.approx(PIXEL) and len(den) == 400
    result = den.images(slice(None))

    noisy = open_source(star).images(slice(None))
    meta = merged_metadata(read_star(star))
    expected = cwf_denoise(noisy, ctf=meta, pixel_size=PIXEL, chunk=96, rotation_invariant=True)
    np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)

    table = read_star(out)
    assert table.particles["rlnDefocusU"].tolist() == read_star(star).particles[
        "rlnDefocusU"].tolist()
    record = json.loads(out.with_name("den_filter.json").read_text())
    (filt,) = record["parameters"]["filters"]
    assert filt["name"] == "cwf" and filt["ctf"] is True and filt["n_fit_images"] == 400
    # with CTFs only the rotation-invariant covariance exists: "auto" takes it, untested
    assert filt["rotation_invariant"] == "auto" and filt["rotation_invariant_fitted"] is True
    assert "sure_risk" not in filt

    clean = open_source(clean_path).images(slice(None))
    gain = float(np.mean(psnr(result, clean)))
    assert gain > best_lowpass(noisy, clean) + 1.0  # pools the stack's 10 views


def test_no_ctf_and_subset_fit_change_what_is_fitted(stack, tmp_path, capsys):
    star, _ = stack
    full = tmp_path / "a.star"
    blind = tmp_path / "b.star"
    subset = tmp_path / "c.star"
    assert _run([star, "-o", full], capsys)[0] == 0
    assert _run([star, "-o", blind, "--no-ctf"], capsys)[0] == 0
    assert _run([star, "-o", subset, "--max-fit-images", "150", "--seed", "2"], capsys)[0] == 0
    a, b, c = (open_source(p).images(slice(None)) for p in (full, blind, subset))
    assert not np.allclose(a, b, atol=1e-3) and not np.allclose(a, c, atol=1e-3)
    rec_b = json.loads(blind.with_name("b_filter.json").read_text())["parameters"]["filters"][0]
    rec_c = json.loads(subset.with_name("c_filter.json").read_text())["parameters"]["filters"][0]
    assert rec_b["ctf"] is False and rec_c["n_fit_images"] == 150
    # without CTFs "auto" scored both covariances (rotated views: the invariant one wins)
    assert set(rec_b["sure_risk"]) == {"rotation_invariant", "plain"}
    assert rec_b["rotation_invariant_fitted"] is True


def test_bad_input_is_refused_in_one_line_with_nothing_written(stack, tmp_path, capsys):
    star, _ = stack
    noisy = open_source(star).images(slice(0, 60))
    with mrcfile.new(tmp_path / "nopx.mrcs") as m:
        m.set_data(noisy)
        m.set_image_stack()  # voxel size 0: unknown
    out = tmp_path / "o" / "x.star"
    code, err = _run([tmp_path / "nopx.mrcs", "-o", out], capsys)
    assert code == 2 and "pixel size" in err and "nopx.mrcs" in err and err.count("\n") == 1
    assert not out.parent.exists() or not any(out.parent.iterdir())

    bad = noisy.copy()
    bad[7, 3, 3] = np.nan
    with mrcfile.new(tmp_path / "nan.mrcs") as m:
        m.set_data(bad)
        m.set_image_stack()
        m.voxel_size = PIXEL
    code, err = _run([tmp_path / "nan.mrcs", "-o", out], capsys)
    assert code == 2 and "NaN" in err and "nan.mrcs" in err and err.count("\n") == 1
    assert not out.parent.exists() or not any(out.parent.iterdir())

    code, err = _run([star, "-o", out, "--covariance", "plain"], capsys)  # plain has no CTF
    assert code == 2 and "CTF" in err and err.count("\n") == 1
    assert not out.parent.exists() or not any(out.parent.iterdir())
