"""Hostile MRC input (issue 8, part 4): random and mutated headers, truncated stacks, huge
declared sizes, NaN/Inf pixels and files that are not MRC at all.

Every case must end in a CryosiftError whose one-line message names the file (or, for a
mutation that happens to leave a valid file, in images consistent with the file's size); never
another exception type, never an allocation sized from an unchecked header (the reads run under
a lowered RLIMIT_AS), and through ``cryosift filter`` exit code 2, one line on stderr and no
output left behind. NaN/Inf pixels are refused (SPEC: bad input gets a clear error), when the
images holding them are read.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mrcfile.dtypes import HEADER_DTYPE

from cryosift.errors import CryosiftError
from cryosift.io import open_source, read_mrc_info
from hostile_helpers import (
    address_space_limit,
    cli_refuses,
    expect_refusal,
    outcome,
    record,
    write_tally,
)

N, BOX = 3, 8
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
INT32 = st.integers(-(2**31), 2**31 - 1)
SUPPORTED = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}  # mode -> bytes per pixel


@pytest.fixture(scope="module", autouse=True)
def _tally(tmp_path_factory):
    yield
    write_tally(tmp_path_factory.getbasetemp())


def _valid_bytes(mode: int = 2, n: int = N, box: int = BOX) -> bytes:
    """A valid stack written by mrcfile (1 Å/px), as bytes."""
    dtype = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}[mode]
    data = (np.random.default_rng(mode).normal(size=(n, box, box)) * 20).astype(dtype)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.mrcs"
        with mrcfile.new(p) as m:
            m.set_data(data)
            m.set_image_stack()
            m.voxel_size = 1.0
        return p.read_bytes()


VALID = {m: _valid_bytes(m) for m in SUPPORTED}


def _header(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw[:1024], dtype=HEADER_DTYPE).copy()


def _with_fields(raw: bytes, **fields) -> bytes:
    hdr = _header(raw)
    for name, value in fields.items():
        if name in ("cella_x", "cella_y", "cella_z"):
            hdr["cella"][name[-1]] = value
        else:
            hdr[name] = value
    return hdr.tobytes() + raw[1024:]


class _Case:
    """A hostile file in a fresh temporary folder, with an output folder beside it."""

    def __init__(self, data: bytes, suffix: str = ".mrcs") -> None:
        self._dir = tempfile.TemporaryDirectory()
        self.dir = Path(self._dir.name)
        self.path = self.dir / f"hostile{suffix}"
        self.path.write_bytes(data)
        self.out = self.dir / "out"
        self.out.mkdir()

    def __enter__(self) -> _Case:
        return self

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()

    def cli(self) -> str:
        return cli_refuses(
            ["filter", str(self.path), "-o", str(self.out / "f.star"), "--lowpass", "10"],
            self.out,
            self.path.name,
        )


def _read_all(path: Path) -> np.ndarray:
    src = open_source(path)
    return src.images(slice(None))


def _consistent(path: Path, images: np.ndarray) -> None:
    """An accepted file: its header and its size agree with what was handed out."""
    info = read_mrc_info(path)
    size = path.stat().st_size
    assert info.n >= 1 and info.nx == info.ny >= 1
    assert info.data_offset + info.n * info.nx * info.ny * info.dtype.itemsize <= size
    assert images.shape == (info.n, info.ny, info.nx) and images.dtype == np.float32
    assert np.isfinite(images).all()


# ------------------------------------------------------------------ mutations (any outcome)

_INT_FIELDS = ["nx", "ny", "nz", "mode", "nxstart", "nystart", "nzstart", "mx", "my", "mz",
               "mapc", "mapr", "maps", "ispg", "nsymbt", "nversion", "nlabl"]
_FLOAT_FIELDS = ["cella_x", "cella_y", "cella_z", "dmin", "dmax", "dmean", "rms"]
_SPECIAL_INTS = st.sampled_from([0, 1, -1, 2, 3, 4, 5, 6, 12, 101, 7, 8, 16, 1024, 2**16,
                                 2**31 - 1, -(2**31), 2**24 + 2, 0x02000000])
_FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=32)

_mutation = st.one_of(
    st.tuples(st.sampled_from(_INT_FIELDS), st.one_of(_SPECIAL_INTS, INT32)),
    st.tuples(st.sampled_from(_FLOAT_FIELDS), _FLOATS),
    st.tuples(st.sampled_from(["map", "machst", "exttyp"]), st.binary(min_size=4, max_size=4)),
)


@settings(max_examples=150, **SETTINGS)
@given(
    mode=st.sampled_from(sorted(SUPPORTED)),
    mutations=st.lists(_mutation, min_size=1, max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1024 + 4 * N * BOX * BOX)),
    junk=st.binary(max_size=64),
)
def test_mutated_headers_refused_or_consistent(mode, mutations, cut, junk):
    """Any mix of header mutations, truncation and trailing junk: refused with a clear error,
    or (when the mutation leaves a valid file) images consistent with the file's size."""
    hdr = _header(VALID[mode])
    for name, value in mutations:
        if name.startswith("cella_"):
            hdr["cella"][name[-1]] = value
        elif name in ("map", "machst"):
            hdr[name] = np.frombuffer(value, dtype="u1") if name == "machst" else value
        elif name == "exttyp":
            hdr[name] = value
        else:
            hdr[name] = value
    data = hdr.tobytes() + VALID[mode][1024:]
    if cut is not None:
        data = data[:cut]
    data += junk
    with _Case(data) as case, address_space_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile may warn about odd headers; not our concern
        t0 = time.perf_counter()
        refused, result = outcome(lambda: _read_all(case.path), case.path.name)
        assert time.perf_counter() - t0 < 5
        record("mrc: mutated header", refused)
        if refused:
            case.cli()
        else:
            _consistent(case.path, result)


@settings(max_examples=60, **SETTINGS)
@given(data=st.binary(max_size=3000), suffix=st.sampled_from([".mrcs", ".mrc", ".st", ".map"]))
def test_random_bytes_refused(data, suffix):
    """Random bytes under an MRC name (including empty files and short headers)."""
    with _Case(data, suffix) as case, address_space_limit():
        refused, result = outcome(lambda: _read_all(case.path), case.path.name)
        record("mrc: random bytes", refused)
        if refused:
            case.cli()
        else:  # astronomically unlikely, but then it must really be valid
            _consistent(case.path, result)


@settings(max_examples=60, **SETTINGS)
@given(mode=st.sampled_from(sorted(SUPPORTED)), flips=st.lists(
    st.tuples(st.integers(0, 1023), st.integers(0, 255)), min_size=1, max_size=12))
def test_byte_flips_in_header_refused_or_consistent(mode, flips):
    raw = bytearray(VALID[mode])
    for pos, value in flips:
        raw[pos] = value
    with _Case(bytes(raw)) as case, address_space_limit(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused, result = outcome(lambda: _read_all(case.path), case.path.name)
        record("mrc: header byte flips", refused)
        if refused:
            case.cli()
        else:
            _consistent(case.path, result)


# ------------------------------------------------------------------ must be refused


def _known_after_swap(mode: int) -> bool:
    """Would the reader take this mode as a supported one read in the other byte order?"""
    swapped = int(np.array([mode], dtype="<i4").view(">i4")[0])
    return swapped in {0, 1, 2, 3, 4, 6, 12, 101}


@settings(max_examples=60, **SETTINGS)
@given(mode=INT32.filter(lambda m: m not in SUPPORTED and not _known_after_swap(m)))
def test_unsupported_modes_refused(mode):
    with _Case(_with_fields(VALID[2], mode=mode)) as case:
        err = expect_refusal(lambda: open_source(case.path), case.path.name)
        assert "mode" in str(err)
        record("mrc: unsupported mode", True)
        case.cli()


@settings(max_examples=80, **SETTINGS)
@given(
    mode=st.sampled_from(sorted(SUPPORTED)),
    nx=st.one_of(st.integers(-(2**31), 0), st.integers(1, 2**31 - 1)),
    nz=st.one_of(st.integers(-(2**31), 0), st.integers(1, 2**31 - 1)),
    nsymbt=st.one_of(st.just(0), st.integers(-(2**31), -1), st.integers(1, 2**31 - 1)),
    square=st.booleans(),
)
def test_impossible_dimensions_refused_without_allocating(mode, nx, nz, nsymbt, square):
    """Non-positive, negative or huge nx/ny/nz and extended headers: refused in well under a
    second, with the address space capped at 1 GiB above the current size (a buffer sized from
    the header would fail with MemoryError instead)."""
    ny = nx if square else max(1, nx // 2)
    declared = 1024 + nsymbt + nx * ny * nz * SUPPORTED[mode]
    size = len(VALID[mode])
    assume(nx <= 0 or nz <= 0 or nsymbt < 0 or declared > size or nx != ny)
    raw = _with_fields(VALID[mode], nx=nx, ny=ny, nz=nz, nsymbt=nsymbt, mx=max(nx, 1))
    with _Case(raw) as case, address_space_limit(1 << 30):
        t0 = time.perf_counter()
        expect_refusal(lambda: _read_all(case.path), case.path.name)
        assert time.perf_counter() - t0 < 1.0
        record("mrc: impossible/huge dimensions", True)
        case.cli()


@settings(max_examples=40, **SETTINGS)
@given(mode=st.sampled_from(sorted(SUPPORTED)), keep=st.floats(0.0, 0.999))
def test_truncated_stacks_refused(mode, keep):
    raw = VALID[mode]
    cut = int(len(raw) * keep)
    assume(cut < len(raw))
    with _Case(raw[:cut]) as case:
        err = expect_refusal(lambda: open_source(case.path), case.path.name)
        assert "truncated" in str(err) or "shorter" in str(err)
        record("mrc: truncated stack", True)
        case.cli()


@settings(max_examples=40, **SETTINGS)
@given(
    mode=st.sampled_from([2, 12]),
    where=st.lists(st.tuples(st.integers(0, N - 1), st.integers(0, BOX * BOX - 1)),
                   min_size=1, max_size=5),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_nan_and_inf_pixels_refused(mode, where, value):
    """Float stacks holding NaN/Inf: opening is cheap (header only), reading the image refuses
    it naming the file and the first bad image (1-based)."""
    dtype = np.float32 if mode == 2 else np.float16
    raw = bytearray(VALID[mode])
    pixels = np.frombuffer(raw, dtype=dtype, offset=1024, count=N * BOX * BOX).copy()
    for img, px in where:
        pixels[img * BOX * BOX + px] = value
    raw[1024:] = pixels.tobytes()
    first = min(img for img, _ in where) + 1
    with _Case(bytes(raw)) as case:
        src = open_source(case.path)
        err = expect_refusal(lambda: src.images(slice(None)), case.path.name)
        assert f"image {first} " in str(err) and ("NaN" in str(err) or "infinite" in str(err))
        record("mrc: NaN/Inf pixels", True)
        case.cli()


# ------------------------------------------------------------------ not MRC files at all


def test_things_that_are_not_mrc_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    cases: list[Path] = []
    d = tmp_path / "folder.mrcs"
    d.mkdir()
    cases.append(d)
    (tmp_path / "empty.mrcs").write_bytes(b"")
    cases.append(tmp_path / "empty.mrcs")
    (tmp_path / "text.mrc").write_text("this is not an image\n" * 100)
    cases.append(tmp_path / "text.mrc")
    (tmp_path / "pickle.mrcs").write_bytes(b"\x80\x04\x95" + os.urandom(2000))
    cases.append(tmp_path / "pickle.mrcs")
    (tmp_path / "dangling.mrcs").symlink_to(tmp_path / "nowhere.mrcs")
    cases.append(tmp_path / "dangling.mrcs")
    fifo = tmp_path / "fifo.mrcs"
    os.mkfifo(fifo)  # opening a FIFO for reading would block forever: must be refused first
    cases.append(fifo)
    cases.append(tmp_path / "missing.mrcs")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    cases.append(tmp_path / "image.png")
    (tmp_path / "noext").write_bytes(VALID[2])
    cases.append(tmp_path / "noext")
    for path in cases:
        expect_refusal(lambda p=path: open_source(p), path.name)
        record("mrc: not an MRC file", True)
        cli_refuses(["filter", str(path), "-o", str(out / "f.star"), "--lowpass", "10"], out,
                    path.name)


def test_refusal_is_a_cryosift_error_subclass() -> None:
    """The API contract the tests above rely on: all refusals share one base class."""
    from cryosift.errors import InputError

    assert issubclass(InputError, CryosiftError)


def test_address_space_guard_catches_a_header_sized_allocation() -> None:
    """The RLIMIT_AS guard the tests above rely on really turns a 2 GiB allocation into a
    MemoryError (np.empty touches no pages, so nothing is used if it were to succeed)."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("address-space limits are checked on Linux only")
    with address_space_limit(1 << 30), pytest.raises(MemoryError):
        np.empty(2 << 30, dtype=np.uint8)


@pytest.mark.parametrize("option", ["--reference", "--half-b"])
def test_evaluate_refuses_hostile_second_stacks(tmp_path: Path, option: str) -> None:
    """`cryosift evaluate GOOD --reference/--half-b HOSTILE`: exit 2, one line naming the
    hostile file, no JSON or plot written."""
    good = tmp_path / "good.mrcs"
    good.write_bytes(VALID[2])
    raw = bytearray(VALID[2])
    nan = np.frombuffer(raw, dtype=np.float32, offset=1024).copy()
    nan[5] = np.inf
    hostile = {
        "cut.mrcs": VALID[2][:-7],
        "mode.mrcs": _with_fields(VALID[2], mode=4),
        "huge.mrcs": _with_fields(VALID[2], nx=2**31 - 1, ny=2**31 - 1),
        "inf.mrcs": bytes(raw[:1024]) + nan.tobytes(),
        "bytes.mrcs": os.urandom(1500),
    }
    out = tmp_path / "out"
    out.mkdir()
    for name, data in hostile.items():
        (tmp_path / name).write_bytes(data)
        with address_space_limit():
            cli_refuses(["evaluate", str(good), option, str(tmp_path / name), "-o",
                         str(out / "e.json")], out, name)
        record("mrc: hostile second stack (evaluate)", True)
