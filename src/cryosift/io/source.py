"""One lazy image-source type that flows from reader to stage to writer.

An :class:`ImageSource` knows how many images it holds, their box and pixel size, and (for STAR
files) the particle metadata; it reads only the images asked for, so memory follows the request
size, never the dataset size. Every image handed out is float32 (k, box, box) and checked
finite: NaN/Inf give an :class:`InputError` naming the file and the 1-based image number.

Sources are picklable (open memory maps are dropped and reopened on demand), so they can be
shipped to Dask workers.
"""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cryosift.errors import InputError
from cryosift.io.mrc import MrcInfo, drop_pages, memmap_stack, read_mrc_info
from cryosift.io.star import ParticleTable, pixel_size_of, read_star, split_image_names

__all__ = [
    "ArraySource",
    "ImageSource",
    "Index",
    "MrcStackSource",
    "StarSource",
    "open_source",
]

Index = int | np.integer | slice | Sequence[int] | np.ndarray
MRC_SUFFIXES = (".mrcs", ".mrc", ".st", ".map")
STAR_SUFFIXES = (".star",)


def _check_pixel_size(pixel_size: float | None, where: str | Path | None) -> float | None:
    """None, or a positive finite pixel size (InputError otherwise)."""
    if pixel_size is None:
        return None
    try:
        px = float(pixel_size)
    except (TypeError, ValueError):
        px = math.nan
    if not math.isfinite(px) or px <= 0:
        raise InputError(f"pixel size must be a positive number of Å, got {pixel_size!r}", where)
    return px


def _normalise_index(index: Index, n: int) -> slice | np.ndarray:
    """An int, slice, boolean mask or integer list/array -> a step-1 slice or an int64 array.

    Negative integers are refused (they are almost always an off-by-one, not Python-style
    counting from the end); slices follow Python's rules.
    """
    if isinstance(index, (bool, np.bool_)):
        raise TypeError("image index must be an int, slice or integer array, not a bool")
    if isinstance(index, (int, np.integer)):
        i = int(index)
        if i < 0 or i >= n:
            raise IndexError(f"image index {i} is outside 0..{n - 1}")
        return slice(i, i + 1)
    if isinstance(index, slice):
        start, stop, step = index.indices(n)
        if step == 1:
            return slice(start, max(start, stop))
        return np.arange(start, stop, step, dtype=np.int64)
    arr = np.asarray(index)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"boolean mask of shape {arr.shape} does not match {n} images")
        return np.flatnonzero(arr)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"image indices must be integers, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise IndexError(f"negative image index {lo} (indices are 0-based and non-negative)")
    if hi >= n:
        raise IndexError(f"image index {hi} is outside 0..{n - 1}")
    return arr


def _take(data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``data[idx]`` as float32, reading each distinct image once and in file order."""
    if idx.size > 1 and (np.diff(idx) <= 0).any():
        uniq, inverse = np.unique(idx, return_inverse=True)
        return np.asarray(data[uniq], dtype=np.float32)[inverse]
    return np.asarray(data[idx], dtype=np.float32)


class ImageSource(ABC):
    """A lazily read stack of square float32 images with their pixel size and metadata.

    Subclasses set ``path``, ``n_images``, ``box``, ``pixel_size``, ``metadata`` and ``optics``
    and implement :meth:`_read` and :meth:`_locate`.
    """

    path: Path | None = None
    n_images: int
    box: int
    pixel_size: float | None = None
    metadata: pd.DataFrame | None = None
    optics: pd.DataFrame | None = None
    #: False when the stored dtype cannot hold NaN/Inf (integer MRC modes): skip the check.
    _may_be_nonfinite: bool = True

    def __len__(self) -> int:
        return self.n_images

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_images, box, box), like the array this source stands for."""
        return (self.n_images, self.box, self.box)

    def images(self, index: Index) -> np.ndarray:
        """Images ``index`` as a new float32 array (k, box, box), in the order asked.

        ``index``: an int, a slice, a boolean mask or a list/array of ints (any order, repeats
        allowed, negative refused). Raises InputError if an image holds NaN or Inf.
        """
        sel = _normalise_index(index, self.n_images)
        empty = sel.start == sel.stop if isinstance(sel, slice) else sel.size == 0
        if empty:
            return np.zeros((0, self.box, self.box), dtype=np.float32)
        out = self._read(sel)
        # the images are copied out: drop the mapped pages, or RSS would grow with the file
        # (a sparse read, e.g. 2,000 images spread over a stack, faults in the pages around
        # every image: 900 MB of a 50,000-image stack of 64 px)
        self.release_pages()
        if self._may_be_nonfinite:
            self._check_finite(out, sel)
        return out

    def chunks(self, chunk_size: int = 256) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, images[start:start+chunk_size]) over the whole source, in order."""
        if int(chunk_size) <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        for start in range(0, self.n_images, int(chunk_size)):
            yield start, self.images(slice(start, start + int(chunk_size)))

    def release_pages(self) -> None:
        """Drop memory-mapped pages read so far from this process's resident set (see
        :func:`cryosift.io.mrc.drop_pages`); :meth:`images` calls it after every read, so RSS
        stays at what the caller holds, whatever the stack's size."""
        return None  # in-memory sources hold nothing to release

    def __iter__(self) -> Iterator[np.ndarray]:
        """Iterate image by image (each a (box, box) float32 array)."""
        for _, chunk in self.chunks():
            yield from chunk

    @abstractmethod
    def _read(self, sel: slice | np.ndarray) -> np.ndarray:
        """Read images ``sel`` (a step-1 slice or an int64 array within range) as a new float32
        C-contiguous array (k, box, box)."""

    @abstractmethod
    def _locate(self, i: int) -> tuple[Path | None, str]:
        """Where image ``i`` (0-based) of this source lives: (file, human description)."""

    def _check_finite(self, out: np.ndarray, sel: slice | np.ndarray) -> None:
        """Raise InputError for the first image holding NaN or Inf."""
        # A float64 sum of float32 values cannot overflow, and NaN/Inf propagate into it: one
        # pass, no (k, box, box) boolean temporary.
        sums = out.sum(axis=(1, 2), dtype=np.float64)
        if np.isfinite(sums).all():
            return
        j = int(np.argmax(~np.isfinite(sums)))
        i = sel.start + j if isinstance(sel, slice) else int(sel[j])
        what = "NaN" if np.isnan(out[j]).any() else "infinite"
        where, desc = self._locate(i)
        raise InputError(f"{desc} contains {what} pixel values", where)

    def __repr__(self) -> str:
        px = "unknown" if self.pixel_size is None else f"{self.pixel_size:g} Å"
        name = "in memory" if self.path is None else str(self.path)
        return f"{type(self).__name__}({name}: {self.n_images} images of {self.box} px, {px}/px)"


class ArraySource(ImageSource):
    """Images already in memory (or an np.memmap): (N, box, box) or one (box, box) image."""

    def __init__(self, array: np.ndarray, pixel_size: float | None = None) -> None:
        arr = np.asarray(array)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3:
            raise InputError(f"in-memory images must be (N, box, box), got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise InputError("in-memory image array is empty (0 images)")
        if arr.shape[1] != arr.shape[2]:
            raise InputError(f"in-memory images are {arr.shape[1]}x{arr.shape[2]}, not square")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputError(f"in-memory images have unsupported dtype {arr.dtype}")
        self.array = arr
        self.path = None
        self.n_images = int(arr.shape[0])
        self.box = int(arr.shape[1])
        self.pixel_size = _check_pixel_size(pixel_size, None)
        self.metadata = None
        self.optics = None
        self._may_be_nonfinite = bool(np.issubdtype(arr.dtype, np.floating))

    def _read(self, sel: slice | np.ndarray) -> np.ndarray:
        if isinstance(sel, slice):
            return np.array(self.array[sel], dtype=np.float32, order="C")
        return _take(self.array, sel)

    def _locate(self, i: int) -> tuple[Path | None, str]:
        return None, f"in-memory image array: image {i + 1}"


class MrcStackSource(ImageSource):
    """A memory-mapped MRC stack (.mrcs/.mrc/.st/.map); a volume reads as its sections."""

    def __init__(self, path: str | Path, pixel_size: float | None = None) -> None:
        self.path = Path(path)
        self.info: MrcInfo = read_mrc_info(self.path)
        self.n_images = self.info.n
        self.box = self.info.nx
        override = _check_pixel_size(pixel_size, self.path)
        self.pixel_size = override if override is not None else self.info.pixel_size
        self.metadata = None
        self.optics = None
        self._may_be_nonfinite = self.info.mode in (2, 12)
        self._data: np.memmap | None = None

    @property
    def data(self) -> np.memmap:
        """The read-only memory map (n, box, box) in the file's dtype, opened on first use."""
        if self._data is None:
            try:
                self._data = memmap_stack(self.path, self.info)
            except OSError as err:
                raise InputError(f"cannot memory-map: {err.strerror or err}", self.path) from err
        return self._data

    def _read(self, sel: slice | np.ndarray) -> np.ndarray:
        if isinstance(sel, slice):
            return np.array(self.data[sel], dtype=np.float32, order="C")
        return _take(self.data, sel)

    def _locate(self, i: int) -> tuple[Path | None, str]:
        return self.path, f"image {i + 1}"

    def release_pages(self) -> None:
        if self._data is not None:
            drop_pages(self._data)

    def close(self) -> None:
        """Drop the memory map (it is reopened if the source is used again)."""
        self._data = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_data"] = None  # never pickle the mapped pixels; reopen on the other side
        return state


class StarSource(ImageSource):
    """Particles of a RELION STAR file, read from the stacks that ``rlnImageName`` points at.

    ``index@path`` names are resolved against the STAR file's folder unless absolute (falling
    back to its parent folders and the current folder, where RELION projects keep them); several
    stacks per STAR are fine. At open, every distinct stack is validated once (exists, valid MRC),
    every index checked against its stack's size, and all boxes must agree. Reads group the
    requested particles by stack (one fancy-index per stack) and return them in the order asked.
    At most ``max_open_files`` stacks stay memory-mapped (least recently used are dropped).
    """

    def __init__(
        self, path: str | Path, pixel_size: float | None = None, max_open_files: int = 64
    ) -> None:
        self.path = Path(path)
        self.table: ParticleTable = read_star(self.path)
        parts = self.table.particles
        if "rlnImageName" not in parts.columns:
            raise InputError("no rlnImageName column: the STAR file does not point at images",
                             self.path)
        if not len(parts):
            raise InputError("holds no particles (empty particle table)", self.path)
        index, names = split_image_names(parts["rlnImageName"], self.path)
        codes, uniques = pd.factorize(names, sort=False)
        self.stack_names: list[str] = [str(u) for u in uniques]
        self.stack_paths: list[Path] = [self._resolve(name) for name in self.stack_names]
        self.stack_infos: list[MrcInfo] = [
            self._stack_info(name, p)
            for name, p in zip(self.stack_names, self.stack_paths, strict=True)
        ]
        self._file = codes.astype(np.int64)
        self._index = index
        self._check_ranges()
        boxes = sorted({info.nx for info in self.stack_infos})
        if len(boxes) > 1:
            first = {b: self.stack_names[[i.nx for i in self.stack_infos].index(b)] for b in boxes}
            detail = ", ".join(f"{name} is {b} px" for b, name in first.items())
            raise InputError(f"referenced stacks have different box sizes: {detail}", self.path)
        self.box = boxes[0]
        self.n_images = len(parts)
        self._check_image_size()
        override = _check_pixel_size(pixel_size, self.path)
        star_px = pixel_size_of(self.table)
        self.pixel_size = (
            override if override is not None
            else star_px if star_px is not None
            else self.stack_infos[0].pixel_size
        )
        self.metadata = parts
        self.optics = self.table.optics
        self._may_be_nonfinite = any(i.mode in (2, 12) for i in self.stack_infos)
        self.max_open_files = max(1, int(max_open_files))
        self._open: OrderedDict[int, np.memmap] = OrderedDict()

    def _resolve(self, name: str) -> Path:
        """Where stack ``name`` lives: absolute as given, else relative to the STAR's folder.

        If it is not there, the STAR's parent folders and then the current folder are tried:
        RELION writes names relative to its project folder (``Extract/job012/...`` inside
        ``Select/job020/particles.star``), which is an ancestor of the STAR's folder or the
        folder RELION runs in.
        """
        p = Path(name)
        if p.is_absolute():
            return p
        primary = self.path.parent / p
        if primary.exists():
            return primary
        for base in (*Path(os.path.abspath(self.path.parent)).parents, Path.cwd()):
            if (base / p).exists():
                return base / p
        return primary

    def _stack_info(self, name: str, path: Path) -> MrcInfo:
        """Validate one referenced stack; errors name the STAR file and the stack."""
        if not path.exists():
            raise InputError(
                f"references image stack '{name}', which does not exist (looked for {path}, "
                "then in the STAR's parent folders and the current folder)",
                self.path,
            )
        try:
            return read_mrc_info(path)
        except InputError as err:
            raise InputError(f"referenced stack is unusable: {err}", self.path) from err

    def _check_ranges(self) -> None:
        """Every 1-based index must lie within its stack."""
        sizes = np.array([i.n for i in self.stack_infos], dtype=np.int64)
        beyond = self._index >= sizes[self._file]
        if beyond.any():
            row = int(np.argmax(beyond))
            f = int(self._file[row])
            raise InputError(
                f"row {row + 1}: image {self._index[row] + 1}@{self.stack_names[f]} is beyond the "
                f"end of that stack, which holds {sizes[f]} images",
                self.path,
            )

    def _check_image_size(self) -> None:
        """The optics table's rlnImageSize (when given) must match the stacks' box."""
        optics = self.table.optics
        if optics is None or "rlnImageSize" not in optics.columns:
            return
        sizes = pd.to_numeric(optics["rlnImageSize"], errors="coerce")
        wrong = sizes.notna() & (sizes != self.box)
        if wrong.any():
            raise InputError(
                f"optics table says rlnImageSize {int(sizes[wrong].iloc[0])} but the referenced "
                f"stacks hold {self.box} px images",
                self.path,
            )

    def release_pages(self) -> None:
        for mm in self._open.values():
            drop_pages(mm)

    def _memmap(self, f: int) -> np.memmap:
        """Memory map of stack ``f``, through a small LRU cache of open files."""
        mm = self._open.get(f)
        if mm is not None:
            self._open.move_to_end(f)
            return mm
        try:
            mm = memmap_stack(self.stack_paths[f], self.stack_infos[f])
        except OSError as err:
            raise InputError(f"cannot memory-map: {err.strerror or err}",
                             self.stack_paths[f]) from err
        self._open[f] = mm
        while len(self._open) > self.max_open_files:
            self._open.popitem(last=False)
        return mm

    def _read(self, sel: slice | np.ndarray) -> np.ndarray:
        rows = np.arange(sel.start, sel.stop, dtype=np.int64) if isinstance(sel, slice) else sel
        files = self._file[rows]
        images = self._index[rows]
        if (files == files[0]).all():  # the usual case: one stack
            return _take(self._memmap(int(files[0])), images)
        out = np.empty((rows.size, self.box, self.box), dtype=np.float32)
        order = np.argsort(files, kind="stable")
        sorted_files = files[order]
        bounds = np.flatnonzero(np.diff(sorted_files)) + 1
        for group in np.split(order, bounds):
            out[group] = _take(self._memmap(int(files[group[0]])), images[group])
        return out

    def _locate(self, i: int) -> tuple[Path | None, str]:
        f = int(self._file[i])
        return (
            self.stack_paths[f],
            f"image {self._index[i] + 1} (particle row {i + 1} of {self.path.name})",
        )

    def close(self) -> None:
        """Drop all open memory maps (they are reopened on demand)."""
        self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        return state


def open_source(obj: Any, pixel_size: float | None = None) -> ImageSource:
    """An ImageSource for a numpy array, an existing ImageSource, or a path.

    Paths are dispatched on their suffix: ``.star`` -> StarSource; ``.mrcs``, ``.mrc``, ``.st``,
    ``.map`` -> MrcStackSource. A given ``pixel_size`` overrides what the file says. Unknown
    suffixes and missing files raise InputError.
    """
    if isinstance(obj, ImageSource):
        if pixel_size is None:
            return obj
        src = copy.copy(obj)
        src.pixel_size = _check_pixel_size(pixel_size, obj.path)
        return src
    if isinstance(obj, np.ndarray):
        return ArraySource(obj, pixel_size=pixel_size)
    if not isinstance(obj, (str, Path)):
        raise TypeError(f"cannot open images from a {type(obj).__name__}")
    path = Path(obj)
    suffix = path.suffix.lower()
    if suffix not in STAR_SUFFIXES + MRC_SUFFIXES:
        known = ", ".join(STAR_SUFFIXES + MRC_SUFFIXES)
        raise InputError(f"unknown image file type '{path.suffix}' (expected one of {known})", path)
    if not path.exists():
        raise InputError("file does not exist", path)
    if suffix in STAR_SUFFIXES:
        return StarSource(path, pixel_size=pixel_size)
    return MrcStackSource(path, pixel_size=pixel_size)
