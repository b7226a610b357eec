"""Classic image filters: Fourier low/high-pass, Gaussian, median, bilateral, histogram
equalisation (global, CLAHE), RELION-style normalisation, contrast inversion and CTF
correction (phase flip, Wiener). One module per family; every filter is registered in
:data:`FILTERS` by name and built with :func:`make_filter`."""

from cryosift.filters.base import (
    FILTERS,
    BatchContext,
    Filter,
    FilterChain,
    apply_filter_to_source,
    make_filter,
    register,
)
from cryosift.filters.bilateral import Bilateral, bilateral_filter, estimate_noise_sigma
from cryosift.filters.ctf import PhaseFlip, Wiener, batch_ctf
from cryosift.filters.fourier import HighPass, LowPass
from cryosift.filters.histogram import Clahe, HistEq, equalize_hist_batch
from cryosift.filters.normalize import Invert, Normalize
from cryosift.filters.spatial import GaussianBlur, Median

__all__ = [
    "FILTERS",
    "BatchContext",
    "Bilateral",
    "Clahe",
    "Filter",
    "FilterChain",
    "GaussianBlur",
    "HighPass",
    "HistEq",
    "Invert",
    "LowPass",
    "Median",
    "Normalize",
    "PhaseFlip",
    "Wiener",
    "apply_filter_to_source",
    "batch_ctf",
    "bilateral_filter",
    "equalize_hist_batch",
    "estimate_noise_sigma",
    "make_filter",
    "register",
]
