"""Confidence intervals that stay honest with few cases, several series per patient, and perfect scores.

- **Patients, not series, are resampled**: a patient with five series counts once, so the
  interval reflects how many independent people were tested.
- **BCa** (bias-corrected and accelerated, Efron 1987) adjusts the percentile interval for
  the bootstrap distribution's bias and skew, with the acceleration from a leave-one-patient-out
  jackknife.
- **At a bound** (an AUC or a proportion of exactly 0 or 1) every resample lands on the bound
  and a bootstrap interval collapses to a point ("1.000 – 1.000"), although 20 of 20 correct
  only shows accuracy above about 0.84. There the score intervals are used instead: Wilson's
  for proportions (scipy's ``binomtest``) and Newcombe's for the AUC (his method 5: a Wilson-type
  interval on the Hanley–McNeil variance), with the patients as the number of cases.

Each interval comes with the name of the method that made it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import optimize, stats

BCA = "patient bootstrap, BCa"
WILSON = "Wilson score (at a bound)"
NEWCOMBE = "Newcombe score (at a bound)"


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for ``k`` successes in ``n`` trials.

    >>> [round(v, 3) for v in wilson(20, 20)]
    [0.839, 1.0]
    """
    if n <= 0:
        return float("nan"), float("nan")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


WILSON_MEAN = "Wilson score for a mean in [0, 1] (the bootstrap cannot vary: one case, or every case alike)"


def wilson_mean(mean: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval with ``mean`` as the proportion over ``n`` cases: for a mean of values in [0, 1]
    (Dice, AP, CPM) where a bootstrap collapses to a point (one case, or every case the same), an interval as
    wide as a proportion of ``n`` could be; a value in [0, 1] varies at most as much as a 0/1 one.

    >>> [round(v, 3) for v in wilson_mean(1.0, 1)]
    [0.207, 1.0]
    >>> lo, hi = wilson_mean(0.62, 40)
    >>> lo < 0.62 < hi
    True
    """
    if n <= 0 or not np.isfinite(mean):
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + level / 2)
    p = min(max(float(mean), 0.0), 1.0)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def newcombe_auc(auc: float, n_pos: int, n_neg: int, level: float = 0.95) -> tuple[float, float]:
    """Newcombe's (2006, method 5) score interval for an AUC from ``n_pos`` positive and ``n_neg``
    negative cases: the values θ with (auc − θ)² = z²·V(θ), where V is Hanley and McNeil's
    variance with both group sizes set to their mean N: θ(1 − θ)[2N − 1 − 3(N − 1)/((2 − θ)(1 + θ))]/(n_pos·n_neg).
    Unlike a bootstrap it does not collapse at an AUC of 1.

    >>> lo, hi = newcombe_auc(1.0, 10, 10)
    >>> 0.8 < lo < 0.95, hi
    (True, 1.0)
    """
    if not n_pos or not n_neg or np.isnan(auc):
        return float("nan"), float("nan")
    z2 = stats.norm.ppf(0.5 + level / 2) ** 2
    n = (n_pos + n_neg) / 2

    def gap(theta):
        var = theta * (1 - theta) * (2 * n - 1 - 3 * (n - 1) / ((2 - theta) * (1 + theta))) / (n_pos * n_neg)
        return (auc - theta) ** 2 - z2 * var

    below = auc if auc < 1 else 1 - 1e-9  # gap is negative just inside the estimate, positive at 0 and 1
    above = auc if auc > 0 else 1e-9
    lo = 0.0 if auc <= 0 else optimize.brentq(gap, 0.0, below) if gap(below) < 0 else auc
    hi = 1.0 if auc >= 1 else optimize.brentq(gap, above, 1.0) if gap(above) < 0 else auc
    return float(lo), float(hi)


def patient_bootstrap(stat: Callable[[np.ndarray], dict[str, float]], groups, metrics: list[str], *,
                      n: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """BCa intervals of ``stat(rows)`` (a dict of metric values for an array of row indices),
    resampling the groups (patients) of ``groups`` (one label per row) with replacement.

    A resample where a metric is undefined (NaN, e.g. an AUC of one class) is left out for that
    metric. A metric whose resamples do not vary (or that is undefined on the data) gets no
    interval: the caller decides (``at_bound`` below).
    """
    codes, uniques = _factorize(groups)
    rows_of = [np.flatnonzero(codes == g) for g in range(len(uniques))]
    n_groups = len(rows_of)
    if n <= 0 or n_groups < 2:
        return {}
    point = stat(np.arange(len(codes)))
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in metrics}
    for _ in range(n):
        pick = rng.integers(0, n_groups, n_groups)
        values = stat(np.concatenate([rows_of[g] for g in pick]))
        for m in metrics:
            draws[m].append(values.get(m, np.nan))
    jack = {m: [] for m in metrics}
    for g in range(n_groups):  # leave one patient out
        values = stat(np.concatenate([rows_of[h] for h in range(n_groups) if h != g]))
        for m in metrics:
            jack[m].append(values.get(m, np.nan))
    out = {}
    for m in metrics:
        interval = _bca(point.get(m, np.nan), np.asarray(draws[m], float), np.asarray(jack[m], float), level)
        if interval is not None:
            out[m] = interval
    return out


def _bca(theta: float, boot: np.ndarray, jack: np.ndarray, level: float) -> tuple[float, float] | None:
    boot, jack = boot[~np.isnan(boot)], jack[~np.isnan(jack)]
    if np.isnan(theta) or len(boot) < 10 or np.ptp(boot) == 0 or len(jack) < 2:
        return None
    below = np.mean(boot < theta) + 0.5 * np.mean(boot == theta)  # ties split: AUCs of resamples often tie
    z0 = stats.norm.ppf(np.clip(below, 1 / (2 * len(boot)), 1 - 1 / (2 * len(boot))))
    d = jack.mean() - jack
    denom = 6 * np.sum(d**2) ** 1.5
    a = float(np.sum(d**3) / denom) if denom > 0 else 0.0
    alphas = []
    for q in ((1 - level) / 2, (1 + level) / 2):
        zq = stats.norm.ppf(q)
        alphas.append(stats.norm.cdf(z0 + (z0 + zq) / (1 - a * (z0 + zq))))
    lo, hi = np.quantile(boot, alphas)
    return float(lo), float(hi)


def _factorize(groups) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of the group labels (in order of first appearance) and the labels."""
    uniques, first, codes = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[codes.ravel()], uniques[order]
