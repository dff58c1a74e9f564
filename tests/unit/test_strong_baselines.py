"""The strong classical baselines of `evaluate.baselines`: their features carry what they claim, they are fitted
outside the test split, and the spec refuses one that does not apply."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.strong_baselines import ecg_features, fit_and_score, paired_difference, radiomics_features


def _volume(rng, blob: bool) -> np.ndarray:
    v = rng.normal(0.2, 0.05, size=(16, 24, 24))
    if blob:
        z, y, x = np.ogrid[:16, :24, :24]
        v += 0.6 * np.exp(-((z - 8) ** 2 + (y - rng.integers(8, 16)) ** 2 + (x - 12) ** 2) / (2 * 2.0**2))
    return v[..., None]


def test_radiomics_features_separate_volumes_with_a_blob_and_the_fit_never_sees_test_labels():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 30)
    x = np.array([radiomics_features(_volume(rng, bool(label))) for label in y])
    test = np.zeros(60, bool)
    test[::4] = True
    proba = fit_and_score("radiomics", x, y, np.arange(60), test, 2, seed=0)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[test], proba[:, 1]) > 0.9
    flipped = y.copy()
    flipped[test] = 1 - flipped[test]  # other labels on the test rows: the same fit, the same scores
    assert np.array_equal(fit_and_score("radiomics", x, flipped, np.arange(60), test, 2, seed=0), proba)


def test_ecg_features_measure_rate_irregularity_and_qrs_width():
    rate = 100.0
    t = np.arange(1000) / rate

    def beats(times, width_s):
        return sum(np.exp(-0.5 * ((t - b) / width_s) ** 2) for b in times)

    regular = ecg_features(beats(np.arange(0.5, 10, 1.0), 0.02), rate)
    irregular = ecg_features(beats(np.cumsum(np.random.default_rng(1).uniform(0.5, 1.3, 12)), 0.02), rate)
    wide = ecg_features(beats(np.arange(0.5, 10, 1.0), 0.05), rate)
    assert regular[0] == pytest.approx(60, abs=1) and regular[1] < 0.01
    assert irregular[1] > 0.1
    assert wide[2] > 1.8 * regular[2]  # QRS width in ms


def test_the_paired_difference_of_a_better_model_excludes_zero():
    rng = np.random.default_rng(2)
    y = np.repeat([0, 1], 60)
    good = np.clip(0.5 + 0.35 * (y - 0.5) * 2 + rng.normal(0, 0.15, 120), 0, 1)
    weak = np.clip(0.5 + 0.05 * (y - 0.5) * 2 + rng.normal(0, 0.15, 120), 0, 1)
    two = lambda s: np.column_stack([1 - s, s])  # noqa: E731
    r = paired_difference(y, two(good), two(weak), np.arange(120), ["0", "1"], n_boot=200, seed=0)
    assert r["difference"] > 0.2 and r["ci"][0] > 0 and r["method"] == "DeLong's paired test"


@pytest.mark.parametrize("change, fragment", [
    ({"evaluate.baselines": ["hog"]}, "evaluate.baselines: hog describes 2D images"),
    ({"evaluate.baselines": ["ecg_features"]}, "evaluate.baselines: ['ecg_features'] do not apply to classification"),
])
def test_a_baseline_that_does_not_apply_is_refused(change, fragment):
    from medflow.errors import SpecError
    from medflow.spec import parse_spec
    from tests.unit.test_spec import _override, _spec

    with pytest.raises(SpecError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(_override(_spec(), change), check_paths=False)


def test_a_perfect_baseline_gets_an_interval_not_a_point():
    """The ECG features separate the synthetic rhythms: their macro AUC of 1.000 printed 1.000 – 1.000."""
    from medflow.kinds.classification import macro_auc_interval

    y = np.repeat([0, 1, 2], 10)
    proba = np.eye(3)[y] * 0.9 + 0.03
    lo, hi = macro_auc_interval(y, proba, ["normal", "afib", "bbb"], 1.0, n=200, seed=0)
    assert 0.7 < lo < 1.0 and hi == pytest.approx(1.0)
