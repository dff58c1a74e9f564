"""Strong classical baselines, declared in ``evaluate.baselines``: what a careful analyst without deep learning
would fit, so that "the model beats its baseline" means something.

- ``radiomics`` (images and volumes): first-order intensity statistics, grey-level co-occurrence texture
  (scikit-image's ``graycomatrix``/``graycoprops``), multi-scale blob responses (scale-normalised Laplacian of
  Gaussian, SciPy) and the size of the brightest connected region, with a random forest.
- ``hog`` (2D images): histograms of oriented gradients (scikit-image's ``hog``) with a logistic regression.
- ``ecg_features`` (waveforms): the textbook rhythm features of lead II: heart rate, RR irregularity, QRS width
  and a P-wave measure, with a logistic regression.

Each is fitted on the cases outside the test split only, its hyper-parameters chosen by cross-validation
grouped by patient (scikit-learn's ``GridSearchCV`` with ``StratifiedGroupKFold``), and scored on the same test cases as
the model.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

DESCRIPTIONS = {
    "radiomics": "random forest (100 trees) on 25 radiomics-style features (first-order intensity, GLCM texture, blob "
                 "responses at 3 scales, brightest region)",
    "hog": "logistic regression on HOG (histograms of oriented gradients) of the image at 64 x 64",
    "ecg_features": "logistic regression on heart rate, RR irregularity, QRS width and P-wave energy of lead II",
}
#: which baselines apply to images (``True``) or waveforms (``False``), and to which dimensionalities
APPLIES = {"radiomics": (True, (2, 3)), "hog": (True, (2,)), "ecg_features": (False, (1,))}
CV_FOLDS = 5


def radiomics_features(array: np.ndarray) -> np.ndarray:
    """25 features of one prepared array ((D,) H, W[, 1]): 11 first-order, 5 GLCM, 6 blob, 3 bright-region.

    >>> rng = np.random.default_rng(0)
    >>> radiomics_features(rng.normal(size=(8, 16, 16, 1))).shape
    (25,)
    """
    from scipy import ndimage, stats
    from skimage.feature import graycomatrix, graycoprops

    a = _squeezed(array)
    flat = a.reshape(-1).astype(np.float64)
    lo, hi = np.percentile(flat, [1, 99.9])
    span = hi - lo if hi > lo else 1.0
    hist, _ = np.histogram(flat, bins=32, range=(lo, hi))
    p = hist / max(hist.sum(), 1)
    first = [flat.mean(), flat.std(), stats.skew(flat), stats.kurtosis(flat), *np.percentile(flat, [10, 50, 90, 99]),
             flat.max(), -(p[p > 0] * np.log2(p[p > 0])).sum(), (p**2).sum()]
    # texture: GLCM of 16 grey levels, 4 directions, over the planes (every plane of a volume, at most 16)
    levels = np.clip(((a - lo) / span * 15).round(), 0, 15).astype(np.uint8)
    planes = [levels] if levels.ndim == 2 else list(levels[:: max(1, len(levels) // 16)])
    glcm = np.zeros(5)
    for plane in planes:
        m = graycomatrix(plane, distances=[1], angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=16,
                         symmetric=True, normed=True)
        glcm += [graycoprops(m, prop).mean() for prop in ("contrast", "dissimilarity", "homogeneity", "energy",
                                                          "correlation")]
    glcm = np.nan_to_num(glcm / len(planes))
    # blobs: the scale-normalised Laplacian of Gaussian (bright blobs of radius ~ sigma*sqrt(dim) answer most)
    scaled = (a - lo) / span
    blobs = []
    for sigma in (1.0, 2.0, 4.0):
        response = -(sigma**2) * ndimage.gaussian_laplace(scaled, sigma)
        blobs += [float(response.max()), float(np.percentile(response, 99.5))]
    # the brightest region: voxels above mean + 2 SD, its largest connected part
    bright = a > flat.mean() + 2 * flat.std()
    labels, n = ndimage.label(bright)
    sizes = ndimage.sum(bright, labels, index=np.arange(1, n + 1)) if n else np.zeros(1)
    region = [bright.mean(), float(sizes.max()) / bright.size, float(n)]
    return np.asarray([*first, *glcm, *blobs, *region], dtype=np.float64)


def _squeezed(array) -> np.ndarray:
    """An image (H, W) or a volume (D, H, W) without axes of length 1 (a channel, or a 2D image's leading 1).

    >>> _squeezed(np.zeros((1, 5, 6))).shape, _squeezed(np.zeros((4, 5, 6, 1))).shape
    ((5, 6), (4, 5, 6))
    """
    a = np.asarray(array, dtype=np.float32)
    return a.reshape([n for n in a.shape if n != 1]) if a.ndim > 2 else a


def hog_features(array: np.ndarray) -> np.ndarray:
    """HOG of a 2D prepared image resized to 64 x 64 (9 orientations, 8-pixel cells, 2 x 2 blocks): 1764 values.

    >>> hog_features(np.random.default_rng(0).normal(size=(100, 120, 1))).shape
    (1764,)
    """
    from skimage.feature import hog
    from skimage.transform import resize

    a = _squeezed(array)
    if a.ndim != 2:
        raise ValueError(f"hog describes 2D images; received an array of shape {np.shape(array)}")
    small = resize(a, (64, 64), anti_aliasing=True, preserve_range=True)
    return hog(small, orientations=9, pixels_per_cell=(8, 8), cells_per_block=(2, 2), feature_vector=True)


def ecg_features(trace: np.ndarray, rate: float) -> np.ndarray:
    """Heart rate (bpm), RR irregularity (SD of successive RR differences over the mean RR), QRS width (ms, the
    R peaks' width at half prominence) and P-wave energy (the signal's mean square 120-250 ms before each R
    over that of the whole beat) of one lead.

    >>> t = np.arange(5000) / 500.0
    >>> f = ecg_features(np.exp(-0.5 * ((t % 1.0 - 0.5) / 0.01) ** 2), 500.0)
    >>> round(f[0]), float(round(f[1], 3))
    (60, 0.0)
    """
    import scipy.signal as sps

    from medflow.signals import r_peaks

    x, peaks = r_peaks(trace, rate, prominence=0.3)
    if len(peaks) < 3:
        return np.array([0.0, 0.0, 0.0, 0.0])
    rr = np.diff(peaks) / rate
    widths = sps.peak_widths(x, peaks, rel_height=0.5)[0] / rate * 1000.0
    before = [x[max(0, p - int(0.25 * rate)):max(1, p - int(0.12 * rate))] for p in peaks]
    p_energy = np.mean([np.mean(b**2) for b in before if len(b)]) / max(np.mean(x**2), 1e-12)
    return np.array([60.0 / np.median(rr), np.std(np.diff(rr)) / np.mean(rr), float(np.median(widths)), p_energy])


def fit_and_score(name: str, features: np.ndarray, labels: np.ndarray, patients: np.ndarray, test: np.ndarray,
                  n_classes: int, seed: int) -> np.ndarray:
    """Class probabilities of the test rows from the baseline ``name`` fitted on the other rows, its settings
    chosen by grouped cross-validation (folds by patient) on those rows."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    import warnings

    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = np.nan_to_num(np.asarray(features, float)), np.asarray(labels).astype(int)
    train = ~test
    if name == "radiomics":
        model = RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1, class_weight="balanced")
        grid = {"min_samples_leaf": [1, 5], "max_features": ["sqrt", 0.5]}
    else:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        grid = {"logisticregression__C": [0.01, 0.1, 1.0, 10.0]}
    groups = np.asarray(patients)[train]
    folds = min(CV_FOLDS, len(np.unique(groups)), int(np.bincount(y[train]).min()) if train.any() else 0)
    scoring = "roc_auc" if n_classes == 2 else "roc_auc_ovr"
    if folds >= 2:
        cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)  # every class in every fold
        search = GridSearchCV(model, grid, cv=cv, scoring=scoring, error_score=np.nan)
        with warnings.catch_warnings():  # a fold of a tiny cohort can still lack a class: its score is NaN
            warnings.simplefilter("ignore")
            search.fit(x[train], y[train], groups=groups)
        fitted = search.best_estimator_
    else:
        fitted = model.fit(x[train], y[train])
    proba = fitted.predict_proba(x[test])
    out = np.zeros((len(proba), n_classes))
    out[:, fitted.classes_] = proba
    return out


def paired_difference(y: np.ndarray, model: np.ndarray, base: np.ndarray, patients: np.ndarray, classes: list[str],
                      *, n_boot: int, seed: int) -> dict:
    """The model's AUC minus the baseline's on the same test cases: DeLong's paired test for two classes, a paired
    bootstrap of the macro AUCs over patients for more."""
    import pandas as pd

    from medflow.compare import _paired_bootstrap_macro_auc, delong_test

    if len(classes) == 2:
        try:
            r = delong_test(y, model[:, 1], base[:, 1])
        except ValueError as exc:
            return {"difference": float("nan"), "ci": None, "p_value": float("nan"), "method": str(exc)}
        return {"difference": r["difference"], "ci": r["ci"], "p_value": r["p_value"], "method": "DeLong's paired test"}
    frame = pd.DataFrame({"label_a": y, "patient_key": patients,
                          **{f"p_{c}_a": model[:, k] for k, c in enumerate(classes)},
                          **{f"p_{c}_b": base[:, k] for k, c in enumerate(classes)}})
    try:
        r = _paired_bootstrap_macro_auc(frame, [f"p_{c}" for c in classes], n_boot=max(n_boot, 200), seed=seed)
    except ValueError as exc:
        return {"difference": float("nan"), "ci": None, "p_value": float("nan"), "method": str(exc)}
    return {"difference": r["difference"], "ci": r["ci"], "p_value": r["p_value"], "method": r["method"]}
