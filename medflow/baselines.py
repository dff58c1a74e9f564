"""Declared simple baselines, fitted on the train split and scored on the same test split as the model.

A report that shows a model's AUC without a baseline cannot tell a model that learnt the
finding from a cohort that a single number separates. The classification baseline is a
logistic regression on one feature: the mean intensity of the model-ready array.
"""

from __future__ import annotations

import numpy as np

CLASSIFICATION_BASELINE = "logistic regression on the mean intensity of the model-ready image"


def mean_intensity(image: np.ndarray) -> float:
    """The baseline's one feature.

    >>> mean_intensity(np.array([[0.0, 1.0], [1.0, 0.0]]))
    0.5
    """
    return float(np.mean(image, dtype=np.float64))


def one_feature_logistic(x_train, y_train, x_test, n_classes: int) -> np.ndarray:
    """Class probabilities (N, K) on ``x_test`` from a logistic regression fitted on ``(x_train, y_train)``.

    Features are standardised first; a class missing from the train split gets probability 0.

    >>> p = one_feature_logistic([0.0, 0.1, 0.9, 1.0], [0, 0, 1, 1], [0.05, 0.95], 2)
    >>> p.shape, bool(p[0, 0] > 0.5 and p[1, 1] > 0.5)
    ((2, 2), True)
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    xt = np.asarray(x_train, dtype=float).reshape(len(x_train), -1)
    yt = np.asarray(y_train).astype(int)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(xt, yt)
    proba = model.predict_proba(np.asarray(x_test, dtype=float).reshape(len(x_test), -1))
    out = np.zeros((len(proba), n_classes))
    out[:, model.classes_] = proba
    return out
