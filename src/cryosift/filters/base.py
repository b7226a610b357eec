"""The filter interface, the registry, chains, and the streaming driver behind `cryosift filter`.

A :class:`Filter` maps a batch of images (B, H, W) float32 to a batch of the same shape. Filters
are per-image (no information crosses images, so chunking never changes a result), deterministic
and batched. What a filter may need beyond the pixels — the pixel size, and for the CTF filters
the STAR rows of the batch — travels in a :class:`BatchContext`.

:func:`apply_filter_to_source` streams any image source (STAR or bare stack) through a filter in
chunks and writes a new stack, a RELION 3.1 STAR pointing at it, and a provenance record, all
atomically: every output is written under a hidden temporary name and renamed into place only
once all of them are complete.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosift.errors import CryosiftError, InputError
from cryosift.filters.parallel import fixed_slice_size, map_slices

__all__ = [
    "CTF_COLUMNS",
    "FILTERS",
    "BatchContext",
    "Filter",
    "FilterChain",
    "apply_filter_to_source",
    "make_filter",
    "register",
]

#: STAR columns (particle rows merged with optics) a CTF-aware filter cannot do without.
CTF_COLUMNS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
)


@dataclass
class BatchContext:
    """What a filter may need besides the pixels of one batch.

    ``pixel_size`` in Å (None when unknown); ``metadata``: the batch's STAR rows merged with their
    optics-group columns (rlnDefocusU/V/Angle, rlnVoltage, ...), one row per image in the same
    order, or None for bare stacks.
    """

    pixel_size: float | None
    metadata: pd.DataFrame | None = None

    def subset(self, start: int, stop: int) -> BatchContext:
        """The context of images start..stop-1 of this batch."""
        meta = None if self.metadata is None else self.metadata.iloc[start:stop]
        return BatchContext(self.pixel_size, meta)


class Filter(ABC):
    """One image filter: ``filt(images, ctx) -> images``, (B, H, W) float32 in and out.

    Subclasses set ``name`` (the registry key), implement :meth:`params` (resolved parameters,
    recorded in the provenance) and :meth:`apply`, and may override :meth:`check` to refuse
    settings that cannot work for a given box and pixel size before any work is done.
    """

    name: str = ""
    #: True for filters that read CTF parameters from ``ctx.metadata``.
    needs_ctf: bool = False
    #: True when the filter cannot run without knowing the pixel size.
    needs_pixel_size: bool = False
    #: Run :meth:`apply` on slices of the batch in parallel threads (see filters.parallel).
    threaded: bool = True

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Resolved parameters (JSON-ready), as recorded in the provenance."""

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., **params}``: the filter as recorded in provenance files."""
        return {"name": self.name, **self.params()}

    def check(self, pixel_size: float | None, box: int) -> None:
        """Raise CryosiftError if this filter cannot run on ``box``-px images at ``pixel_size``."""
        if self.needs_pixel_size and pixel_size is None:
            raise CryosiftError(
                f"filter '{self.name}' needs the pixel size, but the input does not state one "
                "(give --pixel-size)"
            )

    @abstractmethod
    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        """Filter a validated, C-contiguous float32 batch (B, H, W) with B >= 1 into a new array
        (``images`` may be the caller's own array: never modify it)."""

    def __call__(self, images: np.ndarray, ctx: BatchContext | None = None) -> np.ndarray:
        """Filter ``images`` (B, H, W) (or one (H, W) image) and return float32 of that shape."""
        arr = np.asarray(images)
        single = arr.ndim == 2
        if single:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
            raise ValueError(f"expected square images (B, H, W), got shape {arr.shape}")
        if ctx is None:
            ctx = BatchContext(pixel_size=None)
        if arr.shape[0] == 0:
            return np.zeros(arr.shape, dtype=np.float32)
        batch = np.ascontiguousarray(arr, dtype=np.float32)
        self.check(ctx.pixel_size, batch.shape[-1])
        if self.needs_ctf:
            check_ctf_metadata(ctx.metadata, batch.shape[0], self.name)
        if self.threaded:  # fixed slices, in a worker too: the same output on any engine
            out = np.empty(batch.shape, dtype=np.float32)
            map_slices(lambda s, e: self.apply(batch[s:e], ctx.subset(s, e)), len(batch), out,
                       slice_size=fixed_slice_size(batch.shape[-1]))
        else:
            out = np.ascontiguousarray(self.apply(batch, ctx), dtype=np.float32)
        if out.shape != batch.shape:  # pragma: no cover - a bug in a filter, not bad input
            raise RuntimeError(f"filter '{self.name}' returned {out.shape} for {batch.shape}")
        return out[0] if single else out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class FilterChain(Filter):
    """Several filters applied in order, as one filter (``params()`` lists them in order).

    The whole chain runs on each thread's slice of the batch (the filters are per-image).
    """

    name = "chain"

    def __init__(self, filters: Sequence[Filter]) -> None:
        flat: list[Filter] = []
        for f in filters:
            if not isinstance(f, Filter):
                raise TypeError(f"FilterChain takes Filter objects, got {type(f).__name__}")
            flat.extend(f.filters if isinstance(f, FilterChain) else [f])
        if not flat:
            raise CryosiftError("a filter chain needs at least one filter")
        self.filters: list[Filter] = flat
        self.needs_ctf = any(f.needs_ctf for f in flat)
        self.needs_pixel_size = any(f.needs_pixel_size for f in flat)

    def params(self) -> dict[str, Any]:
        return {"filters": [f.describe() for f in self.filters]}

    def check(self, pixel_size: float | None, box: int) -> None:
        for f in self.filters:
            f.check(pixel_size, box)

    def apply(self, images: np.ndarray, ctx: BatchContext) -> np.ndarray:
        out = images
        for f in self.filters:
            out = f(out, ctx)
        return out

    def __len__(self) -> int:
        return len(self.filters)


# --------------------------------------------------------------------------------------------
# registry

FILTERS: dict[str, type[Filter]] = {}


def register(cls: type[Filter]) -> type[Filter]:
    """Class decorator: add a filter class to :data:`FILTERS` under its ``name``."""
    if not cls.name or cls.name in FILTERS:
        raise ValueError(f"filter name {cls.name!r} is empty or already registered")
    FILTERS[cls.name] = cls
    return cls


def make_filter(name: str, **params: Any) -> Filter:
    """A filter by its registry name with keyword parameters.

    Raises CryosiftError for an unknown name, an unknown parameter name, or a parameter value
    the filter refuses (σ <= 0, negative sizes, cutoffs beyond Nyquist, ...).
    """
    key = str(name).strip().lower()
    if key not in FILTERS:
        raise CryosiftError(f"unknown filter {name!r} (choose from {', '.join(sorted(FILTERS))})")
    cls = FILTERS[key]
    accepted = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise CryosiftError(
            f"filter '{key}' has no parameter {', '.join(map(repr, unknown))} "
            f"(accepts: {', '.join(accepted) or 'none'})"
        )
    return cls(**params)


# --------------------------------------------------------------------------------------------
# parameter checks shared by the filter modules


def positive(value: Any, what: str) -> float:
    """``value`` as a finite float > 0, else CryosiftError naming ``what``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise CryosiftError(f"{what} must be a positive number, got {value!r}")
    return v


def int_at_least(value: Any, lo: int, what: str) -> int:
    """``value`` as an int >= lo (floats with an integer value are accepted)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (math.isfinite(v) and v == int(v) and v >= lo):
        raise CryosiftError(f"{what} must be an integer >= {lo}, got {value!r}")
    return int(v)


def check_ctf_metadata(metadata: pd.DataFrame | None, n: int, who: str) -> None:
    """Refuse (CryosiftError) a batch without the CTF columns a CTF filter needs."""
    if metadata is None:
        raise CryosiftError(
            f"filter '{who}' needs CTF parameters, but the images come without metadata "
            f"(a bare stack): give a STAR file with {', '.join(CTF_COLUMNS[:3])}"
        )
    missing = [c for c in CTF_COLUMNS if c not in metadata.columns]
    if missing:
        raise CryosiftError(
            f"filter '{who}' needs CTF parameters, but the STAR file lacks "
            f"{', '.join(missing)}"
        )
    if len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} rows for {n} images")


# --------------------------------------------------------------------------------------------
# streaming driver


def _output_paths(out_star: Path) -> tuple[Path, Path]:
    """(stack, provenance JSON) written next to ``out_star``."""
    return out_star.with_suffix(".mrcs"), out_star.with_name(f"{out_star.stem}_filter.json")


def _same_file(a: Path, b: Path | None) -> bool:
    if b is None:
        return False
    try:
        return a.resolve() == Path(b).resolve()
    except OSError:  # pragma: no cover - unresolvable paths cannot be the same file
        return False


def _input_files(source: Any) -> list[Path]:
    """Every file the source reads: the STAR itself and its stacks, or the stack."""
    files = [p for p in [getattr(source, "path", None)] if p is not None]
    files += list(getattr(source, "stack_paths", []))
    return [Path(p) for p in files]


def _rebase_image_paths(parts: pd.DataFrame, old_dir: Path, new_dir: Path) -> pd.DataFrame:
    """Rewrite relative ``index@path`` columns (other than rlnImageName) for a new STAR folder.

    Columns such as cryosiftCleanImageName point at other stacks relative to the input STAR's
    folder; the output STAR may live elsewhere, so relative paths are re-expressed relative to
    it (absolute paths are left alone). Only columns whose name contains 'ImageName' and whose
    every value looks like ``index@path`` are touched.
    """
    if _same_file(old_dir, new_dir):
        return parts
    for col in parts.columns:
        if col == "rlnImageName" or "ImageName" not in str(col):
            continue
        s = parts[col].astype("string")
        num, at, path = (c for _, c in s.str.partition("@").items())
        if not ((at == "@").fillna(False).all() and num.str.isdecimal().fillna(False).all()):
            continue
        uniq = {}
        for p in pd.unique(path.to_numpy(dtype=object)):
            pp = Path(str(p))
            uniq[p] = (
                str(p) if pp.is_absolute()
                else Path(os.path.relpath(old_dir / pp, new_dir)).as_posix()
            )
        parts[col] = (num + "@" + path.map(uniq)).astype(object)
    return parts


def _output_tables(
    source: Any, stack_name: str, pixel_size: float, out_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(particles, optics) for the output STAR: input metadata kept, images re-pointed."""
    from cryosift.io.star import image_names, make_optics_table

    n, box = source.n_images, source.box
    names = image_names(n, stack_name)
    if source.metadata is None:
        parts = pd.DataFrame({"rlnImageName": names})
        return parts, make_optics_table(pixel_size, box)
    parts = source.metadata.copy().reset_index(drop=True)
    parts["rlnImageName"] = names
    if source.path is not None:
        parts = _rebase_image_paths(parts, Path(source.path).resolve().parent, out_dir.resolve())
    if source.optics is not None and len(source.optics):
        optics = source.optics.copy().reset_index(drop=True)
    else:  # RELION 3.0 input: microscope values, if any, stay in the particle rows
        kw = {}
        for col, arg in (
            ("rlnVoltage", "voltage"),
            ("rlnSphericalAberration", "cs"),
            ("rlnAmplitudeContrast", "amplitude_contrast"),
        ):
            if col in parts.columns:
                kw[arg] = float(parts[col].iloc[0])
        optics = make_optics_table(pixel_size, box, **kw)
        if "rlnOpticsGroup" in parts.columns:
            groups = pd.unique(parts["rlnOpticsGroup"])
            optics = pd.concat([optics] * len(groups), ignore_index=True)
            optics["rlnOpticsGroup"] = groups
            optics["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in groups]
    if "rlnImagePixelSize" not in optics.columns:
        optics["rlnImagePixelSize"] = pixel_size
    if "rlnImageSize" not in optics.columns:
        optics["rlnImageSize"] = box
    if "rlnImageDimensionality" not in optics.columns:
        optics["rlnImageDimensionality"] = 2
    return parts, optics


def _source_metadata(source: Any) -> pd.DataFrame | None:
    """Particle rows merged with their optics columns, or None for sources without metadata."""
    from cryosift.io.star import ParticleTable, merged_metadata

    if source.metadata is None:
        return None
    table = getattr(source, "table", None)
    if table is None:
        table = ParticleTable(source.metadata, source.optics, "3.1" if source.optics is not None
                              else "3.0")
    try:
        merged = merged_metadata(table)
    except InputError as err:
        raise InputError(str(err), source.path) from err
    return merged.reset_index(drop=True)


def apply_filter_to_source(
    source: Any,
    filt: Filter,
    out_star: str | Path,
    chunk_size: int = 256,
    *,
    pixel_size: float | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    task: Any = None,
) -> Path:
    """Stream ``source`` through ``filt`` into ``OUT.star``, ``OUT.mrcs`` and ``OUT_filter.json``.

    ``source``: an ImageSource, a path (.star or .mrcs) or an array; ``pixel_size`` overrides what
    the input states. ``scheduler`` / ``workers``: where the chunks are filtered (None: in this
    process; ``auto``, ``local``, a scheduler address or file: see :mod:`cryosift.engine`), with
    ``task`` the engine operation standing for ``filt`` on the workers (default: ``filt``
    itself, pickled). The output is the same wherever the chunks run.

    The output stack has the input's pixel size in its header; the STAR keeps every input
    column and the optics table (for a bare stack: one minimal optics group) with
    rlnImageName pointing at the new stack. Everything is refused before anything is written if
    the filter cannot run (CTF filters without CTF columns, cutoffs beyond Nyquist, no pixel
    size, output that would overwrite an input); on any failure nothing is left behind.
    """
    from cryosift.engine import FilterOp, SourceSpec, check_finite, open_engine
    from cryosift.io.source import open_source
    from cryosift.progress import progress

    t0 = time.time()
    src = open_source(source, pixel_size=pixel_size)
    out_star = Path(out_star)
    if out_star.suffix.lower() != ".star":
        raise CryosiftError(f"output must be a .star file, got '{out_star.name}'")
    if int(chunk_size) < 1:
        raise CryosiftError(f"chunk size must be at least 1, got {chunk_size}")
    stack_path, json_path = _output_paths(out_star)
    for target in (out_star, stack_path):
        for f in _input_files(src):
            if _same_file(target, f):
                raise CryosiftError(
                    f"output {target} would overwrite the input {f}; choose another -o"
                )
    px = src.pixel_size
    if px is None:
        raise InputError(
            "states no pixel size (MRC header voxel size 0 and no STAR optics); give --pixel-size",
            src.path,
        )
    filt.check(px, src.box)
    metadata = _source_metadata(src)
    if filt.needs_ctf:
        try:
            check_ctf_metadata(metadata, src.n_images, getattr(filt, "name", "?"))
        except CryosiftError as err:
            raise CryosiftError(str(err), src.path) from err
    parts, optics = _output_tables(src, stack_path.name, px, out_star.parent)

    label = filt.name if not isinstance(filt, FilterChain) else "+".join(
        f.name for f in filt.filters
    )
    with open_engine(
        scheduler or "threads", workers, src.n_images, file_based=src.path is not None
    ) as engine:
        out_star.parent.mkdir(parents=True, exist_ok=True)
        if engine is None:
            def fill(writer: Any) -> None:
                chunks = progress(
                    src.chunks(int(chunk_size)),
                    total=math.ceil(src.n_images / int(chunk_size)),
                    desc=f"filter {label}",
                    unit="chunk",
                )
                for start, chunk in chunks:
                    meta = None if metadata is None else metadata.iloc[start : start + len(chunk)]
                    out = filt(chunk, BatchContext(pixel_size=px, metadata=meta))
                    check_finite(out, start, label, src.path)
                    writer.append(out)

            execution: dict[str, Any] = {"engine": "threads"}
        else:
            def fill(writer: Any) -> None:  # the workers write the images, and check them
                engine.write_images(
                    SourceSpec.of(src),
                    task if task is not None else FilterOp.of(filt, label),
                    src.n_images,
                    int(chunk_size),
                    writer,
                    desc=f"filter {label}",
                )

            execution = engine.describe()
        _write_outputs(
            src, fill, filt, out_star, stack_path, json_path, parts, optics, px, chunk_size,
            execution, t0,
        )
    return out_star


def _write_outputs(
    src: Any,
    fill: Callable[[Any], None],
    filt: Filter,
    out_star: Path,
    stack_path: Path,
    json_path: Path,
    parts: pd.DataFrame,
    optics: pd.DataFrame,
    px: float,
    chunk_size: int,
    execution: dict[str, Any],
    t0: float,
) -> None:
    """Write the stack (``fill(writer)`` puts every filtered image into the
    :class:`~cryosift.io.mrc.MrcsWriter`), the STAR and the provenance; rename all into place."""
    from cryosift.io.atomic import atomic_write_json, temp_path_for
    from cryosift.io.mrc import MrcsWriter
    from cryosift.io.star import write_star
    from cryosift.provenance import provenance_record

    tmp_stack, tmp_star, tmp_json = (temp_path_for(p) for p in (stack_path, out_star, json_path))
    placed: list[Path] = []
    try:
        with MrcsWriter(tmp_stack, src.n_images, src.box, px) as writer:
            fill(writer)
        write_star(tmp_star, parts, optics)
        record = provenance_record(
            "filter",
            {
                "input": str(src.path) if src.path is not None else None,
                "filters": (
                    filt.params()["filters"] if isinstance(filt, FilterChain)
                    else [filt.describe()]
                ),
                "chunk_size": int(chunk_size),
                "pixel_size": px,
                "execution": execution,
            },
            outputs={"star": str(out_star), "stack": str(stack_path)},
            n_images=src.n_images,
            box=src.box,
            seconds=round(time.time() - t0, 3),
        )
        atomic_write_json(tmp_json, record)
        for tmp, final in ((tmp_stack, stack_path), (tmp_star, out_star), (tmp_json, json_path)):
            os.replace(tmp, final)
            placed.append(final)
    except BaseException:
        # a failed rename (very unlikely) must not leave a stack without its STAR
        for p in (tmp_stack, tmp_star, tmp_json, *placed):
            p.unlink(missing_ok=True)
        raise
