"""Bad input gives an InputError whose one-line message names the file and the problem."""

from __future__ import annotations

import time
import tracemalloc
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from mrcfile.dtypes import HEADER_DTYPE

from cryosift.errors import InputError
from cryosift.io import (
    ArraySource,
    MrcStackSource,
    StarSource,
    image_names,
    make_optics_table,
    open_source,
    read_mrc_info,
    read_star,
    write_mrcs,
    write_star,
)

BOX = 16


def _mrc(path: Path, data: np.ndarray) -> Path:
    """A valid MRC written by mrcfile itself; tests then damage it."""
    with warnings.catch_warnings(), mrcfile.new(path, overwrite=True) as m:
        warnings.simplefilter("ignore", RuntimeWarning)  # NaN/Inf fixtures: mrcfile warns
        m.set_data(data)
        if data.ndim == 3:
            m.set_image_stack()
    return path


def _stack(n: int = 4, box: int = BOX) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, box, box)).astype(np.float32)


def _patch_header(path: Path, **fields: int) -> None:
    """Overwrite header fields in place (little-endian files, as mrcfile writes here)."""
    with open(path, "r+b") as fh:
        hdr = np.frombuffer(fh.read(1024), dtype=HEADER_DTYPE).copy()
        for name, value in fields.items():
            hdr[name] = value
        fh.seek(0)
        fh.write(hdr.tobytes())


def _star(path: Path, names: list[str], box: int = BOX, **cols) -> Path:
    parts = pd.DataFrame({"rlnImageName": names, **cols})
    write_star(path, parts, make_optics_table(1.0, box))
    return path


def _refused(path_or_obj, match: str, name: str | None = None) -> InputError:
    """open_source must raise InputError mentioning ``match`` and the file's name."""
    with pytest.raises(InputError, match=match) as err:
        open_source(path_or_obj)
    msg = str(err.value)
    if name is None:
        name = Path(path_or_obj).name
    assert name in msg, msg
    assert "\n" not in msg
    return err.value


# --------------------------------------------------------------------------- MRC files


def test_truncated_mrc(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "cut.mrcs", _stack(4))
    with open(path, "r+b") as fh:
        fh.truncate(1024 + 3 * BOX * BOX * 4 + 10)  # 3 images and a bit
    err = _refused(path, "truncated")
    assert "header says 4 images of 16x16" in str(err)
    assert f"holds {1024 + 3 * BOX * BOX * 4 + 10} bytes" in str(err)


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.mrcs"
    path.write_bytes(np.random.default_rng(1).bytes(5000))
    err = _refused(path, "not an MRC file")
    assert "MAP" in str(err)
    short = tmp_path / "short.mrc"
    short.write_bytes(b"MAP " * 10)
    _refused(short, "shorter than the 1024-byte MRC header")
    empty = tmp_path / "zero.mrcs"
    empty.write_bytes(b"")
    _refused(empty, "not an MRC file")


@pytest.mark.parametrize("mode", [3, 4])
def test_complex_mode(tmp_path: Path, mode: int) -> None:
    path = tmp_path / f"complex{mode}.mrcs"
    _mrc(path, (_stack(2) + 1j * _stack(2)).astype(np.complex64))
    _patch_header(path, mode=mode)
    _refused(path, f"complex MRC mode {mode}")


def test_unknown_mode(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "m.mrcs", _stack(2))
    _patch_header(path, mode=7)
    _refused(path, "unsupported MRC mode 7")


def test_empty_stack(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "empty.mrcs", _stack(1))
    _patch_header(path, nz=0)
    with open(path, "r+b") as fh:
        fh.truncate(1024)
    _refused(path, "empty stack")


def test_non_square_images(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "rect.mrcs", np.zeros((3, 16, 20), np.float32))
    _refused(path, "images are 16x20, not square")


def test_negative_dimensions(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "neg.mrcs", _stack(2))
    _patch_header(path, nx=-16)
    _refused(path, "invalid header dimensions")


def test_huge_declared_size_refused_cheaply(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "huge.mrcs", _stack(1))
    _patch_header(path, nz=10**9, nx=4096, ny=4096)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InputError, match="truncated: header says 1000000000 images") as err:
            read_mrc_info(path)
        with pytest.raises(InputError, match="truncated"):
            open_source(path)
    finally:
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert "huge.mrcs" in str(err.value)
    assert elapsed < 0.5
    assert peak < 1_000_000  # bytes: nothing sized from the header was allocated


def test_huge_extended_header_refused_cheaply(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "ext.mrcs", _stack(1))
    _patch_header(path, nsymbt=2**31 - 1)
    tracemalloc.start()
    try:
        _refused(path, "truncated")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_nan_and_inf_pixels_named_by_image_number(tmp_path: Path) -> None:
    data = _stack(6)
    data[2, 3, 4] = np.nan
    data[4, 0, 0] = np.inf
    path = _mrc(tmp_path / "bad.mrcs", data)
    src = open_source(path)  # opening is lazy: only images handed out are checked
    np.testing.assert_array_equal(src.images([0, 1, 3, 5]), data[[0, 1, 3, 5]])
    with pytest.raises(InputError, match=r"bad\.mrcs: image 3 contains NaN"):
        src.images(slice(None))
    with pytest.raises(InputError, match=r"bad\.mrcs: image 5 contains infinite"):
        src.images([5, 4])
    with pytest.raises(InputError, match="image 3 contains NaN"):
        list(src.chunks(2))
    with pytest.raises(InputError, match="in-memory image array: image 5 contains infinite"):
        ArraySource(data).images(4)


def test_nan_through_star_names_stack_image_and_row(tmp_path: Path) -> None:
    data = _stack(5)
    data[3] = -np.inf
    _mrc(tmp_path / "p.mrcs", data)
    star = _star(tmp_path / "p.star", ["1@p.mrcs", "4@p.mrcs", "2@p.mrcs"])
    src = StarSource(star)
    with pytest.raises(InputError) as err:
        src.images(slice(None))
    msg = str(err.value)
    assert "p.mrcs: image 4 (particle row 2 of p.star) contains infinite" in msg
    np.testing.assert_array_equal(src.images([0, 2]), data[[0, 1]])


def test_integer_modes_are_read_as_float32(tmp_path: Path) -> None:
    data = (np.arange(3 * BOX * BOX) % 200 - 100).astype(np.int16).reshape(3, BOX, BOX)
    src = MrcStackSource(_mrc(tmp_path / "i16.mrcs", data))
    out = src.images(slice(None))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data.astype(np.float32))


# --------------------------------------------------------------------------- STAR files


def test_star_without_image_name(tmp_path: Path) -> None:
    star = tmp_path / "coords.star"
    star.write_text("data_particles\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1 2\n3 4\n")
    assert len(read_star(star)) == 2  # a readable table...
    _refused(star, "no rlnImageName column")  # ...but not an image source


def test_star_pointing_at_missing_stack(tmp_path: Path) -> None:
    star = _star(tmp_path / "p.star", ["1@stacks/gone.mrcs"])
    err = _refused(star, "references image stack 'stacks/gone.mrcs', which does not exist")
    assert str(tmp_path / "stacks" / "gone.mrcs") in str(err)


def test_star_pointing_at_corrupt_stack(tmp_path: Path) -> None:
    (tmp_path / "bad.mrcs").write_bytes(b"\0" * 100)
    star = _star(tmp_path / "p.star", ["1@bad.mrcs"])
    err = _refused(star, "referenced stack is unusable")
    assert "bad.mrcs" in str(err)


def test_star_index_beyond_stack(tmp_path: Path) -> None:
    _mrc(tmp_path / "p.mrcs", _stack(3))
    star = _star(tmp_path / "p.star", ["1@p.mrcs", "3@p.mrcs", "4@p.mrcs"])
    _refused(star, "row 3: image 4@p.mrcs is beyond the end of that stack, which holds 3 images")


def test_star_mismatched_box_sizes(tmp_path: Path) -> None:
    _mrc(tmp_path / "a.mrcs", _stack(2, box=16))
    _mrc(tmp_path / "b.mrcs", _stack(2, box=32))
    star = _star(tmp_path / "ab.star", ["1@a.mrcs", "1@b.mrcs"])
    _refused(star, "different box sizes: a.mrcs is 16 px, b.mrcs is 32 px")


def test_star_optics_image_size_disagrees_with_stack(tmp_path: Path) -> None:
    _mrc(tmp_path / "a.mrcs", _stack(2, box=16))
    star = _star(tmp_path / "a.star", ["1@a.mrcs"], box=64)
    _refused(star, "rlnImageSize 64 but the referenced stacks hold 16 px")


def test_star_malformed_image_name(tmp_path: Path) -> None:
    _mrc(tmp_path / "a.mrcs", _stack(2))
    star = _star(tmp_path / "a.star", ["1@a.mrcs", "a.mrcs"])
    _refused(star, "row 2: malformed image name 'a.mrcs'")
    star = _star(tmp_path / "z.star", ["0@a.mrcs"])
    _refused(star, "row 1: malformed image name")


def test_unparsable_or_tableless_star(tmp_path: Path) -> None:
    noise = tmp_path / "noise.star"
    noise.write_bytes(np.random.default_rng(2).bytes(3000))
    _refused(noise, "not a STAR file|not a readable STAR file")
    with pytest.raises(InputError, match="noise.star"):
        read_star(noise)
    optics_only = tmp_path / "optics.star"
    write_star(optics_only, pd.DataFrame({"rlnImageName": image_names(1, "x.mrcs")}),
               make_optics_table(1.0, BOX))
    text = optics_only.read_text()
    optics_only.write_text(text[: text.index("# version 30001", 5)])
    _refused(optics_only, "no particle table found")
    empty = tmp_path / "empty.star"
    empty.write_text("data_particles\n\nloop_\n_rlnImageName #1\n")
    with pytest.raises(InputError, match="empty.star"):
        open_source(empty)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    _refused(tmp_path / "nope.mrcs", "does not exist")
    _refused(tmp_path / "nope.star", "does not exist")
    with pytest.raises(InputError, match="nope.star: file does not exist"):
        read_star(tmp_path / "nope.star")
    tif = tmp_path / "images.tiff"
    write_mrcs(tmp_path / "x.mrcs", _stack(1), 1.0)
    (tmp_path / "x.mrcs").rename(tif)
    _refused(tif, "unknown image file type '.tiff'")


def test_bad_pixel_size_override(tmp_path: Path) -> None:
    path = _mrc(tmp_path / "a.mrcs", _stack(2))
    for bad in (0.0, -1.0, float("nan"), "abc"):
        with pytest.raises(InputError, match="pixel size must be a positive number"):
            open_source(path, pixel_size=bad)


def test_bad_in_memory_arrays() -> None:
    with pytest.raises(InputError, match="not square"):
        ArraySource(np.zeros((2, 8, 9), np.float32))
    with pytest.raises(InputError, match="empty"):
        ArraySource(np.zeros((0, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"\(N, box, box\)"):
        ArraySource(np.zeros(8, np.float32))
