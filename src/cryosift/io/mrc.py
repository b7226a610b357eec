"""MRC image stacks: validated header reading, memory-mapped reads, atomic writes.

Reading parses the 1024-byte header with mrcfile's header layout and checks it against the file
size *before* anything is mapped or allocated, so a corrupt or hostile header (say, 10^9 images
declared in a 5 kB file) is refused in microseconds with a one-line :class:`InputError`. The data
block is then memory-mapped with exactly the validated dtype, offset and shape, so the header we
checked and the array we hand out cannot disagree (mrcfile derives shapes differently for volume
stacks and would divide by a zero ``mz``). Writing uses ``mrcfile`` (``new`` / ``new_mmap``) and
goes through :mod:`cryosift.io.atomic`.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import mrcfile
import numpy as np
from mrcfile.constants import MAP_ID
from mrcfile.dtypes import HEADER_DTYPE

from cryosift.errors import InputError
from cryosift.io.atomic import atomic_path, output_error, temp_path_for

__all__ = [
    "SUPPORTED_MODES",
    "MrcInfo",
    "MrcsWriter",
    "chunk_stats",
    "memmap_stack",
    "open_mrc_stack",
    "read_mrc_info",
    "write_images_at",
    "write_mrcs",
]

HEADER_BYTES = 1024
#: MRC modes we read: int8, int16, float32, uint16, float16.
SUPPORTED_MODES: dict[int, np.dtype] = {
    0: np.dtype(np.int8),
    1: np.dtype(np.int16),
    2: np.dtype(np.float32),
    6: np.dtype(np.uint16),
    12: np.dtype(np.float16),
}
_COMPLEX_MODES = {3, 4}
_KNOWN_MODES = set(SUPPORTED_MODES) | _COMPLEX_MODES | {101}
_STACK_SUFFIXES = {".mrcs"}


@dataclass(frozen=True)
class MrcInfo:
    """What the header of a validated MRC file says, in image-stack terms.

    ``n`` images of ``ny`` x ``nx`` pixels (a 2D file is one image; a volume is read as a stack
    of its sections). ``pixel_size`` is the header voxel size in Å, or None when the header says
    0 (unset). ``is_stack`` is False when the file declares itself a volume (space group != 0,
    more than one section) and its suffix is not ``.mrcs``: such files are still readable as
    stacks, callers may want to warn.
    """

    n: int
    ny: int
    nx: int
    mode: int
    pixel_size: float | None
    is_stack: bool
    dtype: np.dtype = field(default=np.dtype(np.float32), compare=False)
    data_offset: int = HEADER_BYTES

    @property
    def box(self) -> int:
        """Box size in pixels (images are square once validated)."""
        return self.nx


def _byte_order(raw: bytes) -> str:
    """Byte order from the machine stamp, falling back like mrcfile's permissive mode."""
    st = raw[212:216]
    if st[0] == 0x44 and st[1] in (0x44, 0x41):
        order = "<"
    elif st[0] == 0x11 and st[1] == 0x11:
        order = ">"
    else:
        order = "<"  # many writers leave the stamp zero; little-endian is the sensible default
    mode = int(np.frombuffer(raw, dtype=order + "i4", count=1, offset=12)[0])
    if mode not in _KNOWN_MODES:
        other = ">" if order == "<" else "<"
        if int(np.frombuffer(raw, dtype=other + "i4", count=1, offset=12)[0]) in _KNOWN_MODES:
            order = other  # stamp disagrees with the data; trust the mode field
    return order


def _pixel_size(xlen: float, mx: int) -> float | None:
    """Header voxel size in Å (7 significant digits: the header stores float32), None if unset."""
    if mx <= 0 or not math.isfinite(xlen) or xlen <= 0:
        return None
    return float(f"{xlen / mx:.7g}")


def read_mrc_info(path: str | Path) -> MrcInfo:
    """Validate an MRC file's header against its size and return what it holds.

    Refuses (InputError naming the file): missing file, file shorter than a header, unknown or
    complex modes, non-positive dimensions, no images, data block shorter than the header says,
    non-square images. Only 1024 bytes are read; nothing is allocated from the header's sizes.
    A missing 'MAP ' ID alone is tolerated (RELION and others write files without it) but is
    mentioned when anything else is wrong.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist", path)
    if not path.is_file():
        raise InputError("is not a regular file", path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(HEADER_BYTES)
    except OSError as err:
        raise InputError(f"cannot read: {err.strerror or err}", path) from err
    if size < HEADER_BYTES:
        raise InputError(
            f"not an MRC file: {size} bytes, shorter than the {HEADER_BYTES}-byte MRC header", path
        )

    order = _byte_order(raw)
    hdr = np.frombuffer(raw, dtype=HEADER_DTYPE.newbyteorder(order), count=1)[0]
    has_id = bytes(hdr["map"])[:3] == MAP_ID[:3]
    not_mrc = "" if has_id else "not an MRC file or corrupt header (no 'MAP ' ID): "

    mode = int(hdr["mode"])
    if mode in _COMPLEX_MODES:
        raise InputError(f"{not_mrc}complex MRC mode {mode} is not supported (images must be real)",
                         path)
    if mode not in SUPPORTED_MODES:
        what = "4-bit mode 101 is" if mode == 101 else f"mode {mode} is"
        raise InputError(
            f"{not_mrc}unsupported MRC {what} not readable (supported: 0, 1, 2, 6, 12)", path
        )
    dtype = SUPPORTED_MODES[mode].newbyteorder(order)

    nx, ny, nz = int(hdr["nx"]), int(hdr["ny"]), int(hdr["nz"])
    nsymbt = int(hdr["nsymbt"])
    if nx <= 0 or ny <= 0 or nz < 0 or nsymbt < 0:
        raise InputError(
            f"{not_mrc}invalid header dimensions nx={nx} ny={ny} nz={nz} "
            f"(extended header {nsymbt} bytes)",
            path,
        )
    if nz == 0:
        raise InputError("empty stack: the header declares 0 images", path)

    offset = HEADER_BYTES + nsymbt
    expected = offset + nx * ny * nz * dtype.itemsize  # Python ints: no overflow, no allocation
    if size < expected:
        raise InputError(
            f"{not_mrc}truncated: header says {nz} images of {ny}x{nx} ({expected} bytes with "
            f"the header) but the file holds {size} bytes",
            path,
        )
    if ny != nx:
        raise InputError(f"images are {ny}x{nx}, not square", path)

    ispg = int(hdr["ispg"])
    declared_volume = ispg != 0 and nz > 1
    is_stack = not declared_volume or path.suffix.lower() in _STACK_SUFFIXES
    return MrcInfo(
        n=nz,
        ny=ny,
        nx=nx,
        mode=mode,
        pixel_size=_pixel_size(float(hdr["cella"]["x"]), int(hdr["mx"])),
        is_stack=is_stack,
        dtype=dtype,
        data_offset=offset,
    )


def memmap_stack(path: str | Path, info: MrcInfo) -> np.memmap:
    """Read-only memory map of a validated file's data block as (n, ny, nx)."""
    return np.memmap(
        path, dtype=info.dtype, mode="r", offset=info.data_offset, shape=(info.n, info.ny, info.nx)
    )


def drop_pages(array: np.ndarray) -> None:
    """Tell the kernel this process no longer needs the pages of a read-only memory map.

    Pages already read stay in the page cache (a re-read is cheap) but leave this process's
    resident set, so streaming through a stack keeps RSS at one chunk instead of the file size.
    A no-op for ordinary arrays and where madvise is unavailable.
    """
    mm = getattr(array, "_mmap", None)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    with contextlib.suppress(OSError, ValueError):
        mm.madvise(mmap.MADV_DONTNEED)


def open_mrc_stack(path: str | Path) -> tuple[np.memmap, MrcInfo]:
    """Validate ``path`` and memory-map it as an (N, H, W) stack (a 2D image gives N = 1).

    Nothing is read until the array is indexed; values keep the file's dtype (convert with
    ``np.asarray(stack[i:j], dtype=np.float32)``).
    """
    info = read_mrc_info(path)
    try:
        return memmap_stack(path, info), info
    except OSError as err:
        raise InputError(f"cannot memory-map: {err.strerror or err}", path) from err


def _check_pixel_size(pixel_size: float) -> float:
    """Pixel size must be a positive finite number of Å."""
    px = float(pixel_size)
    if not math.isfinite(px) or px <= 0:
        raise ValueError(f"pixel size must be a positive number of Å, got {pixel_size!r}")
    return px


def write_mrcs(path: str | Path, images: np.ndarray, pixel_size: float) -> None:
    """Write images (N, H, W) or one image (H, W) as a float32 MRC image stack, atomically.

    The header marks an image stack (space group 0), carries the voxel size (x, y, z =
    ``pixel_size`` Å) and up-to-date min/max/mean/rms.
    """
    px = _check_pixel_size(pixel_size)
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"expected a non-empty (N, box, box) stack, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    with atomic_path(path) as tmp, mrcfile.new(tmp) as mrc:
        mrc.set_data(arr)
        mrc.set_image_stack()
        mrc.voxel_size = px
        mrc.update_header_stats()
        _label(mrc)


def _label(mrc: mrcfile.mrcobject.MrcObject) -> None:
    """One fixed header label instead of mrcfile's timestamped one: same input, same bytes."""
    from cryosift import __version__

    mrc.header.label[0] = f"cryosift {__version__}".encode()[:80]
    mrc.header.nlabl = 1


def chunk_stats(arr: np.ndarray) -> tuple[int, float, float, float, float]:
    """(count, mean, sum of squared deviations, min, max) of a (k, box, box) float32 chunk,
    merged by :class:`MrcsWriter` into the header's statistics (the file is never re-read)."""
    k = arr.size
    rows = arr.reshape(arr.shape[0], -1)
    # per-image float32 sums (pairwise, exact enough for one image), totals in float64
    c_mean = float(rows.sum(axis=1).sum(dtype=np.float64)) / k
    dev = rows - np.float32(c_mean)
    c_m2 = float(np.einsum("ij,ij->i", dev, dev).sum(dtype=np.float64))
    return k, c_mean, c_m2, float(arr.min()), float(arr.max())


def write_images_at(
    path: str | Path, offset: int, start: int, chunk: np.ndarray
) -> tuple[int, float, float, float, float]:
    """Write a (k, box, box) chunk as images start..start+k-1 of an existing float32 MRC data
    file whose images begin at byte ``offset`` (:attr:`MrcsWriter.data_file` /
    :attr:`MrcsWriter.data_offset`); returns its :func:`chunk_stats`.

    For a process other than the writer's (a Dask worker): a positioned write of the whole
    chunk, so writing the same chunk again (a task re-run after a lost worker) leaves the same
    bytes. An OSError (disk full) propagates.
    """
    arr = np.asarray(chunk, dtype=np.float32)
    with open(path, "r+b") as fh:
        _put_images(fh, offset, start, arr)
    return chunk_stats(arr)


def _put_images(fh: BinaryIO, offset: int, start: int, arr: np.ndarray) -> None:
    """One positioned write of a (k, box, box) float32 chunk as images start.. of a stack."""
    fh.seek(int(offset) + int(start) * arr.shape[-1] * arr.shape[-2] * 4)
    fh.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())


class MrcsWriter:
    """Stream a large float32 image stack to disk chunk by chunk, with bounded memory.

    ::

        with MrcsWriter("out/denoised.mrcs", n=len(src), box=src.box, pixel_size=1.3) as w:
            for start, chunk in src.chunks(256):
                w.write(start, denoise(chunk))   # or w.append(...)

    The data go to a hidden temporary file (positioned writes, not a shared mapping); on normal
    exit the writer checks that every image was written exactly once, stores min/max/mean/rms
    accumulated from the chunks (the file is not re-read), and renames the file onto ``path``.
    On an exception the temporary file is deleted and any previous file at ``path`` is kept.
    """

    def __init__(self, path: str | Path, n: int, box: int, pixel_size: float) -> None:
        if int(n) <= 0 or int(box) <= 0:
            raise ValueError(f"need n > 0 images of box > 0 pixels, got n={n}, box={box}")
        self.path = Path(path)
        self.n = int(n)
        self.box = int(box)
        self.pixel_size = _check_pixel_size(pixel_size)
        self._mrc: BinaryIO | None = None
        self._offset = 1024
        self._tmp: Path | None = None
        self._written = np.zeros(0, dtype=bool)
        self._next = 0
        # running statistics (Chan et al. pairwise update): count, mean, sum of squared deviations
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0
        self._min = math.inf
        self._max = -math.inf

    def __enter__(self) -> MrcsWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temp_path_for(self.path)
        try:
            # mrcfile lays out the header and sizes the (sparse) file; the data then go in with
            # plain positioned writes, so written pages never count in this process's RSS.
            mrc = mrcfile.new_mmap(self._tmp, shape=(self.n, self.box, self.box), mrc_mode=2)
            mrc.set_image_stack()
            mrc.voxel_size = self.pixel_size
            _label(mrc)
            self._offset = int(mrc.header.nbytes + mrc.extended_header.nbytes)
            mrc.close()
            self._mrc = open(self._tmp, "r+b")  # noqa: SIM115 - closed in _finish/_abort
        except BaseException as exc:
            self._abort()
            if isinstance(exc, OSError):  # disk full, no permission: one line, nothing saved
                raise output_error(exc, self.path) from exc
            raise
        self._written = np.zeros(self.n, dtype=bool)
        self._next = 0
        return self

    @property
    def next_index(self) -> int:
        """Where :meth:`append` writes next (one past the last chunk written)."""
        return self._next

    def write(self, start: int, chunk: np.ndarray) -> None:
        """Place ``chunk`` (k, box, box) or one image (box, box) at images start..start+k-1."""
        if self._mrc is None:
            raise RuntimeError("MrcsWriter.write() outside its 'with' block")
        arr = np.asarray(chunk)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[1:] != (self.box, self.box):
            raise ValueError(f"chunk shape {arr.shape} is not (k, {self.box}, {self.box})")
        start = int(start)
        stop = start + arr.shape[0]
        self._check_free(start, stop)
        if arr.shape[0] == 0:
            return
        arr = np.asarray(arr, dtype=np.float32)
        try:
            _put_images(self._mrc, self._offset, start, arr)
        except OSError as err:  # disk full: the caller's exit aborts; nothing is saved
            raise output_error(err, self.path) from err
        self._mark(start, stop, chunk_stats(arr))

    def append(self, chunk: np.ndarray) -> None:
        """Write ``chunk`` right after the previously written one."""
        self.write(self._next, chunk)

    def record(self, start: int, stop: int, stats: tuple) -> None:
        """Account for images start..stop-1 written into :attr:`data_file` by another process
        (a Dask worker, :func:`write_images_at`), with their :func:`chunk_stats`."""
        if self._mrc is None:
            raise RuntimeError("MrcsWriter.record() outside its 'with' block")
        start, stop = int(start), int(stop)
        if stop <= start:
            raise ValueError(f"images {start}..{stop - 1}: an empty or reversed range")
        self._check_free(start, stop)
        self._mark(start, stop, stats)

    def _check_free(self, start: int, stop: int) -> None:
        """Refuse images start..stop-1 outside the stack or already written."""
        if start < 0 or stop > self.n:
            raise ValueError(f"images {start}..{stop - 1} fall outside the stack of {self.n}")
        if self._written[start:stop].any():
            first = start + int(np.argmax(self._written[start:stop]))
            raise ValueError(f"image {first} was already written; each image is written once")

    def _mark(self, start: int, stop: int, stats: tuple) -> None:
        """Images start..stop-1 are in the file: mark them and merge their statistics."""
        self._written[start:stop] = True
        self._next = stop
        self._merge_stats(stats)

    @property
    def data_file(self) -> Path:
        """The temporary file being written (renamed onto ``path`` when complete)."""
        if self._tmp is None:
            raise RuntimeError("MrcsWriter.data_file outside its 'with' block")
        return self._tmp

    @property
    def data_offset(self) -> int:
        """Byte offset of the first image in :attr:`data_file`."""
        return self._offset

    def _merge_stats(self, stats: tuple) -> None:
        """Merge a chunk's count/mean/M2/min/max into the running totals (float64)."""
        k, c_mean, c_m2, c_min, c_max = stats
        total = self._count + k
        delta = c_mean - self._mean
        self._m2 += c_m2 + delta * delta * self._count * k / total
        self._mean += delta * k / total
        self._count = total
        self._min = min(self._min, c_min)
        self._max = max(self._max, c_max)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except BaseException as exc:
            self._abort()
            if isinstance(exc, OSError):  # flushing or renaming failed (disk full, ...)
                raise output_error(exc, self.path) from exc
            raise

    def _finish(self) -> None:
        """Check completeness, write header stats, flush, close and rename into place."""
        assert self._mrc is not None and self._tmp is not None
        done = int(self._written.sum())
        if done != self.n:
            missing = int(np.argmin(self._written))
            raise RuntimeError(
                f"{self.path}: only {done} of {self.n} images were written "
                f"(first missing: {missing}); nothing was saved"
            )
        self._mrc.close()
        self._mrc = None
        with mrcfile.mmap(self._tmp, mode="r+") as mrc:  # maps, touches only the header
            hdr = mrc.header
            hdr.dmin = np.float32(self._min)
            hdr.dmax = np.float32(self._max)
            hdr.dmean = np.float32(self._mean)
            hdr.rms = np.float32(math.sqrt(max(self._m2, 0.0) / self._count))
        os.replace(self._tmp, self.path)
        self._tmp = None

    def _abort(self) -> None:
        """Close and delete the temporary file; the previous file at ``path`` is untouched."""
        if self._mrc is not None:
            # already failing: the original error matters, not a second one from closing
            with warnings.catch_warnings(), contextlib.suppress(Exception):
                warnings.simplefilter("ignore")
                self._mrc.close()
            self._mrc = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
