"""Keep freed memory in the process for reuse, so torch's large temporaries cost no page faults.

glibc's default allocator serves blocks above a *dynamic* threshold (128 kB at first) with a
fresh ``mmap`` and returns them to the kernel on ``free``; it also trims the heap whenever more
than twice that threshold is free at its top. A network applied batch after batch allocates and
frees the same few megabytes of activations every layer, so each batch faulted in — and the
kernel zeroed — ~100 MB of new pages: a third of the time of ``denoise apply`` was system time
(1,800 minor faults per 128 px image), and two processes doing it at once contended in the
kernel, which is why two Dask workers ran at only ~1.45x one (benchmarks/results/scale.md).

:func:`keep_freed_memory` fixes both thresholds with ``mallopt``: blocks up to
:data:`MMAP_THRESHOLD` come from the heap and freed memory up to :data:`TRIM_THRESHOLD` stays
there for the next batch. Peak memory is unchanged (it is the working set's), only what is
handed back between batches is. No-op off glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: The largest block served from the heap (glibc's maximum for this setting on 64-bit).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory kept at the top of a heap before it is returned to the kernel.
TRIM_THRESHOLD = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_done = False
_lock = threading.Lock()


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True if they are set."""
    global _done
    with _lock:
        if _done:
            return True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc
            return False
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        )
        return _done
