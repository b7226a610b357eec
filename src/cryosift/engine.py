"""Where the per-image stages run: in this process (threads) or on a Dask cluster.

This is the one module that knows Dask (``dask.distributed``). The per-image stages — filters,
``denoise apply``, ``screen apply`` scoring and the per-image part of classification features —
split a stack into chunks of consecutive images; on a cluster each chunk is one task.

**Choosing the scheduler** (``--scheduler`` on the command line, :func:`open_engine`):

* ``threads`` — no cluster: the chunks run in this process, spread over a few threads
  (:mod:`cryosift.filters.parallel`); starts instantly, right for small stacks.
* ``local`` — a :class:`distributed.LocalCluster` on this machine: ``--workers`` worker
  processes (default one per core), one thread each.
* ``tcp://host:port`` (any ``scheme://`` address) — an existing Dask scheduler;
  ``path/to/scheduler.json`` — the scheduler file written by ``dask scheduler
  --scheduler-file`` or ``dask-jobqueue``. Inputs, models and the output folder must then be
  visible to the workers at the same paths (a shared file system).
* ``auto`` (the default) — ``threads`` below :data:`AUTO_LOCAL_MIN_IMAGES` images (starting a
  cluster costs seconds), ``local`` at or above it.

**How a task runs.** The client never ships pixels: a task gets a picklable :class:`SourceSpec`
(the input path and pixel size) and an operation spec (a pickled filter, or a model path and
device), and the worker opens the source and builds the operation itself, once per worker
process (both are cached). A task whose output is images writes them itself, with one
positioned write, into the output's temporary MRC file at their place
(:func:`cryosift.io.mrc.write_images_at`), so a task re-run after a lost worker writes the same
bytes again: no image is lost or duplicated. It returns the chunk's statistics. The client
collects tasks as they complete (progress bar over chunks) and records them strictly in order
with the output's :class:`cryosift.io.mrc.MrcsWriter`, which refuses an image recorded twice
and renames the file into place only when every image is there. No pixel passes through the
client: it is not the bottleneck of a large cluster and holds no image in memory. Tasks whose
result is small (scores, features) return it directly. Chunks, per-image operations and the
order of the statistics are the same as in-process, so outputs are identical whichever
scheduler runs them.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryosift.errors import CryosiftError

log = logging.getLogger("cryosift")

__all__ = [
    "AUTO_LOCAL_MIN_IMAGES",
    "DaskEngine",
    "DenoiseOp",
    "FeatureOp",
    "FilterOp",
    "ScreenOp",
    "SourceSpec",
    "check_finite",
    "check_scheduler",
    "default_workers",
    "open_engine",
]

#: ``--scheduler auto`` starts a local cluster for stacks of at least this many images.
AUTO_LOCAL_MIN_IMAGES = 20_000

#: Dask config override for local worker processes (applied before they start). Dask's default
#: ``pre-spawn-environ`` sets MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap
#: threshold at 128 kB: every large numpy/torch temporary is then a fresh mmap whose pages the
#: kernel faults in and zeroes, and a U-Net worker spent ~45 % of its time in the kernel (denoise
#: apply twice as slow as in this process; benchmarks/results/scale.md). Unset (None), glibc's
#: dynamic threshold applies, as in any other Python process; Dask's thread caps stay.
WORKER_CONFIG: dict[str, Any] = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
#: Seconds to wait for a remote scheduler (override with CRYOSIFT_DASK_TIMEOUT).
DEFAULT_CONNECT_TIMEOUT = 30.0

SCHEDULER_HELP = (
    "Where the per-image work runs. auto (default): in-process threads below "
    f"{AUTO_LOCAL_MIN_IMAGES:,} images, a local Dask cluster at or above (starting one costs "
    "seconds); threads: in this process; local: a local Dask cluster (--workers processes, one "
    "thread each); tcp://HOST:PORT: an existing Dask scheduler; FILE.json: its scheduler file. "
    "On a remote cluster, inputs, models and the output folder must be visible to the workers "
    "at the same paths."
)
WORKERS_HELP = (
    "Worker processes of a local Dask cluster [default: one per core]; a remote cluster keeps "
    "its own workers."
)


def default_workers() -> int:
    """The cores this process may run on (one worker per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------------------------
# choosing a scheduler


@dataclass(frozen=True)
class _Target:
    kind: str  # "threads", "local", "address" or "file"
    value: str | None = None


def check_scheduler(scheduler: str | None) -> _Target:
    """Parse a ``--scheduler`` value; CryosiftError for a malformed one or a missing file.

    Returns the target without connecting (``auto`` stays undecided until the stack size is
    known: kind ``"auto"``).
    """
    value = "auto" if scheduler is None else str(scheduler).strip()
    low = value.lower()
    if low in ("auto", "threads", "local"):
        return _Target(low)
    if "://" in value:
        return _Target("address", value)
    if low.endswith(".json"):
        path = Path(value).expanduser()
        if not path.is_file():
            raise CryosiftError(
                "--scheduler: scheduler file not found (start the scheduler with "
                "--scheduler-file, or give its tcp://HOST:PORT address)",
                path,
            )
        return _Target("file", str(path.resolve()))
    raise CryosiftError(
        f"--scheduler {value!r} is not auto, threads, local, a scheduler address "
        "(tcp://HOST:PORT) or a scheduler file (.json)"
    )


def _connect_timeout() -> float:
    raw = os.environ.get("CRYOSIFT_DASK_TIMEOUT", "")
    try:
        return float(raw) if raw else DEFAULT_CONNECT_TIMEOUT
    except ValueError:
        return DEFAULT_CONNECT_TIMEOUT


@contextmanager
def open_engine(
    scheduler: str | None = "auto",
    workers: int | None = None,
    n_images: int | None = None,
    threads_per_worker: int = 1,
    file_based: bool = True,
) -> Iterator[DaskEngine | None]:
    """Yield a :class:`DaskEngine` on the chosen cluster, or None to run in this process.

    ``scheduler``: see the module docstring (None means ``auto``). ``n_images`` decides
    ``auto``. ``file_based=False`` (images held in memory, not in a file the workers could
    open) always runs in-process. A local cluster is closed when the block ends; a remote
    one is only disconnected from. Unreachable schedulers and missing scheduler files raise
    a one-line CryosiftError before any work is done.
    """
    target = check_scheduler(scheduler)
    if workers is not None and int(workers) < 1:
        raise CryosiftError(f"--workers must be at least 1, got {workers}")
    kind = target.kind
    if kind == "auto":
        kind = "local" if (n_images or 0) >= AUTO_LOCAL_MIN_IMAGES else "threads"
    if kind != "threads" and not file_based:
        log.info("images held in memory: running in-process instead of on %s", kind)
        kind = "threads"
    if kind == "threads":
        yield None
        return
    try:
        import dask
        import distributed
    except ImportError as err:  # pragma: no cover - a dependency of cryosift
        raise CryosiftError(
            "--scheduler needs dask.distributed: pip install 'dask[distributed]'"
        ) from err

    cluster = None
    quiet = log.getEffectiveLevel() > logging.DEBUG
    dlog = logging.getLogger("distributed")
    saved_level = dlog.level
    if quiet:  # Dask's start-up chatter is INFO; its warnings (a lost worker) still show
        dlog.setLevel(max(logging.WARNING, saved_level))
    try:
        if kind == "local":
            n = int(workers) if workers else default_workers()
            with dask.config.set(WORKER_CONFIG):
                cluster = _local_cluster(distributed, n, int(threads_per_worker))
            client = distributed.Client(cluster, set_as_default=False)
            where = f"local cluster of {n} worker process(es), {threads_per_worker} thread(s) each"
        else:
            if workers:
                log.warning("--workers applies to local clusters; %s keeps its own workers",
                            target.value)
            timeout = _connect_timeout()
            kw: dict[str, Any] = {"timeout": timeout, "set_as_default": False}
            if kind == "file":
                client = distributed.Client(scheduler_file=target.value, **kw)
            else:
                client = distributed.Client(target.value, **kw)
            where = f"Dask scheduler {client.scheduler.address}"
    except BaseException as err:
        if cluster is not None:
            cluster.close()
        dlog.setLevel(saved_level)
        if isinstance(err, (OSError, TimeoutError, ValueError, RuntimeError)):
            what = target.value if target.value else "a local Dask cluster"
            detail = " ".join(str(err).split()) or type(err).__name__
            raise CryosiftError(f"--scheduler: cannot start or reach {what} ({detail})") from err
        raise
    engine = DaskEngine(client, kind, target.value)
    log.info("running on %s", where)
    try:
        yield engine
    finally:
        try:
            client.close()
            if cluster is not None:
                cluster.close()
        finally:
            dlog.setLevel(saved_level)


def _local_cluster(distributed: Any, n_workers: int, threads_per_worker: int) -> Any:
    """A LocalCluster of single-process workers, no dashboard."""
    return distributed.LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=None,
        # no dashboard; its bare HTTP server on any free port, not Dask's fixed 8787
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
    )


# --------------------------------------------------------------------------------------------
# what a task needs: where the images are, and what to do with them


@dataclass(frozen=True)
class SourceSpec:
    """A picklable recipe for an image source: its file and the pixel size to use."""

    path: str
    pixel_size: float | None = None

    @classmethod
    def of(cls, src: Any) -> SourceSpec:
        """The spec of an opened source (which must come from a file)."""
        if getattr(src, "path", None) is None:
            raise CryosiftError("a Dask cluster needs images from a file (.star or .mrcs)")
        return cls(str(Path(src.path).resolve()), src.pixel_size)

    def key(self) -> tuple:
        try:
            st = os.stat(self.path)
            stamp: tuple = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = ()
        return ("source", self.path, self.pixel_size, *stamp)

    def open(self) -> Any:
        from cryosift.io.source import open_source

        return open_source(self.path, pixel_size=self.pixel_size)


ChunkFn = Callable[[np.ndarray, int, int], np.ndarray]


class _Op:
    """An operation on chunks: picklable, with a cache key, built once per worker process."""

    def key(self) -> tuple:
        raise NotImplementedError

    def build(self, src: Any) -> ChunkFn:
        """``fn(images, start, stop) -> result`` for images start..stop-1 of ``src``."""
        raise NotImplementedError


@dataclass(frozen=True)
class FilterOp(_Op):
    """A :class:`~cryosift.filters.base.Filter`, shipped pickled (filters are small objects)."""

    payload: bytes
    label: str = "filter"
    digest: str = field(default="", compare=False)

    @classmethod
    def of(cls, filt: Any, label: str = "filter") -> FilterOp:
        import cloudpickle

        payload = cloudpickle.dumps(filt)
        return cls(payload, label, f"{zlib.crc32(payload):08x}")

    def key(self) -> tuple:
        return ("filter", self.digest or f"{zlib.crc32(self.payload):08x}")

    def build(self, src: Any) -> ChunkFn:
        import pickle

        from cryosift.filters.base import BatchContext, _source_metadata

        filt = pickle.loads(self.payload)
        metadata = _source_metadata(src)
        px, label = src.pixel_size, self.label

        def run(images: np.ndarray, start: int, stop: int) -> np.ndarray:
            meta = None if metadata is None else metadata.iloc[start:stop]
            out = filt(images, BatchContext(pixel_size=px, metadata=meta))
            check_finite(out, start, label, src.path)
            return out

        return run


@dataclass(frozen=True)
class DenoiseOp(_Op):
    """A saved denoiser (absolute model path) applied as a NetworkFilter on ``device``
    (``tta``: averaged over the 8 rotations and flips; ``snr``: the stack's, for a
    conditioned model, estimated once before the chunks are sent out; ``blend``: the SURE
    output stage, fitted once before the chunks are sent out)."""

    model_path: str
    device: str = "cpu"
    tta: bool = False
    snr: float | None = None  # the stack's SNR, for a conditioned model
    blend: Any = None  # cryosift.denoise.sure.SureBlend (frozen, hashable) or None

    def key(self) -> tuple:
        return ("denoise", self.model_path, _mtime(self.model_path), self.device, self.tta,
                self.snr, self.blend)

    def build(self, src: Any) -> ChunkFn:
        import torch

        from cryosift.denoise.apply import NetworkFilter
        from cryosift.denoise.model_io import load_model
        from cryosift.filters.base import BatchContext

        model, meta = load_model(self.model_path, self.device)
        filt = NetworkFilter(model, meta, torch.device(self.device), tta=self.tta, snr=self.snr,
                             blend=self.blend)
        px = src.pixel_size

        def run(images: np.ndarray, start: int, stop: int) -> np.ndarray:
            out = filt(images, BatchContext(pixel_size=px))
            check_finite(out, start, "denoise", src.path)
            return out

        return run


@dataclass(frozen=True)
class ScreenOp(_Op):
    """A saved screener (absolute model path): calibrated particle probability per image."""

    model_path: str
    device: str = "cpu"

    def key(self) -> tuple:
        return ("screen", self.model_path, _mtime(self.model_path), self.device)

    def build(self, src: Any) -> ChunkFn:
        from cryosift.screen.model_io import load_screener

        screener = load_screener(self.model_path, self.device)

        def run(images: np.ndarray, start: int, stop: int) -> np.ndarray:
            return screener.predict_proba(images)

        return run


@dataclass(frozen=True)
class FeatureOp(_Op):
    """The per-image part of classification features (see classify.features.chunk_features),
    optionally after a CTF phase flip with each image's STAR row."""

    kind: str
    phase_flip: bool = False

    def key(self) -> tuple:
        return ("features", self.kind, self.phase_flip)

    def build(self, src: Any) -> ChunkFn:
        from cryosift.classify.features import chunk_features, phase_flip
        from cryosift.filters.base import _source_metadata

        metadata = _source_metadata(src) if self.phase_flip else None
        kind, px = self.kind, src.pixel_size

        def run(images: np.ndarray, start: int, stop: int) -> np.ndarray:
            if metadata is not None:
                images = phase_flip(images, metadata.iloc[start:stop], px)
            return chunk_features(images, kind)

        return run


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def check_finite(out: np.ndarray, start: int, label: str, where: Any) -> None:
    """CryosiftError naming the first image (1-based) of a chunk with NaN/Inf output."""
    sums = np.asarray(out).sum(axis=(1, 2), dtype=np.float64)
    if not np.isfinite(sums).all():
        bad = start + int(np.argmax(~np.isfinite(sums))) + 1
        raise CryosiftError(f"filter '{label}' produced NaN/Inf values on image {bad}", where)


# --------------------------------------------------------------------------------------------
# the task, as it runs on a worker

_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def _cached(key: tuple, make: Callable[[], Any]) -> Any:
    """One object per key in this (worker) process: sources and models are built once."""
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        obj = make()  # under the lock: threads of one worker build it once, not each
        _CACHE[key] = obj
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
        return obj


@dataclass(frozen=True)
class ImageTarget:
    """Where a task writes its output images: the output's temporary MRC data file, images
    from byte ``offset`` (see :class:`cryosift.io.mrc.MrcsWriter`)."""

    path: str
    offset: int


def _run_chunk(
    source: SourceSpec, op: _Op, start: int, stop: int, target: ImageTarget | None
) -> tuple[int, int, Any]:
    """Compute images start..stop-1; write them into ``target`` (-> their statistics) or
    return the result."""
    from cryosift.filters.parallel import worker_mode
    from cryosift.malloc import keep_freed_memory

    keep_freed_memory()
    with worker_mode():
        src = _cached(source.key(), source.open)
        fn = _cached((*source.key(), *op.key()), lambda: op.build(src))
        out = fn(src.images(slice(start, stop)), start, stop)  # pages released by images()
    if target is None:
        return start, stop, out
    from cryosift.io.mrc import write_images_at

    return start, stop, write_images_at(target.path, target.offset, start, out)


# --------------------------------------------------------------------------------------------
# the client side


class DaskEngine:
    """A connected Dask client that maps chunk operations over a stack (see module docstring)."""

    def __init__(self, client: Any, kind: str, address: str | None = None) -> None:
        self.client = client
        self.kind = kind
        self.address = address

    def describe(self) -> dict[str, Any]:
        """For provenance records: the scheduler and the workers it had at the start."""
        try:
            info = self.client.scheduler_info()
            workers = info.get("workers", {})
            threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
        except Exception:  # pragma: no cover - informational only
            workers, threads = {}, 0
        return {
            "engine": "dask",
            "scheduler": "local" if self.kind == "local" else self.address,
            "workers": len(workers),
            "threads": threads,
        }

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> process id (for tests and diagnostics)."""
        return dict(self.client.run(os.getpid))

    def _submit(
        self, source: SourceSpec, op: _Op, n_images: int, chunk_size: int,
        target: ImageTarget | None,
    ) -> dict[int, Any]:
        if int(chunk_size) < 1:
            raise CryosiftError(f"chunk size must be at least 1, got {chunk_size}")
        futures = {}
        for start in range(0, int(n_images), int(chunk_size)):
            stop = min(start + int(chunk_size), int(n_images))
            futures[start] = self.client.submit(
                _run_chunk, source, op, start, stop, target,
                key=f"cryosift-chunk-{secrets.token_hex(6)}-{start}", pure=False,
            )
        return futures

    def _ordered(
        self, futures: dict[int, Any], n_images: int, desc: str
    ) -> Iterator[tuple[int, int, Any]]:
        """(start, stop, result) of every task, in order of ``start``, as they complete."""
        import distributed

        from cryosift.progress import progress

        done: dict[int, tuple[int, Any]] = {}
        nxt = 0
        try:
            completed = distributed.as_completed(list(futures.values()), loop=self.client.loop)
            for fut in progress(completed, total=len(futures), desc=desc, unit="chunk"):
                start, stop, result = fut.result()
                futures.pop(start, None)  # released: a finished chunk is never recomputed
                fut.release()
                if start in done or start < nxt:
                    raise RuntimeError(f"chunk {start} reported twice")  # pragma: no cover
                done[start] = (stop, result)
                while nxt in done:
                    stop_, res = done.pop(nxt)
                    yield nxt, stop_, res
                    nxt = stop_
        except distributed.KilledWorker as err:
            raise CryosiftError(
                f"Dask workers died repeatedly while running a chunk ({err}); "
                "the machine may be out of memory"
            ) from err
        except distributed.comm.CommClosedError as err:
            raise CryosiftError(f"lost the connection to the Dask scheduler ({err})") from err
        finally:
            if futures:
                self.client.cancel(list(futures.values()))
        if nxt != n_images:  # pragma: no cover - every chunk is yielded once, in order
            raise RuntimeError(f"assembled {nxt} of {n_images} images")

    def write_images(
        self,
        source: SourceSpec,
        op: _Op,
        n_images: int,
        chunk_size: int,
        writer: Any,
        desc: str = "chunks",
    ) -> None:
        """Compute every chunk on the workers, each written by its worker straight into the
        open :class:`~cryosift.io.mrc.MrcsWriter`'s temporary file; the client only records
        each chunk's statistics, in order (the header then matches an in-process run)."""
        from cryosift.io.atomic import output_error

        target = ImageTarget(str(Path(writer.data_file).resolve()), int(writer.data_offset))
        futures = self._submit(source, op, n_images, chunk_size, target)
        try:
            for start, stop, stats in self._ordered(futures, n_images, desc):
                writer.record(start, stop, stats)
        except OSError as err:  # a worker could not write (disk full): one line
            raise output_error(err, writer.path) from err

    def map_results(
        self,
        source: SourceSpec,
        op: _Op,
        n_images: int,
        chunk_size: int,
        desc: str = "chunks",
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, result) for every chunk, in order; for small per-chunk results
        (scores, feature vectors) returned by the tasks themselves."""
        futures = self._submit(source, op, n_images, chunk_size, None)
        for start, _stop, result in self._ordered(futures, n_images, desc):
            yield start, result
