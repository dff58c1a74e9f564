"""Metric values against hand computation, threshold choice and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.metrics import binary_metrics, bootstrap_ci, choose_threshold

Y = [0, 0, 0, 0, 1, 1, 1]
S = [0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.3]


def test_binary_metrics_by_hand():
    m = binary_metrics(Y, S, 0.5)
    # predictions: 0 0 0 1 | 1 1 0  -> TN 3, FP 1, TP 2, FN 1
    assert m["confusion"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 2}
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 / 3)
    # AUC: pairs (pos, neg) with pos > neg: 0.7 beats 3, 0.9 beats 4, 0.3 beats 1 -> 8 / 12
    assert m["auc"] == pytest.approx(8 / 12)


def test_single_class_auc_is_nan_not_an_error():
    assert np.isnan(binary_metrics([1, 1], [0.2, 0.9], 0.5)["auc"])


def test_youden_threshold_separates_separable_scores():
    thr = choose_threshold([0, 0, 1, 1], [0.2, 0.3, 0.6, 0.7], "youden")
    assert 0.3 < thr <= 0.6
    assert binary_metrics([0, 0, 1, 1], [0.2, 0.3, 0.6, 0.7], thr)["accuracy"] == 1.0


def test_f1_and_fixed_thresholds():
    assert choose_threshold(Y, S, 0.42) == 0.42
    thr = choose_threshold(Y, S, "f1")
    assert binary_metrics(Y, S, thr)["f1"] >= binary_metrics(Y, S, 0.5)["f1"]


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 60), 0, 1)
    ci = bootstrap_ci(y, s, 0.5, metrics=["auc", "accuracy"], n=300, seed=4)
    point = binary_metrics(y, s, 0.5)
    for name in ("auc", "accuracy"):
        lo, hi = ci[name]
        assert lo < point[name] < hi and hi - lo < 0.5
    assert ci == bootstrap_ci(y, s, 0.5, metrics=["auc", "accuracy"], n=300, seed=4)
