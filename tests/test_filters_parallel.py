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
