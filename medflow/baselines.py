"""Declared simple baselines, fitted outside the test split and scored on the same test split as the model.

A report that shows a model's AUC without a baseline cannot tell a model that learnt the
finding from a cohort that a few numbers separate. The image baseline is a logistic
regression on four intensity features of the model-ready array: its mean, standard
deviation, 99th percentile and maximum (after a lung mask, the maximum is the brightest
voxel inside the lungs: what a one-line threshold rule would use).
"""

from __future__ import annotations

import numpy as np

CLASSIFICATION_BASELINE = ("logistic regression on four intensity features of the model-ready image (mean, SD, "
                           "99th percentile, maximum)")
FEATURES = ("mean", "sd", "p99", "max")


def intensity_features(image: np.ndarray) -> np.ndarray:
    """The baseline's features of one array: mean, SD, 99th percentile, maximum.

    >>> intensity_features(np.array([[0.0, 1.0], [1.0, 0.0]])).round(2).tolist()
    [0.5, 0.5, 1.0, 1.0]
    """
    a = np.asarray(image, dtype=np.float32).reshape(-1)
    return np.array([a.mean(dtype=np.float64), a.std(dtype=np.float64), np.percentile(a, 99), a.max()])


def feature_logistic(x_train, y_train, x_test, n_classes: int) -> np.ndarray:
    """Class probabilities (N, K) on ``x_test`` from a logistic regression fitted on ``(x_train, y_train)``.

    ``x`` holds one feature per case (N,) or several (N, F). Features are standardised first; a
    class missing from the train split gets probability 0.

    >>> p = feature_logistic([0.0, 0.1, 0.9, 1.0], [0, 0, 1, 1], [0.05, 0.95], 2)
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


SEGMENTATION_BASELINE = ("intensity threshold inside the lung fields, largest connected component (the threshold "
                         "chosen on the train split)")
THRESHOLDS_HU = tuple(range(-700, 101, 100))


def threshold_component(image: np.ndarray, spacing, threshold: float) -> np.ndarray:
    """The rule's mask: voxels above ``threshold`` inside the lung fields (``lung_mask``; the whole image
    when it finds none), largest 3D connected component only.

    >>> img = np.full((8, 16, 16), -1000.0); img[2:6, 4:12, 4:12] = -850; img[3:5, 6:9, 6:9] = 40
    >>> int(threshold_component(img, (1, 1, 1), -400).sum())
    18
    """
    from scipy import ndimage

    from medflow.preprocessing import lung_mask

    fill = float(np.min(image)) - 1.0
    lungs, _ = lung_mask(np.asarray(image, dtype=np.float32), spacing, fill=fill)
    region = lungs > fill if (lungs > fill).any() else np.ones(image.shape, bool)
    above = (np.asarray(image) > threshold) & region
    labels, n = ndimage.label(above)
    if n == 0:
        return above
    sizes = ndimage.sum(above, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def fit_threshold(cases: list[tuple[np.ndarray, np.ndarray, tuple]], candidates=THRESHOLDS_HU) -> float:
    """The candidate threshold with the best mean Dice over ``(image, truth, spacing)`` training cases."""
    def dice(a, b):
        total = int(a.sum()) + int(b.sum())
        return 2.0 * int((a & b).sum()) / total if total else 1.0

    scores = [np.mean([dice(threshold_component(img, sp, t), truth) for img, truth, sp in cases]) for t in candidates]
    return float(candidates[int(np.argmax(scores))])
