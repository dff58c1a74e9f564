"""Intervals by patient, BCa, and score intervals that do not collapse at a perfect score."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medflow import intervals as iv
from medflow.metrics import binary_intervals, binary_summary


def _clustered(n_patients=12, per_patient=5, seed=0):
    """Patients with several series each; a patient's series score alike (one scan protocol, one body)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_patients) % 2, per_patient)
    patient_score = rng.normal(0.5 + 0.25 * (np.arange(n_patients) % 2), 0.2)
    s = np.repeat(patient_score, per_patient) + rng.normal(0, 0.01, n_patients * per_patient)
    groups = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    return y, s, groups


def test_resampling_patients_widens_the_interval_of_a_clustered_cohort():
    y, s, groups = _clustered()
    by_patient, _ = binary_intervals(y, s, 0.6, groups, metrics=["auc", "accuracy"], n=500, seed=1)
    by_series, _ = binary_intervals(y, s, 0.6, np.arange(len(y)), metrics=["auc", "accuracy"], n=500, seed=1)
    for name in ("auc", "accuracy"):
        wide, narrow = np.diff(by_patient[name])[0], np.diff(by_series[name])[0]
        assert wide > 1.5 * narrow, (name, by_patient[name], by_series[name])


def test_bca_agrees_with_scipys_on_independent_cases():
    x = np.random.default_rng(3).gamma(2.0, size=40)  # skewed: BCa and percentile differ
    ours = iv.patient_bootstrap(lambda rows: {"mean": float(x[rows].mean())}, np.arange(40), ["mean"], n=4000,
                                seed=0)["mean"]
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="BCa", random_state=0).confidence_interval
    assert ours[0] == pytest.approx(ref.low, abs=0.06) and ours[1] == pytest.approx(ref.high, abs=0.08)


def test_wilson_equals_the_closed_form():
    z = stats.norm.ppf(0.975)
    for k, n in ((20, 20), (17, 20), (0, 7), (3, 50)):
        p = k / n
        centre, half = p + z**2 / (2 * n), z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
        expected = ((centre - half) / (1 + z**2 / n), (centre + half) / (1 + z**2 / n))
        assert iv.wilson(k, n) == pytest.approx(expected, abs=1e-9)


def test_newcombe_auc_interval():
    lo, hi = iv.newcombe_auc(1.0, 10, 10)
    assert hi == 1.0 and 0.75 < lo < 0.95  # a perfect AUC on 20 cases is not certainty
    assert iv.newcombe_auc(1.0, 40, 40)[0] > lo  # more cases, a tighter bound
    lo5, hi5 = iv.newcombe_auc(0.5, 30, 30)
    assert lo5 == pytest.approx(1 - hi5)  # symmetric about 0.5
    # with many cases it approaches the Hanley-McNeil Wald interval
    a, m = 0.75, 400
    q1, q2 = a / (2 - a), 2 * a**2 / (1 + a)
    se = np.sqrt((a * (1 - a) + (m - 1) * (q1 - a**2) + (m - 1) * (q2 - a**2)) / m**2)
    assert iv.newcombe_auc(a, m, m) == pytest.approx((a - 1.96 * se, a + 1.96 * se), abs=0.005)


def test_a_perfect_test_split_gets_score_intervals_not_a_point():
    y = np.array([0] * 10 + [1] * 10)
    s = np.linspace(0, 1, 20)  # perfectly separated at 0.5
    groups = [f"p{i}" for i in range(20)]
    assert binary_summary(y, s, 0.5)["auc"] == 1.0
    ci, method = binary_intervals(y, s, 0.5, groups, metrics=["auc", "accuracy", "recall", "f1"], n=300)
    assert ci["auc"][1] == 1.0 and ci["auc"][0] < 0.95 and method["auc"] == iv.NEWCOMBE
    assert ci["accuracy"] == pytest.approx(list(iv.wilson(20, 20))) and method["accuracy"] == iv.WILSON
    assert ci["recall"] == pytest.approx(list(iv.wilson(10, 10)))  # recall counts the positive patients
    assert 0.6 < ci["f1"][0] < ci["recall"][0] + 1e-9
    # the same twenty cases as four patients of five series: fewer independent cases, wider
    four, _ = binary_intervals(y, s, 0.5, np.repeat(["a", "b", "c", "d"], 5), metrics=["accuracy"], n=300)
    assert four["accuracy"][0] < ci["accuracy"][0] - 0.2


def test_an_imperfect_metric_gets_a_bca_interval_around_it():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 80)
    s = np.clip(0.3 * y + rng.normal(0.35, 0.2, 80), 0, 1)
    ci, method = binary_intervals(y, s, 0.5, np.arange(80), metrics=["auc", "accuracy"], n=500, seed=2)
    point = binary_summary(y, s, 0.5)
    for name in ("auc", "accuracy"):
        assert ci[name][0] < point[name] < ci[name][1] and method[name] == iv.BCA


def test_one_patient_with_five_series_counts_once():
    """Twenty patients; p1 has five series, all misread. Resampled as series, its five errors look like
    five independent ones; resampled as a patient, they come and go together."""
    n = 20
    y = np.r_[np.arange(n) % 2, [1] * 4]
    base = np.where(np.arange(n) % 2, 0.7, 0.3) + np.linspace(-0.15, 0.15, n)
    base[1] = 0.2  # p1 is positive and scored as negative
    s = np.r_[base, [0.2] * 4]
    groups = np.r_[[f"p{i}" for i in range(n)], ["p1"] * 4]
    by_patient, _ = binary_intervals(y, s, 0.5, groups, metrics=["auc", "accuracy"], n=2000, seed=0)
    by_series, _ = binary_intervals(y, s, 0.5, np.arange(len(y)), metrics=["auc", "accuracy"], n=2000, seed=0)
    for name in ("auc", "accuracy"):
        assert np.diff(by_patient[name])[0] > 1.3 * np.diff(by_series[name])[0], name
