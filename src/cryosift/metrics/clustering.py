"""Clustering scores against true labels: Hungarian accuracy, NMI, ARI, pairwise P/R/F1, balance.

Labels may be any values numpy can sort (ints, strings); cluster ids need not match class ids
and the numbers of clusters and classes may differ. Everything is computed from the
contingency table, so the cost is O(n + K*C) plus the K*C assignment problem.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = [
    "contingency",
    "clustering_accuracy",
    "cluster_to_class_map",
    "nmi",
    "ari",
    "pairwise_prf",
    "class_size_balance",
    "clustering_metrics",
]


def _labels(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("no labels given")
    return t, p


def contingency(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency table C[i, j] = #items of class i put in cluster j: (C, classes, clusters)."""
    t, p = _labels(y_true, y_pred)
    classes, ti = np.unique(t, return_inverse=True)
    clusters, pj = np.unique(p, return_inverse=True)
    table = np.bincount(
        ti.ravel() * clusters.size + pj.ravel(), minlength=classes.size * clusters.size
    ).reshape(classes.size, clusters.size)
    return table, classes, clusters


def _matching(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of classes (rows) to clusters (columns) maximising matched items."""
    return linear_sum_assignment(table, maximize=True)


def clustering_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of items whose cluster is matched to their class by the best one-to-one matching.

    The matching (Hungarian, `scipy.optimize.linear_sum_assignment` on the contingency table)
    pairs min(K, C) clusters with classes; items in unmatched clusters (more clusters than
    classes) or of unmatched classes (fewer clusters) count as errors.
    """
    table, _, _ = contingency(y_true, y_pred)
    rows, cols = _matching(table)
    return float(table[rows, cols].sum() / table.sum())


def cluster_to_class_map(y_true: ArrayLike, y_pred: ArrayLike) -> dict:
    """The Hungarian matching behind `clustering_accuracy`: {cluster label: class label}.

    Clusters left unmatched (more clusters than classes) are absent.
    """
    table, classes, clusters = contingency(y_true, y_pred)
    rows, cols = _matching(table)
    return {clusters[j].item(): classes[i].item() for i, j in zip(rows, cols, strict=True)}


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information (sklearn, arithmetic-mean normalisation)."""
    t, p = _labels(y_true, y_pred)
    return float(normalized_mutual_info_score(t, p))


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index (sklearn)."""
    t, p = _labels(y_true, y_pred)
    return float(adjusted_rand_score(t, p))


def _pairs(counts: np.ndarray) -> int:
    """Number of unordered pairs within groups of the given sizes: sum n(n-1)/2 (exact ints)."""
    c = counts.astype(np.int64)
    return int(np.sum(c * (c - 1) // 2))


def pairwise_prf(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Precision, recall and F1 over pairs of items ("same cluster" vs "same class").

    TP = pairs in the same class and the same cluster; precision = TP / pairs in the same
    cluster; recall = TP / pairs in the same class. Counted from the contingency table in
    O(n + K*C), never over the n^2 pairs. A zero denominator gives 0.0 (e.g. precision when
    every item is its own cluster), as does F1 when precision + recall = 0.
    """
    table, _, _ = contingency(y_true, y_pred)
    tp = _pairs(table.ravel())
    same_cluster = _pairs(table.sum(axis=0))
    same_class = _pairs(table.sum(axis=1))
    precision = tp / same_cluster if same_cluster else 0.0
    recall = tp / same_class if same_class else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1)}


def class_size_balance(y_pred: ArrayLike, n_classes: int | None = None) -> dict[str, Any]:
    """How even the cluster sizes are (seed `001_*` aims to avoid tiny classes).

    Returns ``sizes`` (list, sorted by label), ``labels``, ``min_size``, ``max_size``,
    ``min_max_ratio`` (min / max, 1 = perfectly balanced), ``cv`` (coefficient of variation,
    population std / mean, 0 = balanced) and ``normalized_entropy`` (entropy of the size
    distribution / log K, 1 = balanced; 1.0 for K = 1). If `n_classes` is given, labels must be
    integers in [0, n_classes) and empty clusters count with size 0.
    """
    p = np.asarray(y_pred).ravel()
    if p.size == 0:
        raise ValueError("no labels given")
    if n_classes is None:
        labels, sizes = np.unique(p, return_counts=True)
    else:
        if not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= n_classes:
            raise ValueError(
                f"with n_classes={n_classes}, labels must be integers in [0, {n_classes})"
            )
        labels = np.arange(n_classes)
        sizes = np.bincount(p, minlength=n_classes)
    sizes = sizes.astype(np.int64)
    frac = sizes / sizes.sum()
    nz = frac[frac > 0]
    k = sizes.size
    entropy = float(-np.sum(nz * np.log(nz)))
    return {
        "sizes": sizes.tolist(),
        "labels": labels.tolist(),
        "n_classes": int(k),
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "min_max_ratio": float(sizes.min() / sizes.max()),
        "cv": float(sizes.std() / sizes.mean()),
        "normalized_entropy": entropy / float(np.log(k)) if k > 1 else 1.0,
    }


def clustering_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """All label-agreement scores as plain floats.

    Keys: ``acc``, ``nmi``, ``ari``, ``pair_precision``, ``pair_recall``, ``pair_f1``.
    """
    prf = pairwise_prf(y_true, y_pred)
    return {
        "acc": clustering_accuracy(y_true, y_pred),
        "nmi": nmi(y_true, y_pred),
        "ari": ari(y_true, y_pred),
        "pair_precision": prf["precision"],
        "pair_recall": prf["recall"],
        "pair_f1": prf["f1"],
    }
