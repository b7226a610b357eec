"""Classic filters registered as denoisers (defaults and tuning grids for benchmarks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosift.filters.base import BatchContext, FilterChain, make_filter
from cryosift.registry import DenoiseTask, Method, register


def filter_denoiser(*steps: tuple[str, dict[str, Any]], chunk: int = 256):
    """A denoiser applying a chain of registered filters batch by batch."""
    filt = FilterChain([make_filter(name, **params) for name, params in steps])

    def run(task: DenoiseTask) -> np.ndarray:
        out = np.empty_like(task.noisy, dtype=np.float32)
        for start in range(0, len(task.noisy), chunk):
            stop = start + chunk
            meta = None if task.metadata is None else task.metadata.iloc[start:stop]
            ctx = BatchContext(pixel_size=task.pixel_size, metadata=meta)
            out[start:stop] = filt(np.asarray(task.noisy[start:stop], dtype=np.float32), ctx)
        return out

    run.params = filt.params()  # type: ignore[attr-defined]
    return run


def _single(name: str):
    def factory(**params: Any):
        return filter_denoiser((name, params))

    return factory


register(
    Method(
        "denoiser",
        "raw",
        lambda: lambda task: np.asarray(task.noisy, np.float32),
        "the noisy images unchanged (the baseline every method must beat)",
    )
)
register(
    Method(
        "denoiser",
        "lowpass",
        _single("lowpass"),
        "Gaussian low-pass, H = 0.5 at the cutoff",
        defaults={"cutoff_frac": 0.25, "kind": "gaussian"},
        tune={"cutoff_frac": [0.04, 0.06, 0.08, 0.11, 0.15, 0.2, 0.27, 0.36, 0.5, 0.7]},
    )
)
register(
    Method(
        "denoiser",
        "butterworth",
        _single("lowpass"),
        "Butterworth low-pass (order 8)",
        defaults={"cutoff_frac": 0.25, "kind": "butterworth", "order": 8},
        tune={"cutoff_frac": [0.04, 0.06, 0.08, 0.11, 0.15, 0.2, 0.27, 0.36, 0.5, 0.7]},
    )
)
register(
    Method(
        "denoiser",
        "gaussian",
        _single("gaussian"),
        "real-space Gaussian blur",
        defaults={"sigma_px": 1.0},
        tune={"sigma_px": [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]},
    )
)
register(
    Method(
        "denoiser",
        "median",
        _single("median"),
        "median filter",
        defaults={"size_px": 3},
        tune={"size_px": [3, 5, 7, 9]},
    )
)
register(
    Method(
        "denoiser",
        "bilateral",
        _single("bilateral"),
        "bilateral filter",
        defaults={"sigma_spatial_px": 2.0, "sigma_range": 1.0},
        tune={"sigma_spatial_px": [1.0, 2.0, 3.0], "sigma_range": [0.5, 1.0, 2.0, 4.0]},
    )
)
register(Method("denoiser", "histeq", _single("histeq"), "global histogram equalisation"))
register(
    Method(
        "denoiser",
        "clahe",
        _single("clahe"),
        "contrast-limited adaptive hist. eq.",
        defaults={"clip_limit": 0.01},
    )
)
register(
    Method(
        "denoiser",
        "bilateral+histeq",
        lambda **p: filter_denoiser(("bilateral", p), ("histeq", {})),
        "the preprocessing of seed 000: bilateral filter then histogram equalisation",
        defaults={"sigma_spatial_px": 2.0, "sigma_range": 1.0},
    )
)
register(
    Method(
        "denoiser",
        "phaseflip",
        _single("phaseflip"),
        "CTF phase flipping",
        needs=frozenset({"ctf"}),
    )
)
register(
    Method(
        "denoiser",
        "ctf_wiener",
        _single("wiener"),
        "CTF Wiener filter with a constant SNR",
        needs=frozenset({"ctf"}),
        defaults={"snr": 0.1},
        tune={"snr": [0.01, 0.03, 0.1, 0.3, 1.0]},
    )
)
