"""Shared helpers for the simulator tests (tests/test_simulate_*.py); not a test module.

Independent reference maths (numpy only, no cryosift code) and small utilities: locating the real
atomic models and maps in the shared data folder, band-limiting images to a Fourier disk, running
the CLI with its log handler restored afterwards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from shared_data import SHARED_DATA

DATA = SHARED_DATA
STRUCTURES = DATA / "structures"
MAPS = DATA / "maps"


def data_file(kind: str, name: str) -> Path:
    """Path of a shared structure/map, or skip the test with a clear reason when it is absent."""
    path = DATA / kind / name
    if not path.is_file():
        pytest.skip(f"shared test data not found: {path} (real structures/maps live there)")
    return path


def rfft_disk(n: int, strict: bool = True) -> np.ndarray:
    """Mask on the rfft2 grid of an n x n image: |k| < n/2 (strict) or |k| <= n/2, k in pixels."""
    ky = np.fft.fftfreq(n, 1.0 / n)[:, None]
    kx = np.fft.rfftfreq(n, 1.0 / n)[None, :]
    k2 = kx**2 + ky**2
    return k2 < (n / 2) ** 2 if strict else k2 <= (n / 2) ** 2


def spectrum(img: np.ndarray) -> np.ndarray:
    """rfft2 of images centred at pixel n//2 (the simulator's slice convention), float64."""
    return np.fft.rfft2(np.fft.ifftshift(np.asarray(img, dtype=np.float64), axes=(-2, -1)))


def band_limit(img: np.ndarray, strict: bool = True) -> np.ndarray:
    """Images (..., n, n) centred at n//2 with everything outside the Fourier disk removed."""
    n = img.shape[-1]
    f = spectrum(img)
    f[..., ~rfft_disk(n, strict)] = 0
    return np.fft.fftshift(np.fft.irfft2(f, s=(n, n)), axes=(-2, -1))


def rel_l2(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| in float64 (complex arrays allowed)."""
    a, ref = np.asarray(a), np.asarray(ref)
    dtype = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(ref) else np.float64
    a, ref = a.astype(dtype), ref.astype(dtype)
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def centre_of_mass(img: np.ndarray) -> tuple[float, float]:
    """(x, y) = (column, row) centre of mass relative to pixel n//2, raw signed weights."""
    n = img.shape[-1]
    c = np.arange(n) - n // 2
    w = np.asarray(img, dtype=np.float64)
    total = w.sum()
    return float((w.sum(0) * c).sum() / total), float((w.sum(1) * c).sum() / total)


def ring_index(n: int) -> np.ndarray:
    """Integer Fourier radius (rounded) of every pixel of the full fft2 grid of an n x n image."""
    k = np.fft.fftfreq(n, 1.0 / n)
    return np.rint(np.hypot(k[:, None], k[None, :])).astype(int)


def run_cli(argv: list[str]) -> int:
    """cryosift.cli.main.main(argv), restoring the root logger's handlers afterwards.

    The CLI calls logging.basicConfig(force=True) on the current sys.stderr, which under capsys is
    a capture stream that is closed after the test; later log records would then fail to print.
    """
    from cryosift.cli.main import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return main(argv)
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)
