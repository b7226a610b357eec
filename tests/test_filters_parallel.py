"""Image-parallel execution (cryosift.filters.parallel): same results, torch settings restored."""

from __future__ import annotations

import threading

import numpy as np
import torch

from cryosift.filters import BatchContext, FilterChain, make_filter
from cryosift.filters.parallel import in_worker, map_slices, single_threaded_torch


def test_map_slices_covers_every_image_once():
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def fn(start: int, stop: int) -> np.ndarray:
        with lock:
            seen.append((start, stop))
        assert in_worker() and torch.get_num_threads() == 1
        return np.arange(start, stop, dtype=np.float32)[:, None]

    out = map_slices(fn, 37, np.zeros((37, 1), np.float32), workers=3, min_per_worker=1)
    np.testing.assert_array_equal(out[:, 0], np.arange(37))
    assert len(seen) == 3 and sorted(seen)[0][0] == 0 and sorted(seen)[-1][1] == 37
    assert not in_worker()


def test_threaded_filters_equal_serial_and_restore_torch_threads():
    before = torch.get_num_threads()
    imgs = np.random.default_rng(0).normal(size=(24, 32, 32)).astype(np.float32)
    original = imgs.copy()
    ctx = BatchContext(pixel_size=2.0)
    for name, params in [("median", {}), ("histeq", {}), ("lowpass", {"cutoff_A": 8.0}),
                         ("bilateral", {}), ("normalize", {})]:
        threaded = make_filter(name, **params)
        serial = make_filter(name, **params)
        serial.threaded = False
        np.testing.assert_allclose(threaded(imgs, ctx), serial(imgs, ctx), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(imgs, original)  # filters never modify their input
    chain = FilterChain([make_filter("bilateral"), make_filter("histeq")])
    assert chain(imgs, ctx).shape == imgs.shape
    assert torch.get_num_threads() == before


def test_concurrent_callers_leave_torch_threads_unchanged():
    before = torch.get_num_threads()
    imgs = np.random.default_rng(1).normal(size=(16, 32, 32)).astype(np.float32)
    filt = make_filter("median")
    threads = [threading.Thread(target=lambda: [filt(imgs) for _ in range(5)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.get_num_threads() == before
    with single_threaded_torch() as saved:
        assert saved == before and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_fixed_slices_are_the_same_on_any_number_of_threads_and_inside_a_worker():
    """slice_size: the batch is cut at 0, s, 2s, ... whoever runs it, so that batched FFTs see
    the same sub-batches in this process and in a Dask worker (bit-identical outputs)."""
    from cryosift.filters.parallel import fixed_slice_size, worker_mode

    def bounds_with(**kw) -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []
        lock = threading.Lock()

        def fn(start: int, stop: int) -> np.ndarray:
            with lock:
                seen.append((start, stop))
            assert torch.get_num_threads() == 1
            return np.arange(start, stop, dtype=np.float32)[:, None]

        out = map_slices(fn, 37, np.zeros((37, 1), np.float32), slice_size=16, **kw)
        np.testing.assert_array_equal(out[:, 0], np.arange(37))
        return sorted(seen)

    expected = [(0, 16), (16, 32), (32, 37)]
    assert bounds_with(workers=1) == bounds_with(workers=3) == expected
    with worker_mode():
        assert bounds_with() == expected
    assert (fixed_slice_size(32), fixed_slice_size(128), fixed_slice_size(4096)) == (128, 8, 1)
    imgs = np.random.default_rng(2).normal(size=(300, 32, 32)).astype(np.float32)
    lowpass = make_filter("lowpass", cutoff_A=8.0)
    ctx = BatchContext(pixel_size=2.5)
    here = lowpass(imgs, ctx)
    with worker_mode():
        in_worker_out = lowpass(imgs, ctx)
    assert np.array_equal(here, in_worker_out)
