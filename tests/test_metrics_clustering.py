"""Clustering scores: Hungarian accuracy, pairwise P/R/F1, balance; agreement with sklearn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix

from cryosift.metrics import (
    ari,
    class_size_balance,
    cluster_to_class_map,
    clustering_accuracy,
    clustering_metrics,
    contingency,
    nmi,
    pairwise_prf,
)

SEED = 3


def _brute_acc(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> float:
    """Best accuracy over all relabellings of k clusters onto k classes (labels 0..k-1)."""
    return max(
        np.mean(np.array(perm)[y_pred] == y_true) for perm in itertools.permutations(range(k))
    )


def test_contingency_table() -> None:
    table, classes, clusters = contingency(["a", "a", "b", "b", "b"], [5, 7, 7, 7, 9])
    np.testing.assert_array_equal(table, [[1, 1, 0], [0, 2, 1]])
    assert classes.tolist() == ["a", "b"] and clusters.tolist() == [5, 7, 9]


def test_accuracy_of_a_permuted_labelling_is_one() -> None:
    rng = np.random.default_rng(SEED)
    y = rng.integers(0, 6, size=200)
    perm = rng.permutation(6)
    assert clustering_accuracy(y, perm[y]) == 1.0
    assert clustering_accuracy(y, np.array(list("uvwxyz"))[perm[y]]) == 1.0  # any label type


def test_accuracy_hand_cases() -> None:
    # best matching: cluster 1 -> class 0 (2 items), cluster 0 -> class 1 (3 items)
    assert clustering_accuracy([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]) == pytest.approx(5 / 6)
    # more clusters than classes: the extra cluster's items count as errors
    assert clustering_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(3 / 4)
    # fewer clusters than classes: one class left unmatched
    assert clustering_accuracy([0, 1, 2, 2], [0, 0, 0, 0]) == pytest.approx(2 / 4)
    assert cluster_to_class_map([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]) == {1: 0, 0: 1}


def test_accuracy_matches_brute_force_over_permutations() -> None:
    rng = np.random.default_rng(SEED)
    for _ in range(5):
        y = rng.integers(0, 4, size=60)
        noisy = np.where(rng.random(60) < 0.4, rng.integers(0, 4, size=60), y)
        pred = rng.permutation(4)[noisy]
        assert clustering_accuracy(y, pred) == pytest.approx(_brute_acc(y, pred, 4))


def test_nmi_ari_match_sklearn() -> None:
    rng = np.random.default_rng(SEED)
    y = rng.integers(0, 5, size=300)
    pred = np.where(rng.random(300) < 0.3, rng.integers(0, 7, size=300), y)
    assert nmi(y, pred) == pytest.approx(normalized_mutual_info_score(y, pred), rel=1e-12)
    assert ari(y, pred) == pytest.approx(adjusted_rand_score(y, pred), rel=1e-12)
    assert nmi(y, y) == pytest.approx(1.0)
    assert ari(y, y) == pytest.approx(1.0)


def test_pairwise_prf_hand_made_six_items() -> None:
    # same-class pairs: 3 + 3 = 6; same-cluster pairs: C(2,2) + C(4,2) = 7;
    # both: {0,1} and the 3 pairs within {3,4,5} = 4
    out = pairwise_prf([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1])
    assert out["precision"] == pytest.approx(4 / 7)
    assert out["recall"] == pytest.approx(4 / 6)
    assert out["f1"] == pytest.approx(8 / 13)


def _brute_pairs(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    i, j = np.triu_indices(y.size, k=1)
    same_t, same_p = y[i] == y[j], p[i] == p[j]
    tp = np.sum(same_t & same_p)
    return tp / same_p.sum(), tp / same_t.sum()


def test_pairwise_prf_matches_brute_force_and_sklearn() -> None:
    rng = np.random.default_rng(SEED)
    y = rng.integers(0, 4, size=80)
    pred = np.where(rng.random(80) < 0.5, rng.integers(0, 5, size=80), y)
    out = pairwise_prf(y, pred)
    precision, recall = _brute_pairs(y, pred)
    assert out["precision"] == pytest.approx(precision, rel=1e-12)
    assert out["recall"] == pytest.approx(recall, rel=1e-12)
    (_, fp), (fn, tp) = pair_confusion_matrix(y, pred)  # ordered pairs; ratios agree
    assert out["precision"] == pytest.approx(tp / (tp + fp), rel=1e-12)
    assert out["recall"] == pytest.approx(tp / (tp + fn), rel=1e-12)


def test_pairwise_prf_degenerate() -> None:
    out = pairwise_prf([0, 0, 1, 1], [0, 1, 2, 3])  # all singletons: no pairs claimed
    assert out == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    out = pairwise_prf([0, 0, 1, 1], [0, 0, 0, 0])
    assert out["recall"] == 1.0 and out["precision"] == pytest.approx(2 / 6)


def test_class_size_balance() -> None:
    out = class_size_balance([0, 0, 0, 1, 2, 2])
    assert out["sizes"] == [3, 1, 2]
    assert out["min_max_ratio"] == pytest.approx(1 / 3)
    assert out["cv"] == pytest.approx(np.sqrt(2 / 3) / 2)
    p = np.array([3, 1, 2]) / 6
    assert out["normalized_entropy"] == pytest.approx(-np.sum(p * np.log(p)) / np.log(3))
    balanced = class_size_balance([1, 0, 1, 0])
    assert balanced["cv"] == 0.0 and balanced["min_max_ratio"] == 1.0
    assert balanced["normalized_entropy"] == pytest.approx(1.0)
    # empty clusters count when the number of classes is known
    with_empty = class_size_balance([0, 0, 2], n_classes=4)
    assert with_empty["sizes"] == [2, 0, 1, 0] and with_empty["min_max_ratio"] == 0.0
    with pytest.raises(ValueError):
        class_size_balance([0, 5], n_classes=3)


def test_clustering_metrics_keys_and_values() -> None:
    y = [0, 0, 0, 1, 1, 1]
    pred = [0, 0, 1, 1, 1, 1]
    out = clustering_metrics(y, pred)
    assert list(out) == ["acc", "nmi", "ari", "pair_precision", "pair_recall", "pair_f1"]
    assert all(type(v) is float for v in out.values())
    assert out["acc"] == pytest.approx(5 / 6)
    assert out["pair_f1"] == pytest.approx(8 / 13)
    assert out["ari"] == pytest.approx(adjusted_rand_score(y, pred))


def test_label_errors() -> None:
    with pytest.raises(ValueError, match="length"):
        clustering_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError):
        clustering_metrics([], [])
