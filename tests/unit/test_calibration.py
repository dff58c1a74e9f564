"""Calibration measures and maps (medflow.calibration) against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from medflow.calibration import apply_calibrator, brier, calibration_summary, expected_calibration_error, fit_calibrator


def _overconfident(n: int, seed: int):
    """True probabilities q, and scores pushed towards 0 and 1 (logit x 3): a ranking model that overclaims."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.05, 0.95, n)
    y = (rng.uniform(size=n) < q).astype(int)
    logit = np.log(q / (1 - q)) * 3.0
    return y, 1 / (1 + np.exp(-logit))


def test_reliability_bins_match_scikit_learn():
    y, p = _overconfident(2000, 0)
    _, table = expected_calibration_error(y, p, bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert np.allclose([r["observed"] for r in table], prob_true)
    assert np.allclose([r["mean_p"] for r in table], prob_pred)


def test_ece_of_calibrated_scores_is_small_and_of_overconfident_ones_large():
    rng = np.random.default_rng(1)
    q = rng.uniform(size=20000)
    y = (rng.uniform(size=q.size) < q).astype(int)
    assert expected_calibration_error(y, q)[0] < 0.02
    y2, p2 = _overconfident(20000, 2)
    assert expected_calibration_error(y2, p2)[0] > 0.1


@pytest.mark.parametrize("method", ["platt", "temperature"])
def test_maps_fitted_on_validation_improve_test_calibration_and_keep_the_ranking(method):
    y_val, p_val = _overconfident(3000, 3)
    y_test, p_test = _overconfident(3000, 4)
    cal = fit_calibrator(method, y_val, p_val)
    after = apply_calibrator(cal, p_test)
    before_s, after_s = calibration_summary(y_test, p_test), calibration_summary(y_test, after)
    assert after_s["ece"] < before_s["ece"] / 2
    assert after_s["brier"] < before_s["brier"]
    assert roc_auc_score(y_test, after) == pytest.approx(roc_auc_score(y_test, p_test))
    if method == "temperature":
        assert cal["temperature"] == pytest.approx(3.0, rel=0.15)  # undoes the logit x 3


def test_temperature_for_k_classes_and_multiclass_brier():
    rng = np.random.default_rng(5)
    true_logits = rng.normal(size=(4000, 3)) * 1.5
    q = np.exp(true_logits) / np.exp(true_logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in q])
    sharp = np.exp(true_logits * 2.5)
    sharp /= sharp.sum(axis=1, keepdims=True)
    cal = fit_calibrator("temperature", y[:2000], sharp[:2000])
    assert cal["temperature"] == pytest.approx(2.5, rel=0.15)
    after = apply_calibrator(cal, sharp[2000:])
    assert np.allclose(after.sum(axis=1), 1.0) and (after.argmax(1) == sharp[2000:].argmax(1)).all()
    assert brier(y[2000:], after) < brier(y[2000:], sharp[2000:])
    onehot = np.eye(3)[y[2000:]]
    assert brier(y[2000:], after) == pytest.approx(np.mean(((after - onehot) ** 2).sum(1)))


def test_platt_refuses_k_classes_and_one_class():
    with pytest.raises(ValueError, match="two classes"):
        fit_calibrator("platt", [0, 1, 2], np.eye(3))
    with pytest.raises(ValueError, match="one class"):
        fit_calibrator("platt", [1, 1, 1], [0.2, 0.5, 0.9])
