"""Classification metrics (scikit-learn), threshold choice and bootstrap confidence intervals."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score, roc_curve


def choose_threshold(y_true, score, method: str | float = "youden") -> float:
    """Decision threshold from validation data.

    ``youden`` maximises sensitivity + specificity - 1; ``youden_median`` is the median of that over
    bootstrap resamples of the cases (``stable_threshold``); ``f1`` maximises F1; a number is used
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
    if method == "youden_median":
        return stable_threshold(y, s)["threshold"]
    if method == "f1":
        candidates = np.unique(s)
        scores = [f1_score(y, s >= t, zero_division=0) for t in candidates]
        return float(candidates[int(np.argmax(scores))])
    raise ValueError(f"Received threshold method {method!r}, expected 'youden', 'youden_median', 'f1' or a number.")


THRESHOLD_RESAMPLES = 500


def stable_threshold(y_true, score, groups=None, *, n: int = THRESHOLD_RESAMPLES, seed: int = 0) -> dict:
    """Youden's threshold made robust to the few validation cases that decide a single maximum: the median of
    Youden's threshold over ``n`` bootstrap resamples of the validation cases (of their ``groups``, the patients,
    when given). Returns ``threshold`` (the median), ``range`` (2.5th and 97.5th percentiles of the resampled
    thresholds: how much one validation set can move it) and ``single`` (Youden's threshold on all cases).

    >>> rng = np.random.default_rng(0)
    >>> y = np.repeat([0, 1], 30); s = np.clip(rng.normal(0.35 + 0.3 * y, 0.15), 0, 1)
    >>> t = stable_threshold(y, s, n=200)
    >>> t["range"][0] <= t["threshold"] <= t["range"][1]
    True
    """
    y, s = np.asarray(y_true).astype(int), np.asarray(score, dtype=float)
    single = choose_threshold(y, s, "youden")
    groups = np.asarray(groups) if groups is not None else np.arange(len(y))
    members = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups.tolist())]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n if len(np.unique(y)) == 2 else 0):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if 0 < y[idx].sum() < len(idx):
            draws.append(choose_threshold(y[idx], s[idx], "youden"))
    if len(draws) < 20:
        return {"threshold": single, "range": None, "single": single, "resamples": len(draws)}
    return {"threshold": float(np.median(draws)), "range": [float(v) for v in np.percentile(draws, [2.5, 97.5])],
            "single": single, "resamples": len(draws)}


# clinically named operating points: the threshold that reaches the target on validation, then the test figures
OPERATING_TARGETS = (("sensitivity", 0.90), ("specificity", 0.90))


def operating_points(val_y, val_score, test_y, test_score, targets=OPERATING_TARGETS) -> list[dict]:
    """For each ``(metric, target)``: the threshold at which the validation cases reach ``target`` (the highest
    threshold with sensitivity at least the target, or the lowest with specificity at least the target), and the
    test sensitivity and specificity there with Wilson intervals.

    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1]); s = np.array([.1, .2, .3, .6, .4, .7, .8, .9])
    >>> [round(p["threshold"], 2) for p in operating_points(y, s, y, s, (("sensitivity", 1.0), ("specificity", 1.0)))]
    [0.4, 0.7]
    """
    from medflow.intervals import wilson

    vy, vs = np.asarray(val_y).astype(int), np.asarray(val_score, dtype=float)
    ty, ts = np.asarray(test_y).astype(int), np.asarray(test_score, dtype=float)
    out = []
    if len(np.unique(vy)) < 2:
        return out
    candidates = np.unique(vs)
    for metric, target in targets:
        if metric == "sensitivity":
            ok = [t for t in candidates if (vs[vy == 1] >= t).mean() >= target]
            thr = float(max(ok))
        else:
            ok = [t for t in candidates if (vs[vy == 0] < t).mean() >= target]
            thr = float(min(ok)) if ok else float(candidates.max() + 1e-9)
        tp, pos = int((ts[ty == 1] >= thr).sum()), int((ty == 1).sum())
        tn, neg = int((ts[ty == 0] < thr).sum()), int((ty == 0).sum())
        out.append({"name": f"{metric} {target:.2f} on validation", "threshold": thr,
                    "sensitivity": tp / pos if pos else float("nan"), "sensitivity_ci": list(wilson(tp, pos)),
                    "specificity": tn / neg if neg else float("nan"), "specificity_ci": list(wilson(tn, neg))})
    return out


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


def binary_summary(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """The numbers of ``binary_metrics`` with numpy alone (no confusion matrix, no input checks):
    the bootstrap calls it a thousand times, where scikit-learn's checks cost milliseconds a call.

    >>> binary_summary(np.array([0, 0, 1, 1]), np.array([0.1, 0.7, 0.6, 0.9]), 0.5)["specificity"]
    0.5
    """
    pred = score >= threshold
    pos = y == 1
    tp, fp = float(np.sum(pred & pos)), float(np.sum(pred & ~pos))
    fn, tn = float(np.sum(~pred & pos)), float(np.sum(~pred & ~pos))

    def ratio(a, b):
        return a / b if b else float("nan")

    return {"accuracy": ratio(tp + tn, len(y)), "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "f1": ratio(2 * tp, 2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "auc": rank_auc(pos, score)}


def binary_intervals(y_true, score, threshold: float, groups, *, metrics: list[str], n: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Intervals of the binary metrics, and the method that made each (``medflow.intervals``).

    Patients (``groups``, one per case) are resampled, BCa. A metric at a bound (0 or 1) gets
    a score interval instead, with its patients as the cases: Wilson for accuracy, recall,
    specificity and precision, Newcombe for the AUC, and for F1 the harmonic mean of precision's
    and recall's Wilson bounds. A metric the resamples never move off one value gets none.
    """
    from medflow import intervals as iv

    y = np.asarray(y_true).astype(int)
    s = np.asarray(score, dtype=float)
    g = np.asarray(groups)
    if n <= 0 or len(y) < 2:
        return {}, {}
    point = binary_summary(y, s, threshold)
    boot = iv.patient_bootstrap(lambda rows: binary_summary(y[rows], s[rows], threshold), g, metrics, n=n,
                                seed=seed, level=level)
    pred = s >= threshold

    def patients(mask) -> int:
        return len(np.unique(g[mask]))

    ci, method = {}, {}
    for name in metrics:
        value = point.get(name, float("nan"))
        if np.isnan(value):
            continue
        if value in (0.0, 1.0):
            interval, how = _at_bound(name, value, y, pred, patients, level), iv.NEWCOMBE if name == "auc" else iv.WILSON
        else:
            interval, how = boot.get(name), iv.BCA
        if interval is not None and not any(np.isnan(interval)):
            ci[name], method[name] = [float(interval[0]), float(interval[1])], how
    return ci, method


def _at_bound(name: str, value: float, y, pred, patients, level: float) -> tuple[float, float] | None:
    from medflow.intervals import newcombe_auc, wilson

    def proportion(mask) -> tuple[float, float]:
        n = patients(mask)
        return wilson(round(value * n), n, level)

    if name == "auc":
        return newcombe_auc(value, patients(y == 1), patients(y == 0), level)
    if name == "accuracy":
        return proportion(np.ones_like(y, bool))
    if name == "recall":
        return proportion(y == 1)
    if name == "specificity":
        return proportion(y == 0)
    if name == "precision":
        return proportion(pred)
    if name == "f1":  # 1 only with precision and recall both 1; 0 only with no true positive
        p = wilson(patients(pred) if value else 0, patients(pred), level)
        r = wilson(patients(y == 1) if value else 0, patients(y == 1), level)
        hm = [2 * a * b / (a + b) if a + b else 0.0 for a, b in zip(p, r)]
        return hm[0], hm[1]
    return None


def multiclass_bound_interval(name: str, value: float, y, pred, n_classes: int, level: float = 0.95,
                              proba=None) -> tuple[float, float] | None:
    """A 95% interval for a multi-class metric where a bootstrap collapses to a point (at 0 or 1, or a model that
    gives every case one class, whose macro specificity is (K-1)/K in every resample): the binary score intervals
    of each class (one vs rest: Wilson for proportions, Newcombe for the AUC, from ``proba`` when given, else
    ``value``), averaged as the macro metric averages the classes; accuracy gets Wilson's interval over all cases.

    >>> y = np.repeat([0, 1, 2], 10)
    >>> lo, hi = multiclass_bound_interval("auc", 1.0, y, y, 3)
    >>> round(lo, 3) < 1.0 == hi
    True
    >>> lo, hi = multiclass_bound_interval("specificity", 2 / 3, y, np.zeros(30), 3)
    >>> lo < 2 / 3 < hi
    True
    """
    from sklearn.metrics import roc_auc_score

    from medflow.intervals import newcombe_auc, wilson

    y, pred = np.asarray(y).astype(int), np.asarray(pred).astype(int)
    if name == "accuracy":
        return wilson(int((y == pred).sum()), len(y), level)
    if name == "auc_micro":  # one pooled one-vs-rest problem: each case once positive, K - 1 times negative
        return newcombe_auc(value, len(y), len(y) * (n_classes - 1), level)
    bounds = []
    for k in range(n_classes):
        pos, hit = y == k, pred == k
        if not pos.any() or pos.all():
            continue
        if name == "auc":
            auc_k = float(roc_auc_score(pos, np.asarray(proba)[:, k])) if proba is not None else value
            bounds.append(newcombe_auc(auc_k, int(pos.sum()), int((~pos).sum()), level))
        elif name in ("recall", "specificity", "precision"):
            right, cases = {"recall": (hit & pos, pos), "specificity": (~hit & ~pos, ~pos),
                            "precision": (hit & pos, hit)}[name]
            # a class never predicted has no precision to estimate (counted 0 in the macro value): anywhere in [0, 1]
            bounds.append(wilson(int(right.sum()), int(cases.sum()), level) if cases.any() else (0.0, 1.0))
        elif name == "f1":
            p = wilson(int((hit & pos).sum()), int(hit.sum()), level) if hit.any() else (0.0, 1.0)
            r = wilson(int((hit & pos).sum()), int(pos.sum()), level)
            bounds.append(tuple(2 * a * b / (a + b) if a + b else 0.0 for a, b in zip(p, r)))
    if not bounds:
        return None
    lo, hi = np.mean(bounds, axis=0)
    return float(lo), float(hi)


CHANCE_EPOCHS = 3  # this many epochs in a row with the training loss at chance level earn a warning


def chance_loss_warning(losses: list[float], n_classes: int, prior: list[float] | None = None,
                        class_weighted: bool = True) -> str | None:
    """A warning when the training loss sat at chance level for ``CHANCE_EPOCHS`` epochs in a row: the
    cross-entropy of a model that gives every case the same probabilities, ln K with balanced class weights
    (or balanced classes), the entropy of the class prior without weights. Within 1% counts as at chance.

    >>> chance_loss_warning([0.75, 0.6932, 0.6931, 0.6930, 0.45], 2).split(":")[0]
    'the training loss sat at chance level (0.693) for epochs 2–4 of 5'
    >>> chance_loss_warning([0.70, 0.60, 0.50, 0.40], 2) is None
    True
    """
    import math

    p = np.asarray(prior, float) if prior is not None and not class_weighted else np.full(n_classes, 1 / n_classes)
    chance = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    at = [abs(v - chance) <= 0.01 * chance if math.isfinite(v) else False for v in losses]
    run, best = 0, (0, 0)
    for i, flag in enumerate(at):
        run = run + 1 if flag else 0
        if run > best[1] - best[0]:
            best = (i - run + 1, i + 1)
    if best[1] - best[0] < CHANCE_EPOCHS:
        return None
    return (f"the training loss sat at chance level ({chance:.3f}) for epochs {best[0] + 1}–{best[1]} of "
            f"{len(losses)}: the network gave every case about the same output (a learning rate too high or too "
            "low, dead units, or labels unrelated to the images); lower the learning rate, add batch normalisation "
            "or train longer")


DEAD_UNITS = 0.5  # a hidden Dense layer with more than this share of units never active earns a warning


def dead_units_warning(activity: dict[str, dict]) -> str | None:
    """A warning when most units of a hidden Dense layer never fired on the validation cases
    (``models.training.dense_activity``): the layer's capacity is lost, often to a learning rate too high.

    >>> dead_units_warning({"dense": {"units": 512, "never_active": 332}}).split(";")[0]
    "332 of the 512 units of the dense layer 'dense' never fired on a validation case (65%)"
    >>> dead_units_warning({"dense": {"units": 512, "never_active": 30}}) is None
    True
    """
    dead = [(name, a) for name, a in activity.items() if a["units"] and a["never_active"] / a["units"] > DEAD_UNITS]
    if not dead:
        return None
    parts = [f"{a['never_active']} of the {a['units']} units of the dense layer {name!r} never fired on a validation "
             f"case ({a['never_active'] / a['units']:.0%})" for name, a in dead]
    return ("; ".join(parts) + "; dead ReLU units carry nothing: lower the learning rate or add batch "
            "normalisation before the layer")


MIN_TEST_PATIENTS = 30  # below this, a test split's intervals are too wide to rank models
MIN_SCORE_SPREAD = 0.05  # scores that span less than this barely depend on the image


def classification_warnings(df, n_classes: int, val_auc: float) -> list[str]:
    """What a reader must know before trusting a classifier's test figures: a small test split, a
    model not distinguishable from chance on validation, scores that barely vary. ``df``: one row per case
    with ``split``, ``patient_key``, ``label`` and ``score`` (binary) or ``p_<class>`` columns.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"split": ["val"] * 4 + ["test"] * 4, "patient_key": list("abcdefgh"),
    ...                    "label": [0, 1] * 4, "score": [.50, .51, .50, .51, .509, .51, .508, .511]})
    >>> [w.split(":")[0] for w in classification_warnings(df, 2, 1.0)]  # 4 validation patients prove nothing
    ['only 4 test patients', 'not distinguishable from chance on validation', 'the scores barely vary']
    """
    from medflow.intervals import newcombe_auc

    out = []
    test, val = df[df["split"] == "test"], df[df["split"] == "val"]
    n_test = test["patient_key"].nunique()
    if n_test < MIN_TEST_PATIENTS:
        out.append(f"only {n_test} test patients: the intervals are wide and a few cases decide the metrics; "
                   "test on more patients before comparing models")
    if n_classes == 2 and not np.isnan(val_auc):
        pos = val.loc[val["label"] == 1, "patient_key"].nunique()
        neg = val.loc[val["label"] == 0, "patient_key"].nunique()
        lo, hi = newcombe_auc(val_auc, pos, neg)
        if lo <= 0.5:
            out.append(f"not distinguishable from chance on validation: AUC {val_auc:.3f} (95% CI {lo:.3f} – "
                       f"{hi:.3f}) on {pos + neg} patients; the test figures may be luck")
    elif n_classes > 2 and not np.isnan(val_auc) and val_auc < 0.6:
        out.append(f"close to chance on validation: macro AUC {val_auc:.3f}; the test figures may be luck")
    if "score" in df:
        score = df["score"]
        spread = float(score.max() - score.min()) if len(score) else 0.0
        if spread < MIN_SCORE_SPREAD:
            out.append(f"the scores barely vary: every case scored between {score.min():.3f} and {score.max():.3f}; "
                       "the model has probably learnt nothing from the images (train longer, or check the labels)")
    else:  # a model that learnt nothing gives every case about the same probability of each class; the top
        # class's probability alone is near 1 for any confident model, right or wrong, so it says nothing
        probs = df[[c for c in df if c.startswith("p_")]]
        spread = float((probs.max() - probs.min()).max()) if len(probs) else 0.0
        if spread < MIN_SCORE_SPREAD:
            out.append(f"the scores barely vary: no class's probability varies by more than {spread:.3f} across "
                       "cases; the model has probably learnt nothing from the images (train longer, or check the "
                       "labels)")
    return out


# ------------------------------------------------------------------ multi-class
def multiclass_metrics(y_true, proba, class_names: list[str]) -> dict:
    """Metrics of a K-class classifier from its class probabilities (prediction: the most probable class).

    Macro averages (each class counts the same) under the binary metric names (``precision``,
    ``recall``, ``specificity``, ``f1``, ``auc``: one-vs-rest ROC AUC), micro averages with a
    ``_micro`` suffix, one row per class in ``per_class``, and the K x K confusion matrix
    (rows: truth, columns: prediction). A class absent from ``y_true`` has no AUC; the macro
    AUC then averages the others. The summary numbers are ``multiclass_summary``'s, the ones
    the bootstrap resamples.

    >>> m = multiclass_metrics([0, 1, 2, 2], [[.8, .1, .1], [.2, .7, .1], [.1, .2, .7], [.5, .1, .4]], ["a", "b", "c"])
    >>> m["accuracy"], m["confusion_matrix"][2], m["per_class"][2]["recall"]
    (0.75, [1, 0, 1], 0.5)
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(proba, dtype=float)
    labels = list(range(len(class_names)))
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=labels)
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    per_class = []
    for c in labels:
        fp = cm[:, c].sum() - cm[c, c]
        tn = cm.sum() - cm[c, :].sum() - fp
        per_class.append({
            "class": class_names[c], "support": int(support[c]), "precision": float(prec[c]), "recall": float(rec[c]),
            "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"), "f1": float(f1[c]),
            "auc": rank_auc(y == c, p[:, c]),
        })
    micro_p, micro_r, micro_f1, _ = precision_recall_fscore_support(y, pred, labels=labels, average="micro",
                                                                     zero_division=0)
    return {
        "n": int(len(y)),
        **multiclass_summary(y, p),
        "precision_micro": float(micro_p), "recall_micro": float(micro_r), "f1_micro": float(micro_f1),
        "per_class": per_class,
        "classes": list(class_names),
        "confusion_matrix": cm.tolist(),
    }


def bootstrap_intervals(score_fn: Callable[[np.ndarray], dict], n_cases: int, *, metrics: list[str], n: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ``{metric: [low, high]}`` of ``score_fn(case indices)`` over
    resampled cases; NaN values of a resample are left out."""
    if n <= 0 or n_cases < 2:
        return {}
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {m: [] for m in metrics}
    for _ in range(n):
        values = score_fn(rng.integers(0, n_cases, n_cases))
        for name in metrics:
            v = values.get(name, float("nan"))
            if not np.isnan(v):
                samples[name].append(v)
    alpha = (1 - level) / 2
    return {name: [float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))] for name, v in samples.items() if v}


def rank_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC from ranks (the Mann-Whitney U statistic, ties averaged), as ``roc_auc_score``; NaN
    when one class is absent.

    >>> rank_auc(np.array([0, 0, 1, 1], bool), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    from scipy.stats import rankdata

    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multiclass_summary(y: np.ndarray, proba: np.ndarray) -> dict:
    """The summary numbers of ``multiclass_metrics`` (macro and micro, no per-class rows), computed
    with numpy alone: the bootstrap calls it a thousand times."""
    k = proba.shape[1]
    pred = proba.argmax(axis=1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k).astype(float)
    tp = np.diag(cm)
    fp, fn = cm.sum(axis=0) - tp, cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    onehot = np.eye(k, dtype=bool)[y]
    aucs = [rank_auc(onehot[:, c], proba[:, c]) for c in range(k)]
    spec = np.divide(tn, tn + fp, out=np.full(k, np.nan), where=(tn + fp) > 0)
    present = [a for a in aucs if not np.isnan(a)]
    return {
        "accuracy": float(tp.sum() / len(y)) if len(y) else float("nan"),
        "precision": float(ratio(tp, tp + fp).mean()), "recall": float(ratio(tp, tp + fn).mean()),
        "f1": float(ratio(2 * tp, 2 * tp + fp + fn).mean()),
        "specificity": float(np.nanmean(spec)) if not np.all(np.isnan(spec)) else float("nan"),
        "auc": float(np.mean(present)) if present else float("nan"),
        "auc_micro": rank_auc(onehot.ravel(), proba.ravel()),
    }


def multiclass_ci(y_true, proba, class_names: list[str], *, metrics: list[str], n: int = 1000, seed: int = 0
                  ) -> dict[str, list[float]]:
    """Bootstrap intervals of the macro and micro ``multiclass_metrics`` over resampled cases."""
    y, p = np.asarray(y_true).astype(int), np.asarray(proba, dtype=float)
    return bootstrap_intervals(lambda idx: multiclass_summary(y[idx], p[idx]), len(y), metrics=metrics, n=n,
                               seed=seed)


# ------------------------------------------------------------------ segmentation
SEG_LABELS = {"dice": "Dice", "iou": "IoU (Jaccard)", "hd95": "HD95 (mm)", "assd": "Average surface distance (mm)",
              "volume_error": "Volume error (mL, predicted − true)", "hd95_monai": "HD95, MONAI convention (mm)",
              "assd_monai": "ASSD, MONAI convention (mm)"}
#: how each distance is measured (the report names it: published tables use either convention)
DISTANCE_CONVENTIONS = {
    "surface": "DeepMind surface-distance: surface elements weighted by their area; HD95 is the larger of the two "
               "directed 95th percentiles, ASSD the mean of the two directed means",
    "monai": "MONAI HausdorffDistanceMetric(percentile=95) / SurfaceDistanceMetric(symmetric=True): border voxels "
             "(mask XOR its erosion), Euclidean distance in mm to the nearest border voxel of the other mask; HD95 is "
             "the larger of the two directed 95th percentiles, ASSD the mean over both directions' voxels together",
}
MISSED_LESION = ("a lesion case with an empty prediction gets the image diagonal (mm) as its HD95 and ASSD, so a "
                 "miss can only worsen the means; the miss rate is reported beside them")


def border_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face-neighbour (or at the array's edge): MONAI's edges.

    >>> m = np.zeros((3, 5, 5), bool); m[:, 1:4, 1:4] = True  # a 3x3x3 cube touching the top and bottom
    >>> int(border_voxels(m).sum())  # all but its centre
    26
    """
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask)


def monai_surface_distances(truth: np.ndarray, pred: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Directed border-voxel distances (pred → truth, truth → pred) in mm, as MONAI computes them."""
    from scipy.spatial import KDTree

    scale = np.asarray(spacing, dtype=float)
    pts_t = np.argwhere(border_voxels(truth)) * scale
    pts_p = np.argwhere(border_voxels(pred)) * scale
    return KDTree(pts_t, leafsize=32).query(pts_p, k=1)[0], KDTree(pts_p, leafsize=32).query(pts_t, k=1)[0]


def segmentation_metrics(truth: np.ndarray, pred: np.ndarray, spacing) -> dict:
    """Per-case overlap and distance metrics of two binary volumes on the same grid.

    Dice and IoU; volumes and the volume error in mL; HD95 and ASSD in mm at the given
    ``spacing`` in two conventions (``DISTANCE_CONVENTIONS``): ``hd95``/``assd`` with DeepMind's
    ``surface-distance`` (area-weighted surface elements), ``hd95_monai``/``assd_monai`` as MONAI
    computes them (border voxels), for comparison with published tables. When both are empty,
    Dice and IoU are 1 and the distances 0. A lesion missed (truth, no prediction) gets the
    image diagonal as its distances and ``missed`` 1 (``MISSED_LESION``); a prediction on an
    empty truth has undefined distances (NaN) and is counted as a false positive instead.

    >>> t = np.zeros((1, 4, 4), bool); t[0, :2, :2] = True
    >>> p = np.zeros((1, 4, 4), bool); p[0, :2, :] = True
    >>> m = segmentation_metrics(t, p, (1.0, 1.0, 1.0)); (round(m["dice"], 3), m["iou"])
    (0.667, 0.5)
    """
    import surface_distance

    t, p = np.asarray(truth) > 0, np.asarray(pred) > 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    n_t, n_p, inter = int(t.sum()), int(p.sum()), int((t & p).sum())
    union = n_t + n_p - inter
    out = {
        "dice": 2.0 * inter / (n_t + n_p) if n_t + n_p else 1.0,
        "iou": inter / union if union else 1.0,
        "volume_true_ml": n_t * voxel_ml,
        "volume_pred_ml": n_p * voxel_ml,
        "volume_error": (n_p - n_t) * voxel_ml,
    }
    out["missed"] = int(bool(n_t) and not n_p)
    if n_t and n_p:
        distances = surface_distance.compute_surface_distances(t, p, tuple(float(s) for s in spacing))
        out["hd95"] = float(surface_distance.compute_robust_hausdorff(distances, 95))
        gt_to_pred, pred_to_gt = surface_distance.compute_average_surface_distance(distances)
        out["assd"] = float((gt_to_pred + pred_to_gt) / 2.0)
        d_pt, d_tp = monai_surface_distances(t, p, spacing)
        out["hd95_monai"] = float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
        out["assd_monai"] = float(np.concatenate([d_pt, d_tp]).mean())
    elif not n_t and not n_p:
        out["hd95"] = out["assd"] = out["hd95_monai"] = out["assd_monai"] = 0.0
    elif n_t:  # missed: the largest distance the image allows
        diagonal = float(np.linalg.norm(np.asarray(t.shape, dtype=float) * np.asarray(spacing, dtype=float)))
        out["hd95"] = out["assd"] = out["hd95_monai"] = out["assd_monai"] = diagonal
    else:
        out["hd95"] = out["assd"] = out["hd95_monai"] = out["assd_monai"] = float("nan")
    return out


def mean_ci(values, *, n: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean over cases (NaNs ignored); None with fewer than 2 values.

    >>> lo, hi = mean_ci([0.8, 0.9, 0.85, 0.95], n=200)
    >>> 0.8 <= lo <= hi <= 0.95
    True
    """
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if len(v) < 2 or n <= 0:
        return None
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n, len(v)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2))


def summarize_segmentation(cases, names: list[str], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean, median and bootstrap CI of each metric over the cases with foreground (lesion cases),
    and false positives on the cases without (``cases``: a DataFrame of ``segmentation_metrics`` rows
    with a ``label`` column, 1 when the truth has foreground)."""
    lesion = cases[cases["label"] == 1]
    empty = cases[cases["label"] == 0]
    summary = {"n": int(len(cases)), "n_lesion": int(len(lesion)), "n_empty": int(len(empty)),
               "empty_with_false_positive": int((empty["volume_pred_ml"] > 0).sum()) if len(empty) else 0}
    if "missed" in lesion:
        summary["missed"] = int(lesion["missed"].sum())
        summary["miss_rate"] = float(lesion["missed"].mean()) if len(lesion) else float("nan")
        detected = lesion[lesion["missed"] == 0]
        for name in ("hd95", "assd", "hd95_monai", "assd_monai"):
            if name in names and len(detected):
                summary[f"{name}_detected"] = float(np.nanmean(detected[name].to_numpy(dtype=float)))
    ci, methods = {}, {}
    for name in names:
        values = lesion[name].to_numpy(dtype=float) if len(lesion) else np.array([])
        finite = values[~np.isnan(values)]
        summary[name] = float(finite.mean()) if len(finite) else float("nan")
        summary[f"{name}_median"] = float(np.median(finite)) if len(finite) else float("nan")
        interval, method = (unit_mean_ci if name in UNIT_METRICS else _plain_mean_ci)(values, n=n_boot, seed=seed)
        if interval:
            ci[name], methods[name] = interval, method
    return {"summary": summary, "ci": ci, "ci_method": methods}


def _plain_mean_ci(values, *, n: int, seed: int):
    interval = mean_ci(values, n=n, seed=seed)
    return interval, ("case bootstrap, percentile" if interval else None)


def unit_mean_ci(values, *, n: int = 1000, seed: int = 0) -> tuple[tuple[float, float] | None, str | None]:
    """The interval of a mean of values in [0, 1] (Dice, IoU) and how it was made: a percentile bootstrap over
    cases, or Wilson's score interval (``medflow.intervals.wilson_mean``) where the bootstrap cannot vary (one
    case, or every case alike): never a point.

    >>> unit_mean_ci([0.0, 0.0, 0.0], n=100)[0][1] > 0
    True
    """
    from medflow.intervals import WILSON_MEAN, wilson_mean

    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v) or n <= 0:
        return None, None
    interval = mean_ci(v, n=n, seed=seed)
    if interval and interval[0] < interval[1]:
        return interval, "case bootstrap, percentile"
    return wilson_mean(float(v.mean()), len(v)), WILSON_MEAN


# segmentation metrics whose values lie in [0, 1]
UNIT_METRICS = ("dice", "iou")
