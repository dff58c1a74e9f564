"""Classification metrics (scikit-learn), threshold choice and bootstrap confidence intervals."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve


def choose_threshold(y_true, score, method: str | float = "youden") -> float:
    """Decision threshold from validation data.

    ``youden`` maximises sensitivity + specificity - 1; ``f1`` maximises F1; a number is used
    as it is. With a single class present, 0.5.

    >>> choose_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9])
    0.6
    """
    if not isinstance(method, str):
        return float(method)
    y, s = np.asarray(y_true), np.asarray(score, dtype=float)
    if len(np.unique(y)) < 2:
        return 0.5
    if method == "youden":
        fpr, tpr, thr = roc_curve(y, s)
        best = int(np.argmax(tpr - fpr))
        return float(min(thr[best], 1.0))
    if method == "f1":
        candidates = np.unique(s)
        scores = [f1_score(y, s >= t, zero_division=0) for t in candidates]
        return float(candidates[int(np.argmax(scores))])
    raise ValueError(f"Received threshold method {method!r}, expected 'youden', 'f1' or a number.")


def binary_metrics(y_true, score, threshold: float) -> dict:
    """Accuracy, precision, recall (sensitivity), specificity, F1, ROC AUC and the confusion matrix.

    >>> m = binary_metrics([0, 0, 1, 1], [0.1, 0.7, 0.6, 0.9], 0.5)
    >>> m["accuracy"], m["recall"], m["specificity"], m["auc"]
    (0.75, 1.0, 0.5, 0.75)
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=float)
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "n": int(len(y)),
        "threshold": float(threshold),
        "accuracy": ratio(tp + tn, len(y)),
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "auc": float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else float("nan"),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def bootstrap_ci(y_true, score, threshold: float, *, metrics: list[str], n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ``{metric: [low, high]}`` over resampled cases.

    Resamples with a single class are skipped for AUC.
    """
    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=float)
    if n <= 0 or len(y) < 2:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(n):
        idx = rng.integers(0, len(y), len(y))
        if len(np.unique(y[idx])) < 2:
            continue
        m = binary_metrics(y[idx], s[idx], threshold)
        for name in metrics:
            if not np.isnan(m[name]):
                samples[name].append(m[name])
    alpha = (1 - level) / 2
    return {
        name: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))]
        for name, v in samples.items()
        if v
    }
