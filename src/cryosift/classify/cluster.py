"""k-means++ and hierarchical (Ward) clustering of feature vectors, and class averages.

Both use scikit-learn. Ward's agglomeration needs O(N^2) memory, so above ``max_points`` it is
fitted on a random subset and the other points join the class whose centroid is nearest (in the
same features): the Ward tree of 10^4 points already fixes the K centroids well.
"""

from __future__ import annotations

import numpy as np

from cryosift.errors import InputError

__all__ = [
    "check_features",
    "check_k",
    "class_averages",
    "kmeans_pp",
    "order_by_size",
    "ward",
]


def check_k(k: int, n: int) -> int:
    """K must be an integer with 2 <= K <= N."""
    if int(k) != k or k < 2:
        raise InputError(f"-k must be an integer of at least 2, got {k}")
    if k > n:
        raise InputError(f"-k {k} is larger than the number of images ({n})")
    return int(k)


def check_features(features: np.ndarray, k: int, n: int | None = None) -> np.ndarray:
    """Features must be a finite (N, D) matrix, N matching the images when `n` is given."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] < 1:
        raise InputError(f"features must be a 2-D array (N images, D features), got {x.shape}")
    if n is not None and x.shape[0] != n:
        raise InputError(f"features have {x.shape[0]} rows but there are {n} images")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise InputError("features must be finite numbers (found NaN, Inf or non-numbers)")
    check_k(k, x.shape[0])
    return x.astype(np.float32, copy=False)


def kmeans_pp(
    features: np.ndarray, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 300
) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding (best of `n_init`): (labels (N,), centres (k, D))."""
    from sklearn.cluster import KMeans

    x = check_features(features, k)
    km = KMeans(k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
    labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float32)


def ward(
    features: np.ndarray, k: int, seed: int = 0, max_points: int = 10000
) -> tuple[np.ndarray, np.ndarray]:
    """Agglomerative clustering with Ward linkage: (labels (N,), centroids (k, D))."""
    from sklearn.cluster import AgglomerativeClustering

    x = check_features(features, k)
    n = len(x)
    rows = np.arange(n)
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    sub = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(x[rows])
    centres = np.stack([x[rows][sub == j].mean(0) for j in range(k)])
    if n == len(rows):
        return sub.astype(np.int64), centres.astype(np.float32)
    labels = np.empty(n, dtype=np.int64)
    c2 = (centres.astype(np.float64) ** 2).sum(1)
    for s in range(0, n, 4096):
        d = c2[None] - 2.0 * x[s : s + 4096].astype(np.float64) @ centres.T.astype(np.float64)
        labels[s : s + 4096] = np.argmin(d, 1)
    labels[rows] = sub
    return labels, centres.astype(np.float32)


def class_averages(images: np.ndarray, labels: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Mean image of every class (k, box, box) float32; empty classes are zero."""
    import torch

    box = images.shape[-1]
    sums = torch.zeros((k, box * box), dtype=torch.float64)
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    for s in range(0, len(labels), chunk):
        x = torch.as_tensor(np.asarray(images[s : s + chunk], dtype=np.float64))
        sums.index_add_(0, lab[s : s + chunk], x.reshape(-1, box * box))
    sums = sums.numpy()
    counts = np.bincount(labels, minlength=k)
    return (sums / np.maximum(counts, 1)[:, None]).reshape(k, box, box).astype(np.float32)


def order_by_size(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Relabel classes 0..k-1 from largest to smallest: (new labels, old id of each new class)."""
    counts = np.bincount(labels, minlength=k)
    order = np.argsort(-counts, kind="stable")
    new_of_old = np.empty(k, dtype=np.int64)
    new_of_old[order] = np.arange(k)
    return new_of_old[labels], order
