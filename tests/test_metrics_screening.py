"""Screening scores: confusion counts, P/R/F1, Mann-Whitney ROC-AUC; agreement with sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from cryosift.metrics import roc_auc, roc_curve, screening_metrics

SEED = 11


def test_hand_computed_confusion_counts() -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    score = [0.9, 0.6, 0.2, 0.7, 0.4, 0.1, 0.5]  # 0.5 is predicted positive (>=)
    out = screening_metrics(y, score, threshold=0.5)
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 2, 2, 1)
    assert (out["n_pos"], out["n_neg"]) == (3, 4)
    assert out["accuracy"] == pytest.approx(4 / 7)
    assert out["precision"] == pytest.approx(2 / 4)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    # AUC: positives beat negatives in 0.9:4/4, 0.6:3/4, 0.2:1/4 -> 8/12
    assert out["roc_auc"] == pytest.approx(8 / 12)


def test_auc_with_ties_hand_computed() -> None:
    # pairs (pos, neg): (.5,.1)=1 (.5,.5)=1/2 (.9,.1)=1 (.9,.5)=1 -> 3.5 / 4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.5, 0.5, 0.9]) == pytest.approx(0.875)
    assert roc_auc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.5)  # all tied
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0


def test_agreement_with_sklearn_including_ties() -> None:
    rng = np.random.default_rng(SEED)
    y = rng.random(500) < 0.4
    score = np.round(rng.normal(size=500) + 1.0 * y, 1)  # rounding creates many ties
    out = screening_metrics(y, score, threshold=0.3)
    pred = score >= 0.3
    assert out["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score), rel=1e-12)
    assert out["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert out["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert out["f1"] == pytest.approx(skm.f1_score(y, pred))
    (tn, fp), (fn, tp) = skm.confusion_matrix(y, pred)
    assert (out["tn"], out["fp"], out["fn"], out["tp"]) == (tn, fp, fn, tp)


def test_no_predicted_positives_and_single_class() -> None:
    out = screening_metrics([1, 0, 1], [0.1, 0.2, 0.3], threshold=0.9)
    assert out["precision"] == 0.0 and out["recall"] == 0.0 and out["f1"] == 0.0
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert np.isnan(screening_metrics([1, 1], [0.2, 0.7])["roc_auc"])


def test_bool_labels_and_types() -> None:
    out = screening_metrics(np.array([True, False, True]), np.array([0.8, 0.3, 0.4]))
    assert out["tp"] == 1 and out["fn"] == 1 and out["tn"] == 1
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert type(out[key]) is float
    for key in ("tp", "fp", "tn", "fn", "n_pos", "n_neg"):
        assert type(out[key]) is int


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="0/1"):
        screening_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        roc_auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])


def test_roc_curve_matches_sklearn_and_integrates_to_auc() -> None:
    rng = np.random.default_rng(SEED)
    y = rng.integers(0, 2, size=200)
    score = rng.normal(size=200) + y
    fpr, tpr, thr = roc_curve(y, score)
    ref = skm.roc_curve(y, score)
    for got, want in zip((fpr, tpr, thr), ref, strict=True):
        np.testing.assert_allclose(got, want)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, score), rel=1e-12)
