"""Clusterers in the method registry (`cryosift bench`, `cryosift classify --method NAME`).

Each factory builds `f(task: ClusterTask) -> ClusterResult`:

- ``kmeans_raw`` / ``hc_raw``: k-means++ / Ward on the standardised masked pixels (seed 004's
  baselines "k-means and HC on raw images");
- ``pca+kmeans`` / ``pca+hc``: the same on 50 randomised-PCA components;
- ``rotinv+kmeans``: k-means++ on rotation-invariant Fourier-Bessel features;
- ``pca+bsk``: BSK-means++ (balanced-size k-means++, seed 001; :mod:`cryosift.classify.balanced`)
  on the PCA features, without the DRVAE;
- ``align2d``: reference-free alignment-aware classification (:mod:`cryosift.classify.align2d`):
  candidate pruning and soft (EM) assignment by default.

Images whose metadata carries CTF parameters are phase-flipped first (averages are then of the
phase-flipped images).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cryosift.classify.cluster import class_averages, kmeans_pp, ward
from cryosift.classify.features import compute_features, has_ctf, phase_flip
from cryosift.registry import ClusterResult, ClusterTask, Method, register

ALGORITHMS = ("kmeans", "hc", "bsk")


def cluster_features(
    features: np.ndarray, k: int, algorithm: str, seed: int = 0
) -> np.ndarray:
    """Labels 0..k-1 from one of the feature-space algorithms (kmeans, hc, bsk)."""
    from cryosift.errors import CryosiftError

    if algorithm == "kmeans":
        return kmeans_pp(features, k, seed=seed)[0]
    if algorithm in ("hc", "hierarchical", "ward"):
        return ward(features, k, seed=seed)[0]
    if algorithm in ("bsk", "bskmeans"):
        from cryosift.classify.balanced import bsk_means_pp

        return np.asarray(bsk_means_pp(np.asarray(features, np.float32), k, seed=seed)[0])
    raise CryosiftError(f"unknown clustering algorithm {algorithm!r} ({', '.join(ALGORITHMS)})")


def _flipped(task: ClusterTask) -> np.ndarray:
    """The task's images, CTF phase-flipped when its metadata has CTF parameters."""
    if has_ctf(task.metadata):
        return phase_flip(task.images, task.metadata, task.pixel_size)
    return task.images


def _feature_clusterer(features: str, algorithm: str, n_components: int = 50, **_: Any):
    def run(task: ClusterTask) -> ClusterResult:
        images = _flipped(task)
        meta = task.metadata
        if has_ctf(meta):  # flipped already: denoisers must not correct the CTF again
            meta = meta.drop(columns=["rlnDefocusU"])
        feats = compute_features(images, features, task.pixel_size, meta, task.seed, n_components)
        labels = cluster_features(feats, task.k, algorithm, task.seed).astype(np.int64)
        return ClusterResult(
            labels=labels,
            averages=class_averages(images, labels, task.k),
            info={"features": features, "algorithm": algorithm, "n_features": feats.shape[1]},
        )

    return run


def _align2d(**params: Any):
    def run(task: ClusterTask) -> ClusterResult:
        from cryosift.classify.align2d import align2d

        res = align2d(task.images, task.k, seed=task.seed, metadata=task.metadata,
                      pixel_size=task.pixel_size, **params)
        return ClusterResult(
            labels=res.labels,
            averages=res.averages,
            psi=res.psi,
            shifts=res.origins * task.pixel_size,
            info={"params": res.params, "history": res.history},
        )

    run.params = dict(params)  # type: ignore[attr-defined]
    return run


_FEATURE_METHODS = {
    "kmeans_raw": ("raw", "kmeans", "k-means++ on standardised masked pixels (seed 004 baseline)"),
    "hc_raw": ("raw", "hc", "Ward hierarchical clustering on pixels (seed 004 baseline)"),
    "pca+kmeans": ("pca", "kmeans", "k-means++ on 50 randomised-PCA components"),
    "pca+hc": ("pca", "hc", "Ward hierarchical clustering on 50 PCA components"),
    "rotinv+kmeans": ("rotinv", "kmeans", "k-means++ on rotation-invariant Fourier-Bessel "
                      "features (for in-plane rotations)"),
    "pca+bsk": ("pca", "bsk", "BSK-means++ (balanced sizes, seed 001) on 50 PCA components"),
}

for _name, (_feat, _algo, _summary) in _FEATURE_METHODS.items():
    register(
        Method(
            "clusterer",
            _name,
            _feature_clusterer,
            _summary,
            defaults={"features": _feat, "algorithm": _algo},
        )
    )

register(
    Method(
        "clusterer",
        "align2d",
        _align2d,
        "reference-free multi-reference alignment: rotations x shifts by FFT, the 6 most "
        "promising classes per image, soft (EM) assignment",
        defaults={"psi_step": 10.0, "iterations": 15, "align_box": 32, "candidates": 6,
                  "assignment": "soft"},
        quick={"iterations": 8},
    )
)
