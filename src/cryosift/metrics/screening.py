"""Particle-vs-junk screening scores: confusion counts, accuracy, precision, recall, F1, ROC-AUC.

`y_true` is boolean or 0/1 (1 = particle); `score` is higher for more particle-like images.
An image is predicted a particle when ``score >= threshold``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata
from sklearn.metrics import roc_curve as _sk_roc_curve

__all__ = ["roc_auc", "roc_curve", "screening_metrics"]


def _inputs(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true and score differ in length: {y.size} vs {s.size}")
    if y.size == 0:
        raise ValueError("no labels given")
    if y.dtype != bool:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("y_true must be boolean or 0/1 (1 = particle)")
        y = y == 1
    if np.isnan(s).any():
        raise ValueError("score contains NaN")
    return y, s


def roc_auc(y_true: ArrayLike, score: ArrayLike) -> float:
    """Area under the ROC curve by the Mann-Whitney U statistic.

    AUC = (sum of positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg), ranks over all
    scores with ties given their average rank, i.e. P(score_pos > score_neg) + P(tie) / 2.
    O(n log n). NaN when either class is absent (AUC undefined).
    """
    y, s = _inputs(y_true, score)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: ArrayLike, score: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (false-positive rate, true-positive rate, thresholds), via sklearn."""
    y, s = _inputs(y_true, score)
    fpr, tpr, thr = _sk_roc_curve(y, s)
    return fpr, tpr, thr


def screening_metrics(
    y_true: ArrayLike, score: ArrayLike, threshold: float = 0.5
) -> dict[str, Any]:
    """Classification scores at a threshold plus the threshold-free ROC-AUC.

    Keys: ``accuracy``, ``precision``, ``recall``, ``f1``, ``roc_auc`` (floats), ``n_pos``,
    ``n_neg``, ``tp``, ``fp``, ``tn``, ``fn`` (ints), ``threshold``. Predicted particle means
    ``score >= threshold``. Zero denominators give 0.0 as scikit-learn's default does:
    precision with no predicted positives, recall with no true positives, F1 when
    precision + recall = 0. ``roc_auc`` is NaN when one class is absent.
    """
    y, s = _inputs(y_true, score)
    pred = s >= threshold
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "accuracy": (tp + tn) / y.size,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": roc_auc(y, s),
        "n_pos": tp + fn,
        "n_neg": fp + tn,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }
