"""Calibration: do a model's probabilities mean what they say?

A model can rank cases well (high AUC) and still say 0.9 where one case in two is positive.
``calibration_summary`` measures it: the Brier score (mean squared error of the probability,
scikit-learn's ``brier_score_loss``), the expected calibration error over equal-width bins
(the gap between mean probability and observed frequency, weighted by the bin's share of
cases) and the reliability curve behind it. For K classes the Brier score is the mean over
cases of the squared distance to the one-hot label, and the ECE is the top-label one (the
confidence of the most probable class against how often it is right).

``fit_calibrator`` fits a map on the validation split (``platt``: logistic regression on
the logit, two classes; ``temperature``: one temperature dividing the logits, any K, which
keeps the ranking and so the AUC), ``apply_calibrator`` applies it to any scores.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-7


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _as_proba(y, p) -> tuple[np.ndarray, np.ndarray]:
    """Labels (N,) and class probabilities (N, K) from binary scores (N,) or probabilities (N, K)."""
    p = np.asarray(p, dtype=float)
    if p.ndim == 1:
        p = np.stack([1 - p, p], axis=1)
    return np.asarray(y).astype(int), p


def expected_calibration_error(y, p, *, bins: int = 10) -> tuple[float, list[dict]]:
    """Top-label ECE over ``bins`` equal-width confidence bins, and the bins (for the diagram).

    For two classes given as the positive score, the bins are over that score and the
    observed frequency is the positive rate (the usual reliability diagram).

    >>> ece, table = expected_calibration_error([0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9], bins=5)
    >>> round(ece, 3), [(r["n"], round(r["mean_p"], 2), r["observed"]) for r in table]
    (0.1, [(2, 0.1, 0.0), (2, 0.9, 1.0)])
    """
    y = np.asarray(y).astype(int)
    p = np.asarray(p, dtype=float)
    if p.ndim == 1:
        conf, hit = p, (y == 1).astype(float)
    else:
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(float)
    if len(y) == 0:
        return float("nan"), []
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        if n == 0:
            continue
        mean_p, observed = float(conf[members].mean()), float(hit[members].mean())
        ece += n / len(y) * abs(mean_p - observed)
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": n, "mean_p": mean_p,
                      "observed": observed})
    return float(ece), table


def brier(y, p) -> float:
    """Brier score: binary scores with scikit-learn; K classes, the squared distance to the one-hot label.

    >>> brier([0, 1], [0.0, 1.0]), brier([0, 1], [0.5, 0.5])
    (0.0, 0.25)
    """
    p = np.asarray(p, dtype=float)
    if len(p) == 0:
        return float("nan")
    if p.ndim == 1:
        from sklearn.metrics import brier_score_loss

        return float(brier_score_loss(np.asarray(y).astype(int), p, pos_label=1))
    onehot = np.eye(p.shape[1])[np.asarray(y).astype(int)]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_summary(y, p, *, bins: int = 10) -> dict:
    """Brier score, ECE and the reliability bins of scores ``p`` (N,) or probabilities (N, K)."""
    ece, table = expected_calibration_error(y, p, bins=bins)
    return {"brier": brier(y, p), "ece": ece, "bins": table, "n": int(len(np.asarray(y)))}


def fit_calibrator(method: str, y_val, p_val) -> dict:
    """A calibration map fitted on validation labels and scores (N,) or probabilities (N, K).

    >>> c = fit_calibrator("temperature", [0, 1, 0, 1, 0, 1], [0.02, 0.98, 0.95, 0.05, 0.1, 0.9])
    >>> c["method"], c["temperature"] > 1.0  # confident mistakes: a temperature above 1 softens the scores
    ('temperature', True)
    """
    y = np.asarray(y_val).astype(int)
    p = np.asarray(p_val, dtype=float)
    if method == "platt":
        if p.ndim != 1:
            raise ValueError("platt scaling is for two classes; use evaluate.calibrate: temperature for K classes")
        if len(np.unique(y)) < 2:
            raise ValueError("the validation split holds one class only: no calibration map can be fitted")
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=1e4, max_iter=1000).fit(_logit(p)[:, None], y)
        return {"method": "platt", "a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}
    if method == "temperature":
        from scipy.optimize import minimize_scalar

        y1, proba = _as_proba(y, p)
        logits = np.log(np.clip(proba, EPS, 1.0))

        def nll(log_t: float) -> float:
            z = logits / np.exp(log_t)
            z = z - z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            return float(-logp[np.arange(len(y1)), y1].mean())

        best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
        return {"method": "temperature", "temperature": float(np.exp(best.x))}
    raise ValueError(f"Received calibrate={method!r}; expected platt or temperature")


def apply_calibrator(calibrator: dict | None, p) -> np.ndarray:
    """Scores (N,) or probabilities (N, K) through a map from ``fit_calibrator`` (None: unchanged).

    >>> apply_calibrator({"method": "platt", "a": 1.0, "b": 0.0}, [0.2, 0.7]).round(3).tolist()
    [0.2, 0.7]
    """
    p = np.asarray(p, dtype=float)
    if not calibrator:
        return p
    if calibrator["method"] == "platt":
        return 1.0 / (1.0 + np.exp(-(calibrator["a"] * _logit(p) + calibrator["b"])))
    t = calibrator["temperature"]
    if p.ndim == 1:
        return 1.0 / (1.0 + np.exp(-_logit(p) / t))
    z = np.log(np.clip(p, EPS, 1.0)) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
