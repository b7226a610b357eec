"""Metrics: pure functions of numpy arrays (no I/O, no torch).

Image fidelity (`image`), Fourier ring correlation and resolution (`frc`), SNR from noisy
pairs (`ssnr`), clustering scores (`clustering`) and screening scores (`screening`). Images
are (N, H, W) stacks or single (H, W) images; per-image functions return shape (N,), the
summary functions (`image_metrics`, `clustering_metrics`, `screening_metrics`) plain Python
numbers ready for JSON.
"""

from cryosift.metrics.clustering import (
    ari,
    class_size_balance,
    cluster_to_class_map,
    clustering_accuracy,
    clustering_metrics,
    contingency,
    nmi,
    pairwise_prf,
)
from cryosift.metrics.frc import (
    FRC_CLEAN,
    FRC_HALVES,
    FrcAccumulator,
    frc,
    frc_resolution,
    half_bit_threshold,
    ring_counts,
    ring_frequencies,
    ring_index,
)
from cryosift.metrics.image import (
    cc,
    image_metrics,
    mse,
    psnr,
    rescale_to_reference,
    scale_invariant_psnr,
    ssim,
)
from cryosift.metrics.screening import roc_auc, roc_curve, screening_metrics
from cryosift.metrics.ssnr import SSNR_MAX, snr_from_pairs, ssnr_from_frc, ssnr_from_pairs

__all__ = [
    "FRC_CLEAN",
    "FRC_HALVES",
    "FrcAccumulator",
    "SSNR_MAX",
    "ari",
    "cc",
    "class_size_balance",
    "cluster_to_class_map",
    "clustering_accuracy",
    "clustering_metrics",
    "contingency",
    "frc",
    "frc_resolution",
    "half_bit_threshold",
    "image_metrics",
    "mse",
    "nmi",
    "pairwise_prf",
    "psnr",
    "rescale_to_reference",
    "ring_counts",
    "ring_frequencies",
    "ring_index",
    "roc_auc",
    "roc_curve",
    "scale_invariant_psnr",
    "screening_metrics",
    "snr_from_pairs",
    "ssim",
    "ssnr_from_frc",
    "ssnr_from_pairs",
]
