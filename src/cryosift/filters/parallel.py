"""Image-parallel execution of per-image filters: Python threads, single-threaded torch inside.

Why not torch's own intra-op threads: a filter is tens to hundreds of element-wise operations
per batch, and torch's OpenMP pool ends every one of them in a barrier. When another process
competes for the cores (a shared workstation, a cluster node, parallel test runs), a barrier
waits for a descheduled thread and throughput collapses — measured on a 2-core machine under
load: a 3x3 median at 133 images/s with 2 OpenMP threads against 1,100 with one. Filters are
per-image, so instead the batch is split into contiguous slices processed by a few Python
threads (torch and numpy release the GIL inside their kernels), each running torch
single-threaded: no barriers, and both cores are used when they are free.

The torch thread setting is process-wide; it is switched to 1 while any filter runs here and
restored by the last one to finish (reference-counted under a lock, so concurrent callers —
e.g. Dask threads — cannot leave it changed). Calls made from inside a worker run serially.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

__all__ = [
    "fixed_slice_size", "in_worker", "map_slices", "run_on_threads", "single_threaded_torch",
    "worker_mode",
]

_lock = threading.Lock()
_users = 0
_saved_threads = 1
_local = threading.local()

#: Pixels per slice of a filter's batch (:func:`fixed_slice_size`): 128 images of 32 px, 32 of
#: 64 px, 8 of 128 px.
SLICE_PIXELS = 2**17


@contextmanager
def single_threaded_torch() -> Iterator[int]:
    """Run the block with torch.set_num_threads(1); yields the thread count to restore."""
    global _users, _saved_threads
    with _lock:
        if _users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _users += 1
        saved = _saved_threads
    try:
        yield saved
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                torch.set_num_threads(_saved_threads)


@contextmanager
def worker_mode() -> Iterator[None]:
    """Run the block as one worker thread: torch single-threaded and filters serial inside.

    Used by tasks of a Dask cluster (:mod:`cryosift.engine`), where parallelism comes from the
    workers (one thread each by default), so a task must not start threads of its own.
    """
    previous = getattr(_local, "active", False)
    with single_threaded_torch():
        _local.active = True
        try:
            yield
        finally:
            _local.active = previous


def in_worker() -> bool:
    """True inside a :func:`map_slices` worker (nested calls then run serially)."""
    return getattr(_local, "active", False)


def fixed_slice_size(box: int) -> int:
    """Images per slice for :func:`map_slices` ``slice_size``: :data:`SLICE_PIXELS` pixels'
    worth (at least 1), a function of the box only."""
    return max(1, SLICE_PIXELS // max(1, int(box) ** 2))


def map_slices(
    fn: Callable[[int, int], np.ndarray],
    n: int,
    out: np.ndarray,
    workers: int | None = None,
    min_per_worker: int = 4,
    slice_size: int | None = None,
) -> np.ndarray:
    """Fill ``out[start:stop] = fn(start, stop)`` over contiguous slices of ``range(n)``.

    ``workers`` defaults to torch's thread count before this call (the cores torch would use);
    fewer when slices would hold under ``min_per_worker`` images; 1 inside another worker.
    ``slice_size``: slices of exactly this many images at fixed offsets (0, s, 2s, ...),
    whatever the number of workers, also when run serially inside a worker. Batched FFTs
    (MKL) round differently for different batch sizes, so this is what makes a filter's
    output bit-identical in this process, in a Dask worker and on any number of cores.
    """

    def run(bounds: tuple[int, int]) -> None:
        _local.active = True
        try:
            out[bounds[0] : bounds[1]] = fn(*bounds)
        finally:
            _local.active = False

    nested = in_worker()
    with single_threaded_torch() as threads:
        if slice_size is not None:
            cuts = list(range(0, n, max(1, int(slice_size)))) + [n]
            w = max(1, min(workers or threads, len(cuts) - 1))
        else:
            w = max(1, min(workers or threads, n // max(1, min_per_worker)))
            cuts = np.linspace(0, n, (1 if nested else w) + 1).astype(int).tolist()
        bounds = list(zip(cuts[:-1], cuts[1:], strict=True))
        if nested:  # inside another worker: serially, in this thread
            for a, b in bounds:
                out[a:b] = fn(a, b)
        else:
            run_on_threads(run, bounds, w)
    return out


def run_on_threads(fn: Callable[[Any], None], items: list[Any], n_threads: int) -> None:
    """fn(item) for every item: in this thread when n_threads is 1, else in a pool of threads."""
    if n_threads <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=n_threads) as pool:
        list(pool.map(fn, items))
