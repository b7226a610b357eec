"""RELION STAR particle tables: read 3.0 and 3.1+ (optics groups) with ``starfile``, write 3.1.

Column names are as ``starfile`` gives them (``rlnImageName``, no leading underscore).

Writing does not go through ``starfile.write``: RELION 3.1 expects the ``# version 30001`` line
before each block, ``starfile`` formats floats with ``%.6f`` by default (angles such as
123.456789012 would lose digits) and quotes strings with a Python call per cell (slow for 10^7
particles). Here every column is formatted by pandas' C writer: float64 values with their
shortest exact representation, float32 columns with the shortest representation that reads
back to the same float32, booleans as 0/1, strings with whitespace quoted.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from cryosift.errors import InputError
from cryosift.io.atomic import atomic_write_text

__all__ = [
    "ParticleTable",
    "image_names",
    "make_optics_table",
    "merged_metadata",
    "rebase_image_columns",
    "parse_image_name",
    "pixel_size_of",
    "read_star",
    "split_image_names",
    "write_star",
]

RELION_VERSION_LINE = "# version 30001"
_IMAGE_NAME_RE = re.compile(r"^(\d+)@(.+)$")


@dataclass
class ParticleTable:
    """A particle STAR file: the particle rows, the optics table (3.1+) and the layout version."""

    particles: pd.DataFrame
    optics: pd.DataFrame | None
    version: str  # "3.0" (no optics table) or "3.1" (data_optics + data_particles)

    def __len__(self) -> int:
        return len(self.particles)


def read_star(path: str | Path) -> ParticleTable:
    """Read a RELION particle STAR file (3.0: one loop block; 3.1+: ``data_optics`` + particles).

    The particle table is the ``data_particles`` block if present, else the loop block that has
    ``rlnImageName``, else the only loop block of the file. Refuses (InputError naming the file)
    a missing file, a file that holds no STAR data blocks, and a file with no particle table.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path)
    if not path.is_file():
        raise InputError("is not a regular file", path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as err:  # starfile/pandas raise many types on malformed text
        detail = " ".join(str(err).split())  # parser messages span lines; ours is one line
        raise InputError(f"not a readable STAR file ({type(err).__name__}: {detail})",
                         path) from err
    if not blocks:
        raise InputError("not a STAR file: no data blocks found", path)
    loops = {name: df for name, df in blocks.items() if isinstance(df, pd.DataFrame)}
    optics = loops.get("optics")

    particles: pd.DataFrame | None = loops.get("particles")
    if particles is None:
        others = {k: v for k, v in loops.items() if k != "optics"}
        with_names = [v for v in others.values() if "rlnImageName" in v.columns]
        if with_names:
            particles = with_names[0]
        elif len(others) == 1 and optics is None:
            particles = next(iter(others.values()))
    if particles is None:
        names = ", ".join(f"data_{k}" for k in blocks) or "none"
        raise InputError(f"no particle table found (data blocks: {names})", path)
    particles = particles.reset_index(drop=True)
    _check_numeric(particles, "particles", path)
    if optics is not None:
        optics = optics.reset_index(drop=True)
        _check_numeric(optics, "optics", path)
    return ParticleTable(particles=particles, optics=optics, version="3.1" if optics is not None
                         else "3.0")


#: RELION columns that always hold numbers; text in them means a corrupt or hand-broken file
NUMERIC_COLUMNS = frozenset(
    "rlnOpticsGroup rlnVoltage rlnSphericalAberration rlnAmplitudeContrast rlnImagePixelSize "
    "rlnPixelSize rlnDetectorPixelSize rlnMagnification rlnImageSize rlnImageDimensionality "
    "rlnDefocusU rlnDefocusV rlnDefocusAngle rlnPhaseShift rlnCtfBfactor rlnCtfScalefactor "
    "rlnOriginX rlnOriginY rlnOriginXAngst rlnOriginYAngst rlnAngleRot rlnAngleTilt "
    "rlnAnglePsi rlnCoordinateX rlnCoordinateY rlnClassNumber rlnRandomSubset "
    "rlnGroupNumber rlnCtfMaxResolution rlnCtfFigureOfMerit".split()
)


def _check_numeric(df: pd.DataFrame, block: str, path: Path) -> None:
    """Refuse text in a column RELION defines as numeric (free for columns parsed as numbers)."""
    for col in df.columns:
        if col not in NUMERIC_COLUMNS or pd.api.types.is_numeric_dtype(df[col]):
            continue
        bad = pd.to_numeric(df[col], errors="coerce").isna() & df[col].notna()
        if bad.any():
            row = int(np.argmax(bad.to_numpy()))
            raise InputError(
                f"data_{block} row {row + 1}: {col} is {df[col].iloc[row]!r}, not a number", path
            )


def make_optics_table(
    pixel_size: float,
    box: int,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    name: str = "opticsGroup1",
) -> pd.DataFrame:
    """One RELION 3.1 optics group (number 1) for 2D images of ``box`` px at ``pixel_size`` Å."""
    if not math.isfinite(float(pixel_size)) or float(pixel_size) <= 0:
        raise ValueError(f"pixel size must be a positive number of Å, got {pixel_size!r}")
    return pd.DataFrame(
        {
            "rlnOpticsGroup": [1],
            "rlnOpticsGroupName": [str(name)],
            "rlnAmplitudeContrast": [float(amplitude_contrast)],
            "rlnSphericalAberration": [float(cs)],
            "rlnVoltage": [float(voltage)],
            "rlnImagePixelSize": [float(pixel_size)],
            "rlnImageSize": [int(box)],
            "rlnImageDimensionality": [2],
        }
    )


def image_names(n: int, stack_relpath: str | Path, start: int = 0) -> list[str]:
    """RELION image names ``000001@stack.mrcs`` ... for images start..start+n-1 (0-based).

    The index written is 1-based and zero-padded to 6 digits as RELION does.
    """
    stack = Path(stack_relpath).as_posix() if isinstance(stack_relpath, Path) else stack_relpath
    return [f"{i:06d}@{stack}" for i in range(start + 1, start + n + 1)]


def parse_image_name(s: str, path: str | Path | None = None) -> tuple[int, str]:
    """Split a RELION image name ``index@stack`` into (0-based index, stack path).

    Refuses (InputError, naming ``path`` when given) anything that is not a positive integer,
    an ``@`` and a non-empty path.
    """
    m = _IMAGE_NAME_RE.match(s.strip()) if isinstance(s, str) else None
    if m is None or int(m.group(1)) < 1:
        raise InputError(
            f"malformed image name {s!r} (expected 'index@stack.mrcs' with a 1-based index)", path
        )
    return int(m.group(1)) - 1, m.group(2)


def split_image_names(
    names: pd.Series, path: str | Path | None = None
) -> tuple[np.ndarray, pd.Series]:
    """Vectorised :func:`parse_image_name` over a column: (0-based indices int64, stack paths).

    The first malformed name raises InputError naming ``path`` and the row (1-based).
    """
    s = names.astype("string").str.strip()
    num, at, stack = (col for _, col in s.str.partition("@").items())
    ok = (
        (at == "@").fillna(False)
        & num.str.isdecimal().fillna(False)
        & (stack.str.len() > 0).fillna(False)
    ).to_numpy(dtype=bool)
    # indices beyond int64 (say 10**30@x.mrcs) cannot be in any stack: parse them as a huge
    # value so that the range check names them, instead of overflowing here
    huge = (num.str.lstrip("0").str.len() > 18).fillna(False).to_numpy(dtype=bool)
    idx = np.zeros(len(s), dtype=np.int64)
    idx[ok & ~huge] = num[ok & ~huge].astype("int64").to_numpy()
    idx[ok & huge] = np.iinfo(np.int64).max // 2
    ok &= idx >= 1
    if not ok.all():
        row = int(np.argmin(ok))
        raise InputError(
            f"row {row + 1}: malformed image name {names.iloc[row]!r} "
            "(expected 'index@stack.mrcs' with a 1-based index)",
            path,
        )
    return idx - 1, stack.astype(object)


def _positive(value: object) -> float | None:
    """A finite positive float, else None."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def pixel_size_of(table: ParticleTable) -> float | None:
    """Image pixel size in Å that the STAR file states, or None.

    Looks at, in order: ``rlnImagePixelSize`` of the optics table (the first group; callers that
    care about several groups compare them), ``rlnImagePixelSize`` or ``rlnPixelSize`` of the
    particle rows (RELION 3.0), then ``rlnDetectorPixelSize`` (µm) * 1e4 / ``rlnMagnification``.
    """
    if table.optics is not None and "rlnImagePixelSize" in table.optics and len(table.optics):
        return _positive(table.optics["rlnImagePixelSize"].iloc[0])
    p = table.particles
    if not len(p):
        return None
    for col in ("rlnImagePixelSize", "rlnPixelSize"):
        if col in p:
            return _positive(p[col].iloc[0])
    if "rlnDetectorPixelSize" in p and "rlnMagnification" in p:
        det = _positive(p["rlnDetectorPixelSize"].iloc[0])
        mag = _positive(p["rlnMagnification"].iloc[0])
        if det is not None and mag is not None:
            return det * 1e4 / mag
    return None


def merged_metadata(table: ParticleTable) -> pd.DataFrame:
    """Particle rows with their optics group's columns joined on (same rows, same order).

    Columns the particle table already has are kept from the particles (RELION 3.0 style
    per-particle values win). Without an optics table this is a copy of the particles.
    """
    parts = table.particles
    optics = table.optics
    if optics is None or not len(optics):
        return parts.copy()
    extra = [c for c in optics.columns if c not in parts.columns]
    if "rlnOpticsGroup" not in parts.columns:
        if len(optics) != 1:
            raise InputError(
                f"particles have no rlnOpticsGroup but the optics table has {len(optics)} groups"
            )
        merged = parts.copy()
        for c in extra:
            merged[c] = optics[c].iloc[0]
        return merged
    if "rlnOpticsGroup" not in optics.columns:
        raise InputError("particles name an rlnOpticsGroup but the optics table has no "
                         "rlnOpticsGroup column")
    if optics["rlnOpticsGroup"].duplicated().any():
        dup = optics.loc[optics["rlnOpticsGroup"].duplicated(), "rlnOpticsGroup"].iloc[0]
        raise InputError(f"optics table lists group {dup} more than once")
    _check_groups(optics["rlnOpticsGroup"], parts["rlnOpticsGroup"])
    # join on the numeric group (a text column of "1"s must still match integer groups)
    key = "__cryosift_optics_group"
    left = parts.assign(**{key: pd.to_numeric(parts["rlnOpticsGroup"], errors="coerce")})
    right = optics[extra].assign(**{key: pd.to_numeric(optics["rlnOpticsGroup"],
                                                       errors="coerce")})
    merged = left.merge(right, on=key, how="left", sort=False).drop(columns=key)
    merged.index = parts.index
    return merged


def _check_groups(defined: pd.Series, used: pd.Series) -> None:
    """Optics groups are whole numbers and every particle's group is defined (InputError)."""
    d = pd.to_numeric(defined, errors="coerce")
    bad = d.isna() | (d != np.round(d))
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise InputError(f"optics table row {row + 1}: rlnOpticsGroup {defined.iloc[row]!r} is "
                         "not a whole number")
    u = pd.to_numeric(used, errors="coerce")
    unknown = (~u.isin(d)).to_numpy()
    if unknown.any():
        row = int(np.argmax(unknown))
        raise InputError(f"particle row {row + 1} has rlnOpticsGroup {used.iloc[row]!r}, which "
                         "the optics table does not define")


def _format_column(col: pd.Series, name: str) -> pd.Series:
    """Prepare one column for pandas' CSV writer so the text reads back exactly."""
    if pd.api.types.is_bool_dtype(col):
        return col.astype(np.int8)
    if pd.api.types.is_float_dtype(col) or pd.api.types.is_integer_dtype(col):
        return col  # float64: shortest exact repr; float32: shortest float32 repr
    s = col.astype("string")
    if s.str.contains(r"[\t\n\r]", regex=True, na=False).any():
        raise ValueError(f"column {name} holds a tab or newline, which STAR cannot represent")
    needs_quotes = s.str.contains(r"\s", regex=True, na=False) | (s == "").fillna(False)
    if needs_quotes.any():
        s = s.where(~needs_quotes, '"' + s + '"')
    return s


def _loop_block(name: str, df: pd.DataFrame) -> str:
    """One ``data_<name>`` loop block in RELION's layout."""
    lines = ["", RELION_VERSION_LINE, "", f"data_{name}", "", "loop_ "]
    cols = [str(c).lstrip("_") for c in df.columns]
    lines += [f"_{c} #{i} " for i, c in enumerate(cols, 1)]
    body = pd.DataFrame({c: _format_column(df[c], str(c)) for c in df.columns})
    text = body.to_csv(
        sep="\t",
        header=False,
        index=False,
        na_rep="nan",
        quoting=csv.QUOTE_NONE,
        lineterminator="\n",
    )
    return "\n".join(lines) + "\n" + text + "\n"


def write_star(path: str | Path, particles: pd.DataFrame, optics: pd.DataFrame) -> None:
    """Write a RELION 3.1 particle STAR file (``data_optics`` then ``data_particles``) atomically.

    Every particle row gets an ``rlnOpticsGroup`` (filled in when the optics table has one group
    and the particles have none); groups must exist in ``optics``. Floats are written so that
    they read back exactly (float64 and float32 columns alike).
    """
    if "rlnOpticsGroup" not in optics.columns or not len(optics):
        raise ValueError("optics table needs at least one row and an rlnOpticsGroup column")
    if optics["rlnOpticsGroup"].duplicated().any():
        raise ValueError("optics table lists an rlnOpticsGroup more than once")
    parts = particles.reset_index(drop=True)
    if "rlnOpticsGroup" not in parts.columns:
        if len(optics) != 1:
            raise ValueError(
                "particles need an rlnOpticsGroup column when the optics table has several groups"
            )
        parts = parts.copy()
        parts["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    groups = parts["rlnOpticsGroup"]
    unknown = ~groups.isin(optics["rlnOpticsGroup"])
    if unknown.any():
        raise ValueError(
            f"particle row {int(np.argmax(unknown.to_numpy())) + 1} has rlnOpticsGroup "
            f"{groups[unknown].iloc[0]!r}, which the optics table does not define"
        )
    text = _loop_block("optics", optics.reset_index(drop=True)) + _loop_block("particles", parts)
    atomic_write_text(path, text)


def rebase_image_columns(
    parts: pd.DataFrame, old_dir: Path, new_dir: Path, skip: tuple[str, ...] = ("rlnImageName",)
) -> pd.DataFrame:
    """Re-express relative ``index@path`` columns for a STAR file written in ``new_dir``.

    Columns such as cryosiftCleanImageName point at stacks relative to the folder of the STAR
    they came from; a STAR written elsewhere needs them relative to its own folder (absolute
    paths are left alone). Only columns whose name contains 'ImageName', not in ``skip``, and
    whose every value looks like ``index@path`` are touched. Returns a new frame.
    """
    old_dir, new_dir = Path(old_dir).resolve(), Path(new_dir).resolve()
    parts = parts.copy()
    if old_dir == new_dir:
        return parts
    for col in parts.columns:
        if col in skip or "ImageName" not in str(col):
            continue
        s = parts[col].astype("string")
        num, at, path = (c for _, c in s.str.partition("@").items())
        if not ((at == "@").fillna(False).all() and num.str.isdecimal().fillna(False).all()):
            continue
        mapping = {}
        for p in pd.unique(path.to_numpy(dtype=object)):
            pp = Path(str(p))
            mapping[p] = (
                str(p) if pp.is_absolute()
                else Path(os.path.relpath(old_dir / pp, new_dir)).as_posix()
            )
        parts[col] = (num + "@" + path.map(mapping)).astype(object)
    return parts
