"""Detection metrics: FROC, the LUNA16 competition performance metric (CPM), patient bootstrap intervals,
and the declared baseline detector. Pure NumPy/SciPy; no Keras, no Prefect.

A detection is a centre (patient mm) with a score; a lesion a centre with a diameter. A
detection *hits* a lesion when its centre lies within the lesion's radius (LUNA16's rule).
Detections are pooled over all scans and swept by score, as in LUNA16's evaluation: at each
threshold, sensitivity is the fraction of lesions hit by a detection at or above it, and
false positives are the detections at or above it that hit no lesion, per scan. A lesion hit
by several detections counts once; the extra hits are not false positives.
"""

from __future__ import annotations

import numpy as np

FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
HIT_RULE = "a detection hits a lesion when its centre lies within the lesion's radius (LUNA16)"
BASELINE = "intensity local maxima: the brightest blobs of the smoothed CT (HU) inside the lung mask"
BASELINE_SIGMAS_MM = (2.0, 4.0, 6.0)  # the baseline's smoothing, chosen on the validation scans


def match(detections: list[dict], lesions: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """For one scan: the lesion each detection hits (-1: none; the nearest when several) and its score.

    ``detections``: ``{"xyz", "score"}``; ``lesions``: ``{"xyz", "diameter_mm"}``.
    """
    hits = np.full(len(detections), -1, dtype=int)
    if lesions:
        centres = np.array([les["xyz"] for les in lesions], dtype=float).reshape(-1, 3)
        radii = np.array([les["diameter_mm"] / 2.0 for les in lesions], dtype=float)
        for i, det in enumerate(detections):
            d = np.linalg.norm(centres - np.asarray(det["xyz"], dtype=float), axis=1)
            inside = np.flatnonzero(d <= radii)
            if len(inside):
                hits[i] = int(inside[np.argmin(d[inside])])
    return hits, np.array([det["score"] for det in detections], dtype=float)


def scan_outcome(scan: dict) -> tuple[np.ndarray, np.ndarray]:
    """One scan's part of the FROC: the scores of its false positives, and each lesion's best hit score
    (-inf: never hit)."""
    hits, scores = match(scan["detections"], scan["lesions"])
    best = np.full(len(scan["lesions"]), -np.inf)
    for h, score in zip(hits, scores):
        if h >= 0:
            best[h] = max(best[h], score)
    return scores[hits < 0], best


def froc_curve(scans: list[dict], outcomes: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """The FROC curve of ``scans`` (each ``{"detections", "lesions"}``; or their ``scan_outcome``s): arrays
    ``fps`` (false positives per scan), ``sensitivity`` and ``thresholds``, one point per distinct score,
    thresholds descending."""
    outcomes = outcomes if outcomes is not None else [scan_outcome(s) for s in scans]
    fp_scores = np.concatenate([o[0] for o in outcomes] or [np.zeros(0)])
    lesion_best = np.concatenate([o[1] for o in outcomes] or [np.zeros(0)])
    n_lesions = len(lesion_best)
    thresholds = np.unique(np.concatenate([fp_scores, lesion_best[np.isfinite(lesion_best)]]))[::-1]
    n_scans = max(len(outcomes), 1)
    fp_sorted = np.sort(fp_scores)
    hit_sorted = np.sort(lesion_best)
    # counts at or above each threshold, by binary search on the sorted scores
    fps = (len(fp_sorted) - np.searchsorted(fp_sorted, thresholds, side="left")) / n_scans
    hits = len(hit_sorted) - np.searchsorted(hit_sorted, thresholds, side="left")
    sens = hits / n_lesions if n_lesions else np.full(len(thresholds), np.nan)
    return {"fps": fps.astype(float), "sensitivity": np.asarray(sens, dtype=float), "thresholds": thresholds,
            "n_lesions": n_lesions, "n_scans": len(outcomes)}


def sensitivity_at(curve: dict, rates=FP_RATES) -> dict[float, float]:
    """Sensitivity at each false-positive rate: the highest sensitivity of a threshold with at most that many
    false positives per scan (0 when even the top detection exceeds it; NaN without lesions).

    >>> scans = [{"detections": [{"xyz": [0, 0, 0], "score": 0.9}, {"xyz": [50, 0, 0], "score": 0.8}],
    ...           "lesions": [{"xyz": [1, 0, 0], "diameter_mm": 6.0}]},
    ...          {"detections": [{"xyz": [0, 0, 0], "score": 0.7}], "lesions": [{"xyz": [0, 0, 1.5], "diameter_mm": 4.0}]}]
    >>> sensitivity_at(froc_curve(scans), rates=(0.25, 0.5, 1.0))
    {0.25: 0.5, 0.5: 1.0, 1.0: 1.0}
    """
    out = {}
    for rate in rates:
        if not curve["n_lesions"]:
            out[rate] = float("nan")
            continue
        ok = curve["fps"] <= rate + 1e-12
        out[rate] = float(curve["sensitivity"][ok].max()) if ok.any() else 0.0
    return out


def cpm(sensitivities: dict[float, float]) -> float:
    """The competition performance metric: the mean sensitivity over the seven LUNA16 rates."""
    return float(np.mean([sensitivities[r] for r in FP_RATES]))


def froc_summary(scans: list[dict], *, n_boot: int = 1000, seed: int = 0, patients: list[str] | None = None) -> dict:
    """CPM and sensitivity at each rate with 95% percentile intervals from a bootstrap over patients
    (``patients[i]`` is scan i's patient; all scans of a drawn patient go together)."""
    outcomes = [scan_outcome(s) for s in scans]
    curve = froc_curve(scans, outcomes)
    sens = sensitivity_at(curve)
    out = {"cpm": cpm(sens), "sensitivity": {str(r): s for r, s in sens.items()},
           "n_lesions": curve["n_lesions"], "n_scans": curve["n_scans"],
           "curve": {"fps": curve["fps"].tolist(), "sensitivity": curve["sensitivity"].tolist()}}
    patients = patients or [str(i) for i in range(len(scans))]
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    members = list(groups.values())
    if n_boot and len(members) > 1 and curve["n_lesions"]:
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(int(n_boot)):
            pick = [i for g in rng.integers(len(members), size=len(members)) for i in members[g]]
            c = froc_curve([], [outcomes[i] for i in pick])
            if c["n_lesions"]:
                s = sensitivity_at(c)
                draws.append([cpm(s), *[s[r] for r in FP_RATES]])
        draws = np.asarray(draws)
        lo, hi = np.percentile(draws, [2.5, 97.5], axis=0)
        out["cpm_ci"] = [float(lo[0]), float(hi[0])]
        out["sensitivity_ci"] = {str(r): [float(lo[j + 1]), float(hi[j + 1])] for j, r in enumerate(FP_RATES)}
        out["ci_method"] = "patient bootstrap, percentile"
    if n_boot and curve["n_lesions"]:
        from medflow.intervals import WILSON_MEAN, wilson_mean

        # one patient, or every resample alike (a sensitivity of 0 or 1 at a rate, a CPM of 1.0 or 0.0): Wilson's
        # interval over the lesions, never a point
        if not out.get("cpm_ci") or out["cpm_ci"][0] == out["cpm_ci"][1]:
            out["cpm_ci"], out["ci_method"] = list(wilson_mean(out["cpm"], curve["n_lesions"])), WILSON_MEAN
            out.setdefault("ci_methods", {})["cpm"] = WILSON_MEAN
        rate_ci = out.setdefault("sensitivity_ci", {})
        for rate, value in out["sensitivity"].items():
            if rate not in rate_ci or rate_ci[rate][0] == rate_ci[rate][1]:
                rate_ci[rate] = list(wilson_mean(value, curve["n_lesions"]))
                out.setdefault("ci_methods", {})[rate] = WILSON_MEAN
    return out


def operating_threshold(curve: dict, fp_per_scan: float = 1.0) -> float:
    """The lowest score threshold with at most ``fp_per_scan`` false positives per scan (chosen on validation)."""
    ok = curve["fps"] <= fp_per_scan + 1e-12
    return float(curve["thresholds"][ok].min()) if ok.any() else float("inf")


def baseline_candidates(image_hu: np.ndarray, spacing, *, sigmas_mm=BASELINE_SIGMAS_MM, max_peaks: int = 50
                        ) -> dict[float, list[dict]]:
    """The declared baseline, for each smoothing in ``sigmas_mm``: local maxima (3x3x3) of the CT volume (HU,
    on its stored grid) smoothed with a Gaussian of that sigma, inside the lung mask
    (``medflow.preprocessing.lung_mask``), scored by their smoothed HU, best first: ``{"zyx", "score"}``.
    The smoothing favours blobs of about its size (a nodule) over smaller bright ones (calcified
    granulomas, vessels seen end on)."""
    from scipy import ndimage

    from medflow.preprocessing import lung_mask

    image = np.asarray(image_hu, dtype=np.float32)
    spacing = np.asarray(spacing, dtype=float)
    fill = float(image.min()) - 1.0
    lungs = lung_mask(image, tuple(spacing), threshold=-400.0, fill=fill)[0] > fill
    out = {}
    for sigma in sigmas_mm:
        smooth = ndimage.gaussian_filter(image, float(sigma) / spacing)
        local = (smooth == ndimage.maximum_filter(smooth, size=3)) & lungs
        idx = np.argwhere(local)
        order = np.argsort(-smooth[tuple(idx.T)], kind="stable")[:max_peaks]
        out[float(sigma)] = [{"zyx": [float(v) for v in idx[i]], "score": float(smooth[tuple(idx[i])])}
                             for i in order]
    return out
