"""Streaming filters over STAR files and stacks (apply_filter_to_source), chains, and the
`cryosift filter` command line: outputs, metadata, order, bad input, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryosift.errors import CryosiftError, InputError
from cryosift.filters import BatchContext, FilterChain, apply_filter_to_source, make_filter
from cryosift.io import (
    image_names,
    make_optics_table,
    merged_metadata,
    open_source,
    read_mrc_info,
    read_star,
    write_mrcs,
    write_star,
)
from sim_helpers import run_cli

N, BOX, PX = 10, 32, 2.5


def _images(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:BOX, :BOX] - BOX // 2
    blob = 3 * np.exp(-(xx**2 + yy**2) / 30.0)
    return (rng.normal(size=(N, BOX, BOX)) + blob + np.arange(N)[:, None, None]).astype(np.float32)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """data/particles.star (RELION 3.1, CTF columns, extra columns) -> data/particles.mrcs."""
    data = tmp_path / "data"
    data.mkdir()
    write_mrcs(data / "particles.mrcs", _images(), PX)
    write_mrcs(data / "clean.mrcs", _images(1), PX)
    rng = np.random.default_rng(3)
    parts = pd.DataFrame(
        {
            "rlnImageName": image_names(N, "particles.mrcs"),
            "cryosiftCleanImageName": image_names(N, "clean.mrcs"),
            "rlnAngleRot": rng.uniform(0, 360, N),
            "rlnDefocusU": rng.uniform(1e4, 2e4, N),
            "rlnDefocusV": rng.uniform(1e4, 2e4, N),
            "rlnDefocusAngle": rng.uniform(0, 180, N),
            "cryosiftIsParticle": np.arange(N) % 2,
            "rlnOpticsGroup": 1,
        }
    )
    write_star(data / "particles.star", parts, make_optics_table(PX, BOX))
    return data / "particles.star"


@pytest.fixture
def no_ctf_star(dataset) -> Path:
    table = read_star(dataset)
    parts = table.particles.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
    path = dataset.with_name("noctf.star")
    write_star(path, parts, table.optics)
    return path


def _files(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


# ------------------------------------------------------------------------------------ library


def test_round_trip_keeps_metadata_and_pixel_size(dataset, tmp_path):
    chain = FilterChain([make_filter("lowpass", cutoff_A=10.0), make_filter("normalize")])
    out_dir = tmp_path / "out" / "sub"
    out = apply_filter_to_source(dataset, chain, out_dir / "filtered.star", chunk_size=4)
    assert out == out_dir / "filtered.star"
    assert _files(out_dir) == ["filtered.mrcs", "filtered.star", "filtered_filter.json"]

    assert read_mrc_info(out_dir / "filtered.mrcs").pixel_size == PX
    src, res = read_star(dataset), read_star(out)
    assert res.optics["rlnImagePixelSize"].tolist() == [PX]
    pd.testing.assert_frame_equal(res.optics, src.optics)
    assert res.particles["rlnImageName"].tolist() == image_names(N, "filtered.mrcs")
    keep = [c for c in src.particles.columns if c not in ("rlnImageName", "cryosiftCleanImageName")]
    pd.testing.assert_frame_equal(res.particles[keep], src.particles[keep])
    # other image columns are re-expressed relative to the new STAR's folder
    assert res.particles["cryosiftCleanImageName"].iloc[0] == "000001@../../data/clean.mrcs"
    assert (out_dir / "../../data/clean.mrcs").resolve() == dataset.with_name("clean.mrcs")

    reread = open_source(out)
    assert reread.pixel_size == PX and reread.n_images == N
    expected = chain(_images(), BatchContext(PX, merged_metadata(src)))
    np.testing.assert_allclose(reread.images(slice(None)), expected, atol=1e-5)

    record = json.loads((out_dir / "filtered_filter.json").read_text())
    assert record["command"] == "filter"
    assert [f["name"] for f in record["parameters"]["filters"]] == ["lowpass", "normalize"]
    assert record["parameters"]["pixel_size"] == PX


def test_chunking_does_not_change_results(dataset, tmp_path):
    flt = make_filter("bilateral")
    a = apply_filter_to_source(dataset, flt, tmp_path / "a.star", chunk_size=3)
    b = apply_filter_to_source(dataset, flt, tmp_path / "b.star", chunk_size=256)
    np.testing.assert_allclose(
        open_source(a).images(slice(None)), open_source(b).images(slice(None)), rtol=1e-6
    )  # per-image filter: the chunking only changes SIMD rounding


def test_bare_stack_gets_minimal_optics(tmp_path):
    write_mrcs(tmp_path / "stack.mrcs", _images(), 1.7)
    out = apply_filter_to_source(
        tmp_path / "stack.mrcs", make_filter("median"), tmp_path / "o" / "med.star"
    )
    table = read_star(out)
    assert table.optics["rlnImagePixelSize"].tolist() == [1.7]
    assert table.optics["rlnImageSize"].tolist() == [BOX]
    assert table.particles["rlnImageName"].tolist() == image_names(N, "med.mrcs")
    assert read_mrc_info(out.with_suffix(".mrcs")).pixel_size == 1.7


def test_relion_30_star_with_per_particle_ctf(tmp_path):
    write_mrcs(tmp_path / "particles.mrcs", _images(), PX)
    rows = "\n".join(
        f"{i + 1:06d}@particles.mrcs {15000 + 100 * i} {14800 + 100 * i} 30.0 300 2.7 0.1 10000 2.5"
        for i in range(N)
    )
    (tmp_path / "old.star").write_text(
        "\ndata_\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n"
        "_rlnDefocusAngle #4\n_rlnVoltage #5\n_rlnSphericalAberration #6\n"
        "_rlnAmplitudeContrast #7\n_rlnMagnification #8\n_rlnDetectorPixelSize #9\n" + rows + "\n"
    )
    out = apply_filter_to_source(
        tmp_path / "old.star", make_filter("phaseflip"), tmp_path / "o" / "pf.star"
    )
    table = read_star(out)
    assert table.version == "3.1"
    assert table.optics["rlnImagePixelSize"].tolist() == [PX]  # 2.5 µm / 10,000 x
    assert table.optics["rlnVoltage"].tolist() == [300.0]
    src = read_star(tmp_path / "old.star")
    expected = make_filter("phaseflip")(_images(), BatchContext(PX, src.particles))
    np.testing.assert_allclose(open_source(out).images(slice(None)), expected, atol=1e-5)
    assert table.particles["rlnDefocusU"].tolist() == src.particles["rlnDefocusU"].tolist()


def test_bare_stack_without_pixel_size(tmp_path):
    with mrcfile.new(tmp_path / "nopx.mrcs") as m:
        m.set_data(_images())
        m.set_image_stack()  # voxel size left at 0: unknown
    with pytest.raises(InputError, match="pixel size"):
        apply_filter_to_source(tmp_path / "nopx.mrcs", make_filter("invert"), tmp_path / "x.star")
    assert "x.star" not in _files(tmp_path)
    out = apply_filter_to_source(
        tmp_path / "nopx.mrcs", make_filter("invert"), tmp_path / "x.star", pixel_size=3.0
    )
    assert read_mrc_info(out.with_suffix(".mrcs")).pixel_size == 3.0


def test_ctf_filters_refused_without_ctf_before_writing(dataset, no_ctf_star, tmp_path):
    write_mrcs(tmp_path / "stack.mrcs", _images(), PX)
    out_dir = tmp_path / "o"
    with pytest.raises(CryosiftError, match="bare stack"):
        apply_filter_to_source(
            tmp_path / "stack.mrcs", make_filter("phaseflip"), out_dir / "a.star"
        )
    chain = FilterChain([make_filter("lowpass", cutoff_frac=0.5), make_filter("wiener", snr=2)])
    with pytest.raises(CryosiftError, match="lacks rlnDefocusU, rlnDefocusV, rlnDefocusAngle"):
        apply_filter_to_source(no_ctf_star, chain, out_dir / "b.star")
    assert _files(out_dir) == []
    apply_filter_to_source(dataset, chain, out_dir / "c.star")  # with CTF columns: fine


def test_failures_leave_nothing_behind(dataset, tmp_path, monkeypatch):
    out_dir = tmp_path / "o"
    out_dir.mkdir()
    (out_dir / "f.star").write_text("previous")

    class Boom(Exception):
        pass

    def broken_write_star(*args, **kwargs):
        raise Boom("disk full")

    import cryosift.io.star

    monkeypatch.setattr(cryosift.io.star, "write_star", broken_write_star)
    with pytest.raises(Boom):
        apply_filter_to_source(dataset, make_filter("invert"), out_dir / "f.star")
    monkeypatch.undo()
    assert _files(out_dir) == ["f.star"] and (out_dir / "f.star").read_text() == "previous"

    class FailsOnSecondChunk(FilterChain):
        calls = 0

        def apply(self, images, ctx):
            type(self).calls += 1
            if type(self).calls == 2:
                raise CryosiftError("filter failed")
            return images

    with pytest.raises(CryosiftError, match="filter failed"):
        apply_filter_to_source(
            dataset, FailsOnSecondChunk([make_filter("invert")]), out_dir / "g.star", chunk_size=4
        )
    assert _files(out_dir) == ["f.star"]

    class NaNOnImage6(FilterChain):
        calls = 0

        def apply(self, images, ctx):
            type(self).calls += 1
            out = images.copy()
            if type(self).calls == 2:  # the second chunk of 4: images 5-8
                out[1, 0, 0] = np.nan
            return out

    with pytest.raises(CryosiftError, match="NaN/Inf values on image 6"):
        apply_filter_to_source(
            dataset, NaNOnImage6([make_filter("invert")]), out_dir / "h.star", chunk_size=4
        )
    assert _files(out_dir) == ["f.star"]


def test_refuses_to_overwrite_inputs(dataset):
    with pytest.raises(CryosiftError, match="overwrite the input"):
        apply_filter_to_source(dataset, make_filter("invert"), dataset)
    other = dataset.with_name("renamed.star")
    other.write_text(dataset.read_text())
    # renamed.star -> particles.mrcs; writing particles.star would overwrite particles.mrcs
    with pytest.raises(CryosiftError, match="overwrite the input"):
        apply_filter_to_source(other, make_filter("invert"), dataset)
    with pytest.raises(CryosiftError, match=r"\.star"):
        apply_filter_to_source(dataset, make_filter("invert"), dataset.with_name("x.mrcs"))


def test_chain_order_matters_and_is_recorded():
    imgs = _images()
    hist, low = make_filter("histeq"), make_filter("lowpass", cutoff_frac=0.3)
    a = FilterChain([hist, low])(imgs)
    b = FilterChain([low, hist])(imgs)
    np.testing.assert_allclose(a, low(hist(imgs)), atol=1e-6)
    np.testing.assert_allclose(b, hist(low(imgs)), atol=1e-6)
    assert np.abs(a - b).max() > 0.05
    assert [f["name"] for f in FilterChain([hist, low]).params()["filters"]] == [
        "histeq",
        "lowpass",
    ]
    nested = FilterChain([FilterChain([hist]), make_filter("wiener", snr=1)])
    assert len(nested) == 2 and nested.needs_ctf and nested.needs_pixel_size
    with pytest.raises(CryosiftError, match="at least one"):
        FilterChain([])


# ---------------------------------------------------------------------------------------- CLI


_run = run_cli  # the CLI with the root logger's handlers restored afterwards


def test_cli_honours_command_line_order(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    assert (
        _run(
            ["filter", str(dataset), "-o", str(tmp_path / "a.star"), "--histeq", "--lowpass", "10"]
        )
        == 0
    )
    assert (
        _run(
            ["filter", str(dataset), "-o", str(tmp_path / "b.star"), "--lowpass", "10", "--histeq"]
        )
        == 0
    )
    a = open_source(tmp_path / "a.star").images(slice(None))
    b = open_source(tmp_path / "b.star").images(slice(None))
    hist, low = make_filter("histeq"), make_filter("lowpass", cutoff_A=10.0)
    ctx = BatchContext(PX)
    np.testing.assert_allclose(a, low(hist(_images()), ctx), atol=1e-5)
    np.testing.assert_allclose(b, hist(low(_images(), ctx)), atol=1e-5)
    record = json.loads((tmp_path / "b_filter.json").read_text())
    assert [f["name"] for f in record["parameters"]["filters"]] == ["lowpass", "histeq"]


def test_cli_seed_000_chain_and_options(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("CRYOSIFT_NO_PROGRESS", "1")
    out = tmp_path / "pre.star"
    assert (
        _run(
            [
                "filter",
                str(dataset),
                "-o",
                str(out),
                "--bilateral",
                "--bilateral-sigma-spatial",
                "1.5",
                "--bilateral-sigma-range",
                "2",
                "--histeq",
                "--chunk-size",
                "3",
            ]
        )
        == 0
    )
    imgs = open_source(out).images(slice(None))
    expected = make_filter("histeq")(
        make_filter("bilateral", sigma_spatial_px=1.5, sigma_range=2.0)(_images())
    )
    # float rounding in the bilateral (chunks of 3 vs 10) may move a pixel across a histogram
    # bin edge, which moves the equalised values by 1/(pixels per image)
    np.testing.assert_allclose(imgs, expected, atol=2.0 / BOX**2)
    assert imgs.min() > 0 and imgs.max() <= 1
    out2 = tmp_path / "ctf.star"
    assert (
        _run(
            [
                "filter",
                str(dataset),
                "-o",
                str(out2),
                "--normalize",
                "--bg-radius",
                "12",
                "--no-ramp",
                "--phase-flip",
                "--wiener",
                "5",
                "--clahe",
                "--clahe-clip",
                "0.02",
                "--median",
                "3",
                "--gaussian",
                "1",
                "--highpass",
                "40",
                "--invert",
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "ctf_filter.json").read_text())
    names = [f["name"] for f in record["parameters"]["filters"]]
    assert names == [
        "normalize",
        "phaseflip",
        "wiener",
        "clahe",
        "median",
        "gaussian",
        "highpass",
        "invert",
    ]
    assert record["parameters"]["filters"][0]["radius_px"] == 12.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["MISSING.star", "--median", "3"], "does not exist"),
        (["STAR"], "no filter given"),
        (["STAR", "--lowpass", "3"], "beyond Nyquist"),
        (["STAR", "--gaussian", "0"], "must be a positive number"),
        (["STAR", "--gaussian", "-2"], "must be a positive number"),
        (["STAR", "--bilateral", "--bilateral-sigma-spatial", "0"], "must be a positive"),
        (["STAR", "--median", "4"], "must be odd"),
        (["NOCTF", "--wiener", "10"], "lacks rlnDefocusU"),
        (["NOCTF", "--phase-flip"], "lacks rlnDefocusU"),
        (["STACK", "--phase-flip"], "bare stack"),
        (["STAR", "--clahe-clip", "0.1", "--histeq"], "--clahe-clip only applies with --clahe"),
        (["STAR", "--normalize", "--bg-radius", "40"], "larger than half"),
        (["STAR", "--invert", "-o", "OUT/out.mrcs"], "must be a .star"),
        (["STAR", "--lowpass", "10", "--histeq", "--lowpass=20"], "--lowpass is given more than"),
    ],
)
def test_cli_bad_input(dataset, no_ctf_star, tmp_path, capsys, args, message):
    write_mrcs(tmp_path / "stack.mrcs", _images(), PX)
    out_dir = tmp_path / "out"
    subst = {
        "STAR": str(dataset),
        "NOCTF": str(no_ctf_star),
        "STACK": str(tmp_path / "stack.mrcs"),
        "MISSING.star": str(tmp_path / "missing.star"),
    }
    argv = ["filter", *[subst.get(a, a).replace("OUT/", f"{out_dir}/") for a in args]]
    if "-o" not in argv:
        argv += ["-o", str(out_dir / "out.star")]
    capsys.readouterr()
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cryosift: error:"), err
    assert message in err, err
    assert _files(out_dir) == []


def test_cli_unknown_filter_option(dataset, tmp_path, capsys):
    assert _run(["filter", str(dataset), "-o", str(tmp_path / "o" / "x.star"), "--sharpen"]) == 2
    assert "--sharpen" in capsys.readouterr().err  # click's usage error names the option
    assert _files(tmp_path / "o") == []
