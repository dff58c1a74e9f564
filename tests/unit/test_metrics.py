"""Metric values against hand computation, threshold choice and bootstrap intervals."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.metrics import binary_intervals, binary_metrics, choose_threshold

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
    patients = np.arange(60)
    ci, _ = binary_intervals(y, s, 0.5, patients, metrics=["auc", "accuracy"], n=300, seed=4)
    point = binary_metrics(y, s, 0.5)
    for name in ("auc", "accuracy"):
        lo, hi = ci[name]
        assert lo < point[name] < hi and hi - lo < 0.5
    assert ci == binary_intervals(y, s, 0.5, patients, metrics=["auc", "accuracy"], n=300, seed=4)[0]


@pytest.mark.parametrize("seed", range(6))
def test_the_bootstraps_numpy_summary_equals_the_scikit_learn_metrics(seed):
    """The bootstrap's fast path, on draws with tied scores, one class missing or no predicted positive."""
    from medflow.metrics import binary_summary

    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 30))
    y = rng.integers(0, 2, n) if seed else np.zeros(n, int)
    s = np.round(rng.random(n), 1)  # ties
    thr = 0.5 if seed % 3 else 2.0  # 2.0: nothing predicted positive
    fast, ref = binary_summary(y, s, thr), binary_metrics(y, s, thr)
    for name, value in fast.items():
        np.testing.assert_allclose(value, ref[name], rtol=1e-12, err_msg=name)  # NaN equals NaN


# ------------------------------------------------------------------ multi-class
def _three_class_predictions(seed=0, n=60, *, ties=False):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    if ties:  # whole-number logits: equal scores in several cases, as the rank AUC must handle
        logits = np.round(logits)
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, proba


def test_multiclass_metrics_equal_scikit_learns():
    from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score
    from sklearn.preprocessing import label_binarize

    from medflow.metrics import multiclass_metrics

    y, proba = _three_class_predictions(ties=True)
    assert len(np.unique(proba[:, 0])) < len(proba)
    pred = proba.argmax(axis=1)
    m = multiclass_metrics(y, proba, ["normal", "pneumonia", "effusion"])
    assert m["accuracy"] == pytest.approx(float((pred == y).mean()))
    assert m["auc"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert m["auc_micro"] == pytest.approx(roc_auc_score(label_binarize(y, classes=[0, 1, 2]), proba, average="micro"))
    assert m["precision"] == pytest.approx(precision_score(y, pred, average="macro"))
    assert m["recall"] == pytest.approx(recall_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["f1_micro"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    per_f1 = f1_score(y, pred, average=None)
    for k, row in enumerate(m["per_class"]):
        assert row["f1"] == pytest.approx(per_f1[k])
        assert row["auc"] == pytest.approx(roc_auc_score(y == k, proba[:, k]))
        assert row["support"] == int((y == k).sum())
        cm = confusion_matrix(y == k, pred == k)
        assert row["specificity"] == pytest.approx(cm[0, 0] / cm[0].sum())


def test_multiclass_intervals_contain_the_estimate_and_narrow_with_more_cases():
    from medflow.metrics import multiclass_ci, multiclass_metrics

    names = ["a", "b", "c"]
    small_y, small_p = _three_class_predictions(seed=1, n=30)
    big_y, big_p = _three_class_predictions(seed=1, n=600)
    small = multiclass_ci(small_y, small_p, names, metrics=["auc", "accuracy"], n=300, seed=0)
    big = multiclass_ci(big_y, big_p, names, metrics=["auc", "accuracy"], n=300, seed=0)
    estimate = multiclass_metrics(big_y, big_p, names)
    assert big["auc"][0] <= estimate["auc"] <= big["auc"][1]
    assert big["auc"][1] - big["auc"][0] < small["auc"][1] - small["auc"][0]


def test_one_feature_baseline_is_at_chance_on_a_feature_without_signal():
    from sklearn.metrics import roc_auc_score

    from medflow.baselines import feature_logistic

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=600), np.arange(600) % 3
    proba = feature_logistic(x[:400], y[:400], x[400:], 3)
    assert proba.shape == (200, 3) and np.allclose(proba.sum(axis=1), 1)
    assert roc_auc_score(y[400:], proba, multi_class="ovr") < 0.6
    informative = feature_logistic(y[:400] + 0.1 * x[:400], y[:400], y[400:] + 0.1 * x[400:], 3)
    assert roc_auc_score(y[400:], informative, multi_class="ovr") > 0.95


def test_a_confident_multiclass_model_is_not_said_to_have_learnt_nothing():
    """The ECG demo scored macro AUC 1.000 and its report opened with "the model has probably learnt nothing":
    the check looked at the top class's probability, near 1 for any confident model."""
    import pandas as pd

    from medflow.metrics import classification_warnings

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    confident = np.full((60, 3), 0.001)
    confident[np.arange(60), labels] = 0.998
    rows = {"split": ["test"] * 60, "patient_key": [f"p{i}" for i in range(60)], "label": labels}
    good = pd.DataFrame({**rows, **{f"p_{c}": confident[:, i] for i, c in enumerate("abc")}})
    assert not [w for w in classification_warnings(good, 3, 1.0) if "barely vary" in w]
    same = np.tile([0.5, 0.3, 0.2], (60, 1)) + rng.normal(0, 0.001, (60, 3))  # every case alike
    flat = pd.DataFrame({**rows, **{f"p_{c}": same[:, i] for i, c in enumerate("abc")}})
    assert [w for w in classification_warnings(flat, 3, 0.5) if "barely vary" in w]


def test_a_perfect_multiclass_test_split_gets_intervals_that_are_not_a_point():
    """The ECG demo printed every interval as 1.000 – 1.000: a bootstrap of a perfect classifier never moves."""
    import pandas as pd

    from medflow.kinds.classification import _multiclass_evaluation

    y = np.repeat([0, 1, 2], 12)
    proba = np.full((36, 3), 0.01)
    proba[np.arange(36), y] = 0.98
    df = pd.DataFrame({"split": ["val", "test"] * 18, "label": y, "patient_key": [f"p{i}" for i in range(36)]})
    out = _multiclass_evaluation(df, proba, ["normal", "afib", "bbb"], metric_names=["auc", "accuracy", "recall",
                                 "precision", "specificity", "f1"], bootstrap=200, seed=0)
    for name in ("auc", "accuracy", "recall", "precision", "specificity", "f1", "auc_micro"):
        assert out["test"][name] == 1.0
        lo, hi = out["ci"][name]
        assert 0.5 < lo < 1.0 and hi == pytest.approx(1.0), (name, lo, hi)
        assert out["ci_method"][name].startswith("the classes' one-vs-rest")


def test_a_model_that_gives_every_case_one_class_gets_intervals_that_are_not_a_point():
    """Its macro specificity is (K-1)/K in every resample: the bootstrap printed 0.667 – 0.667."""
    import pandas as pd

    from medflow.kinds.classification import _multiclass_evaluation

    y = np.repeat([0, 1, 2], 12)
    proba = np.tile([0.6, 0.3, 0.1], (36, 1))
    df = pd.DataFrame({"split": ["val", "test"] * 18, "label": y, "patient_key": [f"p{i}" for i in range(36)]})
    out = _multiclass_evaluation(df, proba, ["normal", "afib", "bbb"], metric_names=["specificity", "recall"],
                                 bootstrap=200, seed=0)
    assert out["test"]["specificity"] == pytest.approx(2 / 3)
    lo, hi = out["ci"]["specificity"]
    assert lo < 2 / 3 < hi


def test_the_median_threshold_varies_less_across_validation_sets_than_youdens_single_maximum():
    """Validation sets of 30 patients drawn from one fixed score population (the demo's size): the threshold
    each set chooses, by Youden's single maximum and by the median over its resamples."""
    from medflow.metrics import stable_threshold

    rng = np.random.default_rng(7)
    population_y = np.repeat([0, 1], 5000)
    population_s = 1 / (1 + np.exp(-rng.normal(np.where(population_y == 1, 0.9, -0.9), 1.2)))  # AUC about 0.85
    single, median = [], []
    for _ in range(150):
        pick = rng.choice(len(population_y), 30, replace=False)
        y, s = population_y[pick], population_s[pick]
        if 0 < y.sum() < 30:
            t = stable_threshold(y, s, n=100, seed=1)
            single.append(t["single"])
            median.append(t["threshold"])
    assert len(single) >= 140
    # measured over four populations: the median's SD is 0.84-0.92 of the single maximum's (bagging's share)
    assert np.std(median) < 0.95 * np.std(single), (np.std(median), np.std(single))


def test_operating_points_reach_their_target_on_validation():
    from medflow.metrics import operating_points

    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 100)
    s = 1 / (1 + np.exp(-rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)))
    points = {p["name"]: p for p in operating_points(y[::2], s[::2], y[1::2], s[1::2])}
    sens, spec = points["sensitivity 0.90 on validation"], points["specificity 0.90 on validation"]
    vy, vs = y[::2], s[::2]
    assert (vs[vy == 1] >= sens["threshold"]).mean() >= 0.9 and (vs[vy == 0] < spec["threshold"]).mean() >= 0.9
    assert spec["threshold"] > sens["threshold"]
    lo, hi = sens["sensitivity_ci"]
    assert lo < sens["sensitivity"] < hi


def test_a_run_whose_loss_sits_at_chance_is_warned_and_a_learning_run_is_not(tmp_path):
    """The seed program at Adam 1e-3 sat at ln 2 for epochs 2-4 (issue 25's measurement); a run that learns
    from the first epoch must get no such warning."""
    import pandas as pd

    from medflow.kinds.classification import _chance_warning
    from medflow.spec import parse_spec
    from tests.unit.test_spec import _override, _spec

    df = pd.DataFrame({"split": ["train"] * 8, "label": [0, 0, 0, 0, 0, 0, 1, 1]})
    stuck = [0.81, 0.6932, 0.6930, 0.6933, 0.6931, 0.62]
    learning = [0.81, 0.52, 0.41, 0.33, 0.30, 0.28]
    for losses, weight, expected in ((stuck, "balanced", "epochs 2–5 of 6"), (learning, "balanced", None),
                                     ([0.7, 0.5624, 0.5623, 0.5625, 0.4], "none", "epochs 2–4 of 5")):
        pd.DataFrame({"epoch": range(len(losses)), "loss": losses}).to_csv(tmp_path / "history.csv", index=False)
        spec = parse_spec(_override(_spec(), {"train.class_weight": weight}), check_paths=False)
        warning = _chance_warning(spec, tmp_path, df, 2)
        assert (warning is None) if expected is None else (expected in warning), (losses, warning)
