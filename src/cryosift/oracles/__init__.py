"""Ideal references for simulated data (they need the ground truth): the yardsticks printed beside
every score. Denoising: the Wiener filter with the true spectra (benchmarks also tune every filter
on the clean images). Clustering: the nearest clean view. Screening: the matched filter."""

from cryosift.oracles.denoise import ring_power, wiener_ensemble, wiener_oracle
from cryosift.oracles.screen import matched_filter_scores
from cryosift.oracles.views import nearest_clean_view

__all__ = [
    "matched_filter_scores",
    "nearest_clean_view",
    "ring_power",
    "wiener_ensemble",
    "wiener_oracle",
]
