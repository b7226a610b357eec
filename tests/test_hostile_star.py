"""Hostile STAR input (issue 8, part 4): wrong types, missing columns, garbage text and binary
bytes, truncated files, and image references to missing files, non-MRC files and out-of-range
indices.

``read_star`` / ``open_source`` either refuse with a CryosiftError whose one-line message names
the STAR file, or (for mutations that leave a usable file) hand out consistent images; never
another exception type. Through ``cryosift filter`` a refusal is exit code 2, one line on
stderr and nothing left in the output folder; an accepted file filters to a readable output.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryosift.io import open_source, read_star, write_mrcs
from hostile_helpers import (
    address_space_limit,
    cli,
    cli_refuses,
    expect_refusal,
    outcome,
    record,
    write_tally,
)

N, BOX = 4, 8
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def _tally(tmp_path_factory):
    yield
    write_tally(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """Files the hostile STARs may point at: a valid stack, a 16 px stack, a text file with an
    MRC name, a folder with an MRC name, a truncated stack and a NaN stack."""
    d = tmp_path_factory.mktemp("star-library")
    rng = np.random.default_rng(0)
    write_mrcs(d / "stack.mrcs", rng.normal(size=(N, BOX, BOX)), 1.0)
    write_mrcs(d / "big.mrcs", rng.normal(size=(2, 16, 16)), 1.0)
    nan = rng.normal(size=(N, BOX, BOX)).astype(np.float32)
    nan[2, 3, 3] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mrcfile warns about the NaN
        write_mrcs(d / "nan.mrcs", nan, 1.0)
    raw = (d / "stack.mrcs").read_bytes()
    (d / "cut.mrcs").write_bytes(raw[: len(raw) - 100])
    (d / "text.mrcs").write_text("not an image\n" * 200)
    (d / "folder.mrcs").mkdir()
    return d


#: stacks an image name may point at (relative to the STAR's folder)
STACKS = ["stack.mrcs", "big.mrcs", "nan.mrcs", "cut.mrcs", "text.mrcs", "folder.mrcs",
          "missing.mrcs", "hostile.star", "../stack.mrcs", "/dev/zero", "/nonexistent/x.mrcs",
          "stack.mrcs:1", "", "stack"]

OPTICS_COLS = {
    "rlnOpticsGroup": "1",
    "rlnOpticsGroupName": "opticsGroup1",
    "rlnAmplitudeContrast": "0.1",
    "rlnSphericalAberration": "2.7",
    "rlnVoltage": "300",
    "rlnImagePixelSize": "1.0",
    "rlnImageSize": str(BOX),
    "rlnImageDimensionality": "2",
}
PARTICLE_COLS = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
                 "rlnOpticsGroup"]


def _good_particles() -> dict[str, list[str]]:
    return {
        "rlnImageName": [f"{i:06d}@stack.mrcs" for i in range(1, N + 1)],
        "rlnDefocusU": ["10000.0"] * N,
        "rlnDefocusV": ["9800.0"] * N,
        "rlnDefocusAngle": ["12.5"] * N,
        "rlnOpticsGroup": ["1"] * N,
    }


def _loop(name: str, cols: dict[str, list[str]]) -> str:
    lines = ["", "# version 30001", "", f"data_{name}", "", "loop_"]
    lines += [f"_{c} #{i}" for i, c in enumerate(cols, 1)]
    n = max((len(v) for v in cols.values()), default=0)
    for r in range(n):
        lines.append("\t".join(v[r] if r < len(v) else "" for v in cols.values()))
    return "\n".join(lines) + "\n"


def _star_text(optics: dict[str, str] | None, particles: dict[str, list[str]]) -> str:
    text = "" if optics is None else _loop("optics", {k: [v] for k, v in optics.items()})
    return text + _loop("particles", particles)


GOOD = _star_text(OPTICS_COLS, _good_particles())


class _Case:
    """A STAR file inside a fresh folder next to (a copy of) the library; output folder beside."""

    def __init__(self, library: Path, data: bytes) -> None:
        self._dir = tempfile.TemporaryDirectory()
        root = Path(self._dir.name)
        self.dir = root / "job"
        self.dir.mkdir()
        for f in library.iterdir():  # symlinks: cheap, and reads must follow them
            (self.dir / f.name).symlink_to(f)
        (root / "stack.mrcs").symlink_to(library / "stack.mrcs")  # for '../stack.mrcs'
        self.path = self.dir / "hostile.star"
        self.path.write_bytes(data)
        self.out = root / "out"
        self.out.mkdir()

    def __enter__(self) -> _Case:
        return self

    def __exit__(self, *exc) -> None:
        self._dir.cleanup()

    def filter_argv(self, flt: str = "--lowpass") -> list[str]:
        argv = ["filter", str(self.path), "-o", str(self.out / "f.star"), flt]
        return argv + (["10"] if flt in ("--lowpass", "--wiener") else [])


def _check(case: _Case, family: str, flt: str = "--lowpass") -> bool:
    """The property every hostile STAR must satisfy; returns whether it was refused."""
    with address_space_limit():
        refused, result = outcome(lambda: read_star(case.path), case.path.name)
        if not refused:
            refused, result = outcome(lambda: open_source(case.path), case.path.name)
        if not refused:
            src = result
            refused, result = outcome(lambda: src.images(slice(None)), "")
    record(family, refused)
    if refused:
        cli_refuses(case.filter_argv(flt), case.out)
        return True
    images = result
    assert images.dtype == np.float32 and images.shape == (len(src), src.box, src.box)
    assert np.isfinite(images).all()
    code, err = cli(case.filter_argv(flt))
    lines = err.strip().splitlines()
    if code == 0:
        out = open_source(case.out / "f.star")
        assert len(out) == len(src)
    else:  # the filter may still refuse what the reader accepted (say, no usable pixel size)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("cryosift: error: "), err
        assert not list(case.out.iterdir())
    return False


# ------------------------------------------------------------------ cell-level mutations

_TOKENS = st.one_of(
    st.sampled_from(["abc", "nan", "inf", "-inf", "-1", "0", "1e308", "1e-320", "None", '""',
                     "1.5", "3", "99999999999999999999", "-0", "0x10", "True", "#", "_rlnX",
                     "loop_", "data_", "\u00e9\u00e8", "\x00", "1@stack.mrcs"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1,
            max_size=12),
)
_INDICES = st.one_of(st.integers(-3, N + 3), st.sampled_from([10**6, 2**31, 2**63, 10**30]))
_IMAGE_NAMES = st.one_of(
    st.builds(lambda i, s: f"{i}@{s}", _INDICES, st.sampled_from(STACKS)),
    _TOKENS,
)


@st.composite
def _mutated_table(draw):
    optics = dict(OPTICS_COLS)
    parts = _good_particles()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["name", "cell", "optics", "drop", "drop_optics",
                                     "no_optics", "extra_row", "relion30"]))
        if kind == "name" and "rlnImageName" in parts:
            parts["rlnImageName"][draw(st.integers(0, N - 1))] = draw(_IMAGE_NAMES)
        elif kind == "cell" and set(parts) - {"rlnImageName"}:
            col = draw(st.sampled_from(sorted(set(parts) - {"rlnImageName"})))
            parts[col][draw(st.integers(0, N - 1))] = draw(_TOKENS)
        elif kind == "optics" and optics:
            optics[draw(st.sampled_from(sorted(optics)))] = draw(_TOKENS)
        elif kind == "drop" and len(parts) > 1:
            parts.pop(draw(st.sampled_from(sorted(parts))))
        elif kind == "drop_optics" and optics:
            optics.pop(draw(st.sampled_from(sorted(optics))))
        elif kind == "no_optics":
            optics = None
        elif kind == "relion30":  # microscope values in the particle rows, no optics table
            optics = None
            col = draw(st.sampled_from(["rlnVoltage", "rlnSphericalAberration",
                                        "rlnAmplitudeContrast", "rlnImagePixelSize"]))
            parts[col] = [draw(_TOKENS)] * N
        elif kind == "extra_row":
            for v in parts.values():
                v.append(v[-1])
    return _star_text(optics if optics else None, parts)


@settings(max_examples=120, **SETTINGS)
@given(text=_mutated_table(), flt=st.sampled_from(["--lowpass", "--phase-flip", "--wiener"]))
def test_wrong_types_missing_columns_and_bad_references(library, text, flt):
    """Cells of the wrong type (CTF, optics, microscope values), columns missing, references
    to missing/non-MRC/NaN stacks and out-of-range indices; filtered with a plain low-pass or
    with CTF filters that read the (possibly hostile) CTF columns."""
    with _Case(library, text.encode("utf-8", "surrogatepass")) as case:
        _check(case, "star: wrong types/columns/refs", flt)


# ------------------------------------------------------------------ must be refused


@settings(max_examples=40, **SETTINGS)
@given(row=st.integers(0, N - 1), index=st.one_of(st.integers(N + 1, 2**62),
                                                  st.integers(-(2**62), 0)))
def test_out_of_range_indices_refused(library, row, index):
    parts = _good_particles()
    parts["rlnImageName"][row] = f"{index:06d}@stack.mrcs"
    with _Case(library, _star_text(OPTICS_COLS, parts).encode()) as case:
        err = expect_refusal(lambda: open_source(case.path), case.path.name)
        assert f"row {row + 1}" in str(err)
        record("star: index out of range", True)
        cli_refuses(case.filter_argv(), case.out, case.path.name)


@pytest.mark.parametrize("stack", ["missing.mrcs", "text.mrcs", "folder.mrcs", "cut.mrcs",
                                   "/dev/zero", "hostile.star", "/nonexistent/x.mrcs"])
def test_references_to_missing_or_non_mrc_files_refused(library, stack):
    parts = _good_particles()
    parts["rlnImageName"][1] = f"2@{stack}"
    with _Case(library, _star_text(OPTICS_COLS, parts).encode()) as case:
        err = expect_refusal(lambda: open_source(case.path), case.path.name)
        assert stack.split("/")[-1] in str(err)
        record("star: reference to missing/non-MRC", True)
        cli_refuses(case.filter_argv(), case.out, case.path.name)


def test_reference_to_nan_stack_refused_on_read(library):
    parts = _good_particles()
    parts["rlnImageName"] = [f"{i}@nan.mrcs" for i in range(1, N + 1)]
    with _Case(library, _star_text(OPTICS_COLS, parts).encode()) as case:
        src = open_source(case.path)
        err = expect_refusal(lambda: src.images(slice(None)), "nan.mrcs")
        assert "image 3 " in str(err) and "NaN" in str(err)
        record("star: reference to NaN stack", True)
        cli_refuses(case.filter_argv(), case.out, "nan.mrcs")


@pytest.mark.parametrize("drop", ["rlnImageName"])
def test_missing_image_name_column_refused(library, drop):
    parts = _good_particles()
    parts.pop(drop)
    with _Case(library, _star_text(OPTICS_COLS, parts).encode()) as case:
        expect_refusal(lambda: open_source(case.path), case.path.name)
        record("star: missing rlnImageName", True)
        cli_refuses(case.filter_argv(), case.out, case.path.name)


# ------------------------------------------------------------------ text and byte damage


@settings(max_examples=60, **SETTINGS)
@given(keep=st.floats(0.0, 1.0), insert=st.binary(max_size=40), at=st.floats(0.0, 1.0),
       binary_only=st.booleans())
def test_truncated_or_binary_damaged_star(library, keep, insert, at, binary_only):
    raw = GOOD.encode()
    if binary_only:
        raw = insert * 30
    else:
        raw = raw[: int(len(raw) * keep)]
        pos = int(len(raw) * at)
        raw = raw[:pos] + insert + raw[pos:]
    with _Case(library, raw) as case:
        _check(case, "star: truncated/binary bytes")


@settings(max_examples=40, **SETTINGS)
@given(text=st.text(max_size=400))
def test_random_text_star(library, text):
    with _Case(library, text.encode("utf-8", "surrogatepass")) as case:
        refused = _check(case, "star: random text")
        assert refused  # random text cannot point at a valid stack


@settings(max_examples=40, **SETTINGS)
@given(lines=st.lists(st.sampled_from(GOOD.splitlines()), max_size=40))
def test_shuffled_star_lines(library, lines):
    """Valid lines in the wrong order/number: headers without loops, rows without headers."""
    with _Case(library, ("\n".join(lines) + "\n").encode()) as case:
        _check(case, "star: shuffled lines")
