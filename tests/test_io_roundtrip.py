"""Round trips through cryosift.io: MRC stacks, streaming writer, STAR tables, image sources."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryosift.errors import InputError
from cryosift.io import (
    ArraySource,
    MrcStackSource,
    MrcsWriter,
    StarSource,
    atomic_path,
    atomic_write_json,
    image_names,
    make_optics_table,
    merged_metadata,
    open_mrc_stack,
    open_source,
    parse_image_name,
    pixel_size_of,
    read_mrc_info,
    read_star,
    write_mrcs,
    write_star,
)
from cryosift.io.mrc import write_images_at

BOX = 24


def _stack(n: int, box: int = BOX, seed: int = 0) -> np.ndarray:
    """Distinct images: noise plus the image number, so any mix-up of order shows."""
    rng = np.random.default_rng(seed)
    imgs = rng.normal(size=(n, box, box)).astype(np.float32)
    return imgs + np.arange(n, dtype=np.float32)[:, None, None] * 10


def _write_with_mrcfile(path: Path, data: np.ndarray) -> None:
    """Write a stack with mrcfile directly (independent of the code under test)."""
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = 1.5


def _dir_listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# --------------------------------------------------------------------------- atomic


def test_atomic_path_renames_on_success_and_cleans_on_error(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "particles.mrcs"
    with atomic_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".particles.mrcs.tmp-")
        assert tmp.suffix == ".mrcs" and not tmp.exists()
        tmp.write_bytes(b"new")
        assert not final.exists()  # nothing at the final name until the block ends
    assert final.read_bytes() == b"new"

    with pytest.raises(KeyError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise KeyError("boom")
    assert final.read_bytes() == b"new"
    assert _dir_listing(final.parent) == ["particles.mrcs"]


def test_atomic_temp_names_are_unique(tmp_path: Path) -> None:
    final = tmp_path / "a.json"
    with atomic_path(final) as t1, atomic_path(final) as t2:
        assert t1 != t2
        t1.write_text("1")
        t2.write_text("2")
    assert final.read_text() == "1"  # the inner block (t2) is renamed first, t1 last
    assert _dir_listing(tmp_path) == ["a.json"]


def test_atomic_write_json_converts_numpy(tmp_path: Path) -> None:
    obj = {"psnr": np.float32(12.5), "n": np.int64(3), "curve": np.arange(3.0),
           "ok": np.bool_(True), np.int64(7): "key", "path": tmp_path}
    atomic_write_json(tmp_path / "m.json", obj)
    back = json.loads((tmp_path / "m.json").read_text())
    assert back == {"psnr": 12.5, "n": 3, "curve": [0.0, 1.0, 2.0], "ok": True, "7": "key",
                    "path": str(tmp_path)}
    assert list(back) == ["psnr", "n", "curve", "ok", "7", "path"]  # key order kept


# --------------------------------------------------------------------------- MRC


def test_write_mrcs_roundtrip_exact(tmp_path: Path) -> None:
    imgs = _stack(5)
    path = tmp_path / "p.mrcs"
    write_mrcs(path, imgs, pixel_size=1.234)
    with mrcfile.open(path) as m:  # strict mode: a fully valid MRC2014 file
        assert m.is_image_stack()
        assert m.header.mode == 2
        np.testing.assert_array_equal(m.data, imgs)
        assert m.voxel_size.x == pytest.approx(1.234, rel=1e-6)
        assert m.voxel_size.y == pytest.approx(1.234, rel=1e-6)
        assert m.voxel_size.z == pytest.approx(1.234, rel=1e-6)
        assert m.header.dmin == imgs.min() and m.header.dmax == imgs.max()
        assert float(m.header.dmean) == pytest.approx(imgs.mean(dtype=np.float64), rel=1e-5)
        assert float(m.header.rms) == pytest.approx(imgs.std(dtype=np.float64), rel=1e-5)
    assert mrcfile.validate(str(path), print_file=io.StringIO())
    data, info = open_mrc_stack(path)
    np.testing.assert_array_equal(data, imgs)
    assert (info.n, info.ny, info.nx, info.mode, info.is_stack) == (5, BOX, BOX, 2, True)
    assert info.pixel_size == 1.234
    assert _dir_listing(tmp_path) == ["p.mrcs"]


def test_write_mrcs_single_image_becomes_stack_of_one(tmp_path: Path) -> None:
    img = _stack(1)[0]
    write_mrcs(tmp_path / "one.mrcs", img, pixel_size=2.0)
    data, info = open_mrc_stack(tmp_path / "one.mrcs")
    assert data.shape == (1, BOX, BOX) and info.n == 1
    np.testing.assert_array_equal(data[0], img)


def test_write_mrcs_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pixel size"):
        write_mrcs(tmp_path / "x.mrcs", _stack(2), pixel_size=0.0)
    with pytest.raises(ValueError, match="shape"):
        write_mrcs(tmp_path / "x.mrcs", np.zeros((2, 8, 9), np.float32), pixel_size=1.0)
    assert _dir_listing(tmp_path) == []


def test_mrcs_writer_chunked_equals_one_shot(tmp_path: Path) -> None:
    imgs = _stack(11)
    write_mrcs(tmp_path / "oneshot.mrcs", imgs, pixel_size=1.7)
    with MrcsWriter(tmp_path / "chunked.mrcs", n=11, box=BOX, pixel_size=1.7) as w:
        w.write(7, imgs[7:11])  # out of order on purpose
        w.write(0, imgs[0:3])
        assert w.next_index == 3
        w.append(imgs[3:5])
        w.append(imgs[5])  # a single 2D image
        w.write(6, imgs[6:7])
    with mrcfile.open(tmp_path / "oneshot.mrcs") as a, mrcfile.open(tmp_path / "chunked.mrcs") as b:
        np.testing.assert_array_equal(a.data, b.data)
        assert b.is_image_stack()
        assert b.voxel_size.x == pytest.approx(1.7, rel=1e-6)
        assert b.voxel_size.z == pytest.approx(1.7, rel=1e-6)
        assert b.header.dmin == a.header.dmin and b.header.dmax == a.header.dmax
        # float32 accumulation in mrcfile vs float64 here: agree to float32 precision
        assert float(b.header.dmean) == pytest.approx(float(a.header.dmean), rel=1e-5, abs=1e-6)
        assert float(b.header.rms) == pytest.approx(float(a.header.rms), rel=1e-5)
    assert _dir_listing(tmp_path) == ["chunked.mrcs", "oneshot.mrcs"]


def test_images_written_by_other_processes_give_the_same_file(tmp_path: Path) -> None:
    """Dask workers write their chunks straight into the writer's data file and the writer
    records their statistics: byte for byte the file of in-order appends, rewrites harmless."""
    imgs = _stack(11)
    with MrcsWriter(tmp_path / "appended.mrcs", n=11, box=BOX, pixel_size=1.7) as w:
        for start in (0, 4, 8):
            w.append(imgs[start : start + 4])
    with MrcsWriter(tmp_path / "placed.mrcs", n=11, box=BOX, pixel_size=1.7) as w:
        stats = {s: write_images_at(w.data_file, w.data_offset, s, imgs[s : s + 4])
                 for s in (8, 0, 4)}  # out of order, as tasks finish
        write_images_at(w.data_file, w.data_offset, 4, imgs[4:8])  # a re-run task
        for s in (0, 4, 8):  # recorded in order, as the engine does
            w.record(s, min(s + 4, 11), stats[s])
        with pytest.raises(ValueError, match="already written"):
            w.record(4, 8, stats[4])
    assert (tmp_path / "appended.mrcs").read_bytes() == (tmp_path / "placed.mrcs").read_bytes()
    with pytest.raises(RuntimeError, match="only 4 of 11"), \
            MrcsWriter(tmp_path / "short.mrcs", 11, BOX, 1.0) as w:
        w.record(0, 4, write_images_at(w.data_file, w.data_offset, 0, imgs[:4]))
    assert _dir_listing(tmp_path) == ["appended.mrcs", "placed.mrcs"]


def test_mrcs_writer_failure_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.mrcs"
    old = _stack(3, seed=1)
    write_mrcs(path, old, pixel_size=1.0)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="denoiser crashed"):
        with MrcsWriter(path, n=4, box=BOX, pixel_size=2.0) as w:
            w.append(_stack(2, seed=2))
            raise RuntimeError("denoiser crashed")
    assert path.read_bytes() == before
    assert _dir_listing(tmp_path) == ["out.mrcs"]


def test_mrcs_writer_refuses_incomplete_or_double_writes(tmp_path: Path) -> None:
    path = tmp_path / "out.mrcs"
    with pytest.raises(RuntimeError, match="only 2 of 4"), MrcsWriter(path, 4, BOX, 1.0) as w:
        w.append(_stack(2))
    assert _dir_listing(tmp_path) == []
    with pytest.raises(ValueError, match="already written"), MrcsWriter(path, 4, BOX, 1.0) as w:
        w.write(0, _stack(3))
        w.write(2, _stack(2))
    with pytest.raises(ValueError, match="outside"), MrcsWriter(path, 4, BOX, 1.0) as w:
        w.write(3, _stack(2))
    with pytest.raises(ValueError, match="chunk shape"), MrcsWriter(path, 4, BOX, 1.0) as w:
        w.write(0, _stack(2, box=BOX + 2))
    assert _dir_listing(tmp_path) == []


# --------------------------------------------------------------------------- STAR


def _particles(n: int, stack: str = "particles.mrcs") -> pd.DataFrame:
    rng = np.random.default_rng(3)
    return pd.DataFrame(
        {
            "rlnImageName": image_names(n, stack),
            "rlnAngleRot": rng.uniform(-180, 180, n),  # float64, full precision
            "rlnAngleTilt": np.full(n, 123.456789012),
            "rlnAnglePsi": rng.uniform(-180, 180, n).astype(np.float32),  # float32 column
            "rlnDefocusU": rng.uniform(5000, 30000, n),
            "rlnOriginXAngst": np.full(n, 1.5e-7),  # tiny: '%.6f' would write 0.000000
            "rlnClassNumber": np.arange(1, n + 1),
            "rlnMicrographName": [f"mics/micro graph {i}.mrc" for i in range(n)],  # spaces
            "cryosiftIsParticle": np.arange(n) % 2 == 0,
        }
    )


def test_star_roundtrip_exact(tmp_path: Path) -> None:
    parts = _particles(6)
    optics = make_optics_table(pixel_size=1.0625, box=BOX, voltage=200.0, cs=2.7,
                               amplitude_contrast=0.07)
    path = tmp_path / "particles.star"
    write_star(path, parts, optics)
    text = path.read_text()
    assert text.count("# version 30001") == 2
    assert text.index("data_optics") < text.index("data_particles")
    assert "\n_rlnImageName #1 \n" in text

    table = read_star(path)
    assert table.version == "3.1"
    pd.testing.assert_frame_equal(table.optics, optics, check_dtype=False)
    back = table.particles
    assert (back["rlnOpticsGroup"] == 1).all()
    assert list(back["rlnImageName"]) == [f"{i:06d}@particles.mrcs" for i in range(1, 7)]
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnDefocusU", "rlnOriginXAngst"):
        np.testing.assert_array_equal(back[col].to_numpy(), parts[col].to_numpy(), err_msg=col)
    np.testing.assert_array_equal(back["rlnAnglePsi"].to_numpy().astype(np.float32),
                                  parts["rlnAnglePsi"].to_numpy())
    np.testing.assert_array_equal(back["rlnClassNumber"], parts["rlnClassNumber"])
    assert list(back["rlnMicrographName"]) == list(parts["rlnMicrographName"])
    assert list(back["cryosiftIsParticle"]) == [1, 0, 1, 0, 1, 0]
    assert pixel_size_of(table) == 1.0625


def test_write_star_optics_groups(tmp_path: Path) -> None:
    optics = pd.concat(
        [make_optics_table(1.0, BOX), make_optics_table(1.0, BOX, voltage=200.0, name="g2")]
    ).reset_index(drop=True)
    optics.loc[1, "rlnOpticsGroup"] = 2
    parts = _particles(4)
    with pytest.raises(ValueError, match="rlnOpticsGroup"):
        write_star(tmp_path / "a.star", parts, optics)  # two groups, no column: ambiguous
    parts["rlnOpticsGroup"] = [2, 1, 2, 3]
    with pytest.raises(ValueError, match="row 4"):
        write_star(tmp_path / "a.star", parts, optics)  # group 3 undefined
    assert _dir_listing(tmp_path) == []
    parts["rlnOpticsGroup"] = [2, 1, 2, 1]
    write_star(tmp_path / "a.star", parts, optics)
    merged = merged_metadata(read_star(tmp_path / "a.star"))
    assert list(merged["rlnVoltage"]) == [200.0, 300.0, 200.0, 300.0]  # row order kept
    assert list(merged["rlnImageName"]) == list(parts["rlnImageName"])
    assert list(merged["rlnOpticsGroupName"]) == ["g2", "opticsGroup1", "g2", "opticsGroup1"]


def test_read_star_relion30_single_block(tmp_path: Path) -> None:
    path = tmp_path / "old.star"
    path.write_text(
        "data_images\n\nloop_\n_rlnImageName #1\n_rlnDetectorPixelSize #2\n_rlnMagnification #3\n"
        "1@s.mrcs 5.0 50000\n2@s.mrcs 5.0 50000\n"
    )
    table = read_star(path)
    assert table.version == "3.0" and table.optics is None and len(table) == 2
    assert pixel_size_of(table) == pytest.approx(1.0)
    path.write_text("data_\n\nloop_\n_rlnImageName\n_rlnPixelSize\n1@s.mrcs 2.5\n")
    assert pixel_size_of(read_star(path)) == 2.5
    path.write_text("data_\n\nloop_\n_rlnImageName\n1@s.mrcs\n")
    assert pixel_size_of(read_star(path)) is None
    pd.testing.assert_frame_equal(merged_metadata(read_star(path)), read_star(path).particles)


def test_image_names_and_parse() -> None:
    names = image_names(3, "stacks/p.mrcs", start=9)
    assert names == ["000010@stacks/p.mrcs", "000011@stacks/p.mrcs", "000012@stacks/p.mrcs"]
    assert image_names(1, Path("a") / "b.mrcs") == ["000001@a/b.mrcs"]
    assert [parse_image_name(s) for s in names] == [(9, "stacks/p.mrcs"), (10, "stacks/p.mrcs"),
                                                    (11, "stacks/p.mrcs")]
    assert parse_image_name("7@/abs/x.mrcs") == (6, "/abs/x.mrcs")
    for bad in ["p.mrcs", "0@p.mrcs", "-1@p.mrcs", "x@p.mrcs", "3@", "@p.mrcs", ""]:
        with pytest.raises(InputError, match="malformed image name"):
            parse_image_name(bad, path="f.star")


# --------------------------------------------------------------------------- sources


def _sources(tmp_path: Path, imgs: np.ndarray) -> list:
    """The same images as an ArraySource, an MrcStackSource and a StarSource."""
    write_mrcs(tmp_path / "s.mrcs", imgs, pixel_size=1.5)
    parts = pd.DataFrame({"rlnImageName": image_names(len(imgs), "s.mrcs")})
    write_star(tmp_path / "s.star", parts, make_optics_table(1.5, imgs.shape[-1]))
    return [
        ArraySource(imgs, pixel_size=1.5),
        open_source(tmp_path / "s.mrcs"),
        open_source(tmp_path / "s.star"),
    ]


def test_sources_chunks_concatenate_to_the_array(tmp_path: Path) -> None:
    imgs = _stack(10)
    for src in _sources(tmp_path, imgs):
        assert (len(src), src.n_images, src.box, src.pixel_size) == (10, 10, BOX, 1.5)
        starts, parts = zip(*src.chunks(chunk_size=3), strict=True)
        assert starts == (0, 3, 6, 9)
        assert [p.shape[0] for p in parts] == [3, 3, 3, 1]
        out = np.concatenate(parts)
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, imgs, err_msg=type(src).__name__)


def test_sources_images_in_requested_order(tmp_path: Path) -> None:
    imgs = _stack(8)
    for src in _sources(tmp_path, imgs):
        name = type(src).__name__
        np.testing.assert_array_equal(src.images([5, 2, 5]), imgs[[5, 2, 5]], err_msg=name)
        np.testing.assert_array_equal(src.images(np.array([7, 0])), imgs[[7, 0]], err_msg=name)
        np.testing.assert_array_equal(src.images(3), imgs[3:4], err_msg=name)
        np.testing.assert_array_equal(src.images(slice(6, 1, -2)), imgs[6:1:-2], err_msg=name)
        np.testing.assert_array_equal(src.images(slice(-3, None)), imgs[-3:], err_msg=name)
        np.testing.assert_array_equal(src.images(np.arange(8) % 3 == 0), imgs[::3], err_msg=name)
        assert src.images([]).shape == (0, BOX, BOX)
        with pytest.raises(IndexError, match="negative"):
            src.images([1, -1])
        with pytest.raises(IndexError):
            src.images(8)
        with pytest.raises(TypeError):
            src.images([1.0, 2.0])


def test_images_are_copies_not_views(tmp_path: Path) -> None:
    imgs = _stack(4)
    for src in _sources(tmp_path, imgs):
        out = src.images(slice(0, 2))
        out[:] = 0
        np.testing.assert_array_equal(src.images(slice(0, 2)), imgs[:2])


@settings(max_examples=40, deadline=None)
@given(idx=st.lists(st.integers(min_value=0, max_value=11), max_size=20))
def test_star_source_matches_numpy_fancy_indexing(idx: list[int], tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("hyp")
    imgs = _stack(12, box=8)
    a, b = imgs[:5], imgs[5:]
    write_mrcs(folder / "a.mrcs", a, 1.0)
    write_mrcs(folder / "b.mrcs", b, 1.0)
    # rows alternate between the two stacks: row r -> imgs[order[r]]
    order = np.array([0, 5, 1, 6, 2, 7, 3, 8, 4, 9, 10, 11])
    names = [f"{i + 1}@a.mrcs" if i < 5 else f"{i - 4}@b.mrcs" for i in order]
    write_star(folder / "ab.star", pd.DataFrame({"rlnImageName": names}),
               make_optics_table(1.0, 8))
    src = StarSource(folder / "ab.star", max_open_files=1)
    np.testing.assert_array_equal(src.images(idx), imgs[order][idx])


def test_star_relative_paths_resolve_against_star_folder(tmp_path: Path, monkeypatch) -> None:
    imgs = _stack(4)
    (tmp_path / "proj" / "Extract").mkdir(parents=True)
    _write_with_mrcfile(tmp_path / "proj" / "Extract" / "p.mrcs", imgs)
    write_mrcs(tmp_path / "abs.mrcs", imgs[::-1], 1.5)
    names = ["2@Extract/p.mrcs", "4@Extract/p.mrcs", f"1@{tmp_path / 'abs.mrcs'}"]
    star = tmp_path / "proj" / "jobs" / "sel.star"
    star.parent.mkdir()
    names[:2] = [n.replace("Extract/", "../Extract/") for n in names[:2]]
    write_star(star, pd.DataFrame({"rlnImageName": names}), make_optics_table(1.5, BOX))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    src = open_source(Path("..") / "proj" / "jobs" / "sel.star")
    assert src.stack_paths[1] == tmp_path / "abs.mrcs"  # absolute kept
    np.testing.assert_array_equal(src.images(slice(None)), imgs[[1, 3, 3]])
    assert list(src.metadata["rlnImageName"]) == names


def test_star_in_relion_project_resolves_against_project_folder(
    tmp_path: Path, monkeypatch
) -> None:
    """RELION names stacks relative to the project folder, not the STAR's job folder."""
    imgs = _stack(3)
    proj = tmp_path / "proj"
    (proj / "Extract" / "job007" / "Movies").mkdir(parents=True)
    write_mrcs(proj / "Extract" / "job007" / "Movies" / "m1.mrcs", imgs, 1.5)
    star = proj / "Select" / "job009" / "particles.star"
    names = image_names(3, "Extract/job007/Movies/m1.mrcs")
    write_star(star, pd.DataFrame({"rlnImageName": names}), make_optics_table(1.5, BOX))
    monkeypatch.chdir(tmp_path)
    src = open_source(star)
    assert src.stack_paths == [proj / "Extract" / "job007" / "Movies" / "m1.mrcs"]
    np.testing.assert_array_equal(src.images([2, 0]), imgs[[2, 0]])
    # a STAR outside the project that names stacks relative to the folder RELION runs in
    outside = tmp_path / "exports" / "sel.star"
    write_star(outside, pd.DataFrame({"rlnImageName": ["2@Extract/job007/Movies/m1.mrcs"]}),
               make_optics_table(1.5, BOX))
    monkeypatch.chdir(proj)
    np.testing.assert_array_equal(open_source(outside).images(0), imgs[1:2])


def test_star_referencing_two_stacks(tmp_path: Path) -> None:
    a, b = _stack(3, seed=1), _stack(4, seed=2)
    write_mrcs(tmp_path / "a.mrcs", a, 2.0)
    _write_with_mrcfile(tmp_path / "b.mrcs", b)
    names = ["1@b.mrcs", "3@a.mrcs", "4@b.mrcs", "1@a.mrcs", "2@b.mrcs"]
    write_star(tmp_path / "ab.star", pd.DataFrame({"rlnImageName": names}),
               make_optics_table(2.0, BOX))
    src = StarSource(tmp_path / "ab.star")
    expected = np.stack([b[0], a[2], b[3], a[0], b[1]])
    np.testing.assert_array_equal(src.images(slice(None)), expected)
    np.testing.assert_array_equal(src.images([4, 1, 1, 0]), expected[[4, 1, 1, 0]])
    np.testing.assert_array_equal(np.concatenate([c for _, c in src.chunks(2)]), expected)
    assert src.stack_names == ["b.mrcs", "a.mrcs"]
    assert src.pixel_size == 2.0  # from the optics table, not the stack headers (1.5 in b)


def test_sources_pickle_without_pixels_and_reopen(tmp_path: Path) -> None:
    imgs = _stack(6, box=32)
    for src in _sources(tmp_path, imgs)[1:]:
        src.images(0)  # open the memory map
        blob = pickle.dumps(src)
        assert len(blob) < imgs.nbytes / 2  # the mapped pixels are not pickled
        np.testing.assert_array_equal(pickle.loads(blob).images([4, 1]), imgs[[4, 1]])


def test_open_source_dispatch_and_pixel_override(tmp_path: Path) -> None:
    imgs = _stack(3)
    write_mrcs(tmp_path / "x.mrc", imgs, 1.5)
    (tmp_path / "x.mrc").rename(tmp_path / "x.st")
    src = open_source(tmp_path / "x.st", pixel_size=0.9)
    assert isinstance(src, MrcStackSource) and src.pixel_size == 0.9
    assert open_source(str(tmp_path / "x.st")).pixel_size == 1.5
    arr_src = open_source(imgs)
    assert isinstance(arr_src, ArraySource) and arr_src.pixel_size is None
    assert open_source(arr_src) is arr_src
    assert open_source(arr_src, pixel_size=3.0).pixel_size == 3.0 and arr_src.pixel_size is None
    assert open_source(imgs[0]).n_images == 1
    info = read_mrc_info(tmp_path / "x.st")
    assert info.is_stack and info.box == BOX


def test_header_variants_read_like_mrcfile(tmp_path: Path) -> None:
    """Big-endian data, float16 (mode 12), and RELION-style headers without 'MAP ' / stamp."""
    imgs = _stack(3)
    big = tmp_path / "big.mrcs"
    _write_with_mrcfile(big, imgs.astype(">f4"))
    np.testing.assert_array_equal(open_source(big).images(slice(None)), imgs)

    half = tmp_path / "half.mrcs"
    _write_with_mrcfile(half, imgs.astype(np.float16))
    assert read_mrc_info(half).mode == 12
    np.testing.assert_array_equal(open_source(half).images([2, 0]),
                                  imgs.astype(np.float16)[[2, 0]].astype(np.float32))

    bare = tmp_path / "bare.mrcs"
    _write_with_mrcfile(bare, imgs)
    with open(bare, "r+b") as fh:
        fh.seek(208)
        fh.write(b"\0" * 8)  # map ID and machine stamp zeroed, as in relion31.mrcs
    info = read_mrc_info(bare)
    assert (info.n, info.box, info.pixel_size) == (3, BOX, 1.5)
    np.testing.assert_array_equal(open_source(bare).images(slice(None)), imgs)


@pytest.mark.skipif(shutil.which("relion_stack_create") is None, reason="RELION is not installed")
def test_relion_reads_what_we_write(tmp_path: Path) -> None:
    """RELION 3.1 parses our STAR, finds our stack and copies the same pixels out of it."""
    imgs = _stack(5)
    write_mrcs(tmp_path / "stacks" / "p.mrcs", imgs, 1.25)
    parts = _particles(5, stack="stacks/p.mrcs")
    write_star(tmp_path / "p.star", parts, make_optics_table(1.25, BOX))
    run = subprocess.run(
        ["relion_stack_create", "--i", "p.star", "--o", "restack"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    with mrcfile.open(tmp_path / "restack.mrcs") as m:
        np.testing.assert_array_equal(m.data, imgs)
    # ...and we read RELION's own 3.1 output back (its stack header carries no voxel size)
    back = open_source(tmp_path / "restack.star")
    assert back.pixel_size == 1.25
    np.testing.assert_array_equal(back.images(slice(None)), imgs)
    np.testing.assert_allclose(back.metadata["rlnAngleTilt"], 123.456789, atol=1e-6)
