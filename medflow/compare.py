"""Runs listed, and two runs compared on the test cases they share.

``list_runs`` reads each run folder's ``run.json``, ``spec.yaml``, ``provenance.json`` and
``metrics.json``. ``compare_runs`` pairs two runs' test predictions by series key (two runs of one
store and one split seed share their test split): binary classifiers by DeLong's paired test of
their AUCs (the AUCs' variances and covariance from the structural components of the
Mann-Whitney statistic; DeLong, DeLong and Clarke-Pearson 1988), multi-class classifiers by a
paired bootstrap of their macro AUCs over patients, segmentations by their per-case Dice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from scipy import stats

from medflow.tables import read_csv

# the test metric a run is listed by: the first of these its metrics.json has (classification and signal,
# segmentation, detection)
HEADLINE_METRICS = ("auc", "dice", "cpm", "ap50")


def list_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per run folder under ``runs_dir``: run id, spec name, state, finish time, data
    digest (short), task, the test AUC (Dice, CPM or AP50 for the other kinds) and the baseline's; newest first."""
    rows = []
    for run in sorted(Path(runs_dir).glob("*/run.json")):
        folder = run.parent
        status = _read_json(run)
        spec = yaml.safe_load((folder / "spec.yaml").read_text()) if (folder / "spec.yaml").exists() else {}
        provenance = _read_json(folder / "provenance.json")
        metrics = _read_json(folder / "metrics.json")
        test = metrics.get("test", {})
        metric = next((m for m in HEADLINE_METRICS if m in test), "")
        rows.append({
            "run": folder.name, "spec": (spec or {}).get("name", ""), "state": status.get("state", ""),
            "finished": status.get("finished_at", ""), "data": str(provenance.get("data_digest", ""))[:12],
            "task": metrics.get("task", (spec or {}).get("model", {}).get("task", "")),
            "metric": metric,
            "value": test.get(metric) if metric else None,
            "baseline": (metrics.get("baseline") or {}).get(metric) if metric else None,
            "n_test": test.get("n"),
        })
    df = pd.DataFrame(rows, columns=["run", "spec", "state", "finished", "data", "task", "metric", "value",
                                     "baseline", "n_test"])
    return df.sort_values("run", ascending=False, kind="stable").reset_index(drop=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs of each row of ``scores`` (k, n) and their structural components: V10 (k, positives)
    and V01 (k, negatives), with ties counted as a half."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    # psi[k, i, j] = 1 if positive i outscores negative j, 1/2 on a tie
    psi = (pos[:, :, None] > neg[:, None, :]) + 0.5 * (pos[:, :, None] == neg[:, None, :])
    return psi.mean(axis=(1, 2)), psi.mean(axis=2), psi.mean(axis=1)


def delong_test(y, score_a, score_b) -> dict:
    """DeLong's paired test of AUC(a) − AUC(b) on the same cases: both AUCs, the difference, its
    standard error, a 95% interval and the two-sided p-value.

    >>> y = np.array([0, 0, 0, 1, 1, 1])
    >>> r = delong_test(y, [.1, .2, .3, .4, .5, .6], [.1, .2, .3, .4, .5, .6])
    >>> r["difference"], r["p_value"]
    (0.0, 1.0)
    """
    y = np.asarray(y).astype(int)
    scores = np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)])
    m, n = int((y == 1).sum()), int((y == 0).sum())
    if m < 2 or n < 2:
        raise ValueError(f"Received {m} positive and {n} negative shared test cases; DeLong's test needs at least "
                         "2 of each.")
    auc, v10, v01 = delong_components(y, scores)
    cov = np.cov(v10) / m + np.cov(v01) / n
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:  # the two models order every pair alike
        p, se = (1.0, 0.0) if diff == 0 else (0.0, 0.0)
    else:
        se = var**0.5
        p = float(2 * stats.norm.sf(abs(diff) / se))
    z = stats.norm.ppf(0.975)
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "difference": diff, "se": se,
            "ci": [diff - z * se, diff + z * se], "p_value": p, "n_positive": m, "n_negative": n}


def compare_runs(run_a: str | Path, run_b: str | Path, *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Two runs compared on the test cases both scored: binary classifiers by DeLong's paired test of their AUCs;
    multi-class classifiers by their macro AUCs with a paired bootstrap over patients; segmentations by the mean
    Dice of the cases with a lesion, with a paired bootstrap interval and Wilcoxon's signed-rank test.

    Returns ``metric``, ``method``, ``value_a``, ``value_b``, ``difference``, ``ci``, ``p_value``, ``shared``,
    ``only_a``, ``only_b`` (and, for binary runs, DeLong's ``auc_a``, ``auc_b``, ``n_positive``, ``n_negative``).
    """
    outcomes = [_read_json(Path(run) / "test_outcomes.json") for run in (run_a, run_b)]
    if outcomes[0].get("kind") and outcomes[0].get("kind") == outcomes[1].get("kind"):
        return _paired_detection(*outcomes, n_boot=n_boot, seed=seed)
    frames = []
    for run in (run_a, run_b):
        path = Path(run) / "predictions.csv"
        if not path.exists():
            raise FileNotFoundError(f"{run} has no predictions.csv: pass finished run folders")
        df = read_csv(path, dtype={"label_name": str, "prediction_name": str})
        frames.append(df[df["split"] == "test"] if "split" in df else df)
    a, b = frames
    probs_a = [c for c in a if c.startswith("p_")]  # in class order: column k is the probability of label k
    if "score" in a and "score" in b:
        kind = "binary"
        columns = ["series_key", "label", "score"]
    elif probs_a and probs_a == [c for c in b if c.startswith("p_")]:
        kind = "multiclass"
        columns = ["series_key", "patient_key", "label", *probs_a]
    elif "dice" in a and "dice" in b:
        kind = "dice"
        columns = ["series_key", "patient_key", "label", "dice"]
    else:
        raise ValueError("the two runs are not of one comparable kind: compare takes two binary or two multi-class "
                         "classification runs (with the same classes), two segmentation runs, or two detection runs "
                         "of one kind (evaluated by this medflow version: they hold test_outcomes.json)")
    both = a[columns].merge(b[[c for c in columns if c != "patient_key"]], on="series_key", suffixes=("_a", "_b"))
    if both.empty:
        raise ValueError("the two runs share no test case: compare runs of one store with one split seed")
    if (both["label_a"] != both["label_b"]).any():
        raise ValueError("the two runs label their shared test cases differently: they used different labels")
    if kind == "binary":
        result = delong_test(both["label_a"].to_numpy(), both["score_a"].to_numpy(), both["score_b"].to_numpy())
        result.update({"metric": "auc", "method": "DeLong's paired test", "value_a": result["auc_a"],
                       "value_b": result["auc_b"]})
    elif kind == "multiclass":
        result = _paired_bootstrap_macro_auc(both, probs_a, n_boot=n_boot, seed=seed)
    else:
        result = _paired_dice(both[both["label_a"] == 1], n_boot=n_boot, seed=seed)
    result.update({"shared": len(both), "only_a": len(a) - len(both), "only_b": len(b) - len(both)})
    return result


def _paired_bootstrap_macro_auc(both: pd.DataFrame, classes: list[str], *, n_boot: int, seed: int) -> dict:
    """Macro one-vs-rest AUC of each run, and the difference's 95% percentile interval and two-sided bootstrap
    p-value from resampling patients (the same draw for both runs)."""
    from sklearn.metrics import roc_auc_score

    y = both["label_a"].to_numpy(int)
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError("the shared test cases hold one class only; an AUC needs two")

    def macro(idx, side):
        yy = y[idx]
        aucs = [roc_auc_score(yy == k, both[f"{classes[k]}_{side}"].to_numpy()[idx])
                for k in present if 0 < (yy == k).sum() < len(yy)]
        return float(np.mean(aucs)) if aucs else float("nan")

    everyone = np.arange(len(both))
    value_a, value_b = macro(everyone, "a"), macro(everyone, "b")
    patients = both["patient_key"].to_numpy()
    groups = {p: np.flatnonzero(patients == p) for p in np.unique(patients)}
    keys = list(groups)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.concatenate([groups[keys[i]] for i in rng.integers(0, len(keys), len(keys))])
        d = macro(idx, "a") - macro(idx, "b")
        if d == d:
            diffs.append(d)
    diffs = np.asarray(diffs)
    p = float(min(1.0, 2 * min((diffs <= 0).mean(), (diffs >= 0).mean()))) if len(diffs) else float("nan")
    return {"metric": "macro AUC", "method": f"paired bootstrap over {len(keys)} patients ({len(diffs)} resamples)",
            "value_a": value_a, "value_b": value_b, "difference": value_a - value_b,
            "ci": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))], "p_value": p}


def _paired_dice(lesion: pd.DataFrame, *, n_boot: int, seed: int) -> dict:
    """Mean Dice of each run over the shared test cases with a lesion, the difference's paired bootstrap interval and
    Wilcoxon's signed-rank p-value."""
    da, db = lesion["dice_a"].to_numpy(float), lesion["dice_b"].to_numpy(float)
    if len(da) < 2:
        raise ValueError(f"the runs share {len(da)} test case(s) with a lesion; a paired comparison needs 2 or more")
    diff = da - db
    rng = np.random.default_rng(seed)
    boots = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(n_boot)])
    p = 1.0 if np.allclose(diff, 0) else float(stats.wilcoxon(da, db).pvalue)
    return {"metric": "Dice", "method": f"Wilcoxon signed-rank test on {len(diff)} cases with a lesion",
            "value_a": float(da.mean()), "value_b": float(db.mean()), "difference": float(diff.mean()),
            "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))], "p_value": p}


def _paired_detection(a: dict, b: dict, *, n_boot: int, seed: int) -> dict:
    """Two detection runs on their shared test scans: CPM (3D, FROC) or AP50 and AP50:95 (2D, COCO), each run's
    value, the difference's 95% percentile interval and two-sided p-value from one bootstrap over patients (the
    same draw for both runs)."""
    by_a = {c["series_key"]: c for c in a["cases"]}
    shared = [c for c in b["cases"] if c["series_key"] in by_a]
    if not shared:
        raise ValueError("the two runs share no test case: compare runs of one store with one split seed")
    cases_a, cases_b = [by_a[c["series_key"]] for c in shared], shared
    if a["kind"] == "froc":
        if [len(c["lesion_best"]) for c in cases_a] != [len(c["lesion_best"]) for c in cases_b]:
            raise ValueError("the two runs count different lesions in their shared test scans: they used different marks")
        metrics = ["cpm"]
        value = {side: _froc_value(cases) for side, cases in (("a", cases_a), ("b", cases_b))}
        name, headline = "CPM", "cpm"
    else:
        from medflow.boxes import _accumulate, _evaluate

        if [c["truth"] for c in cases_a] != [c["truth"] for c in cases_b]:
            raise ValueError("the two runs hold different truth boxes for their shared test images: they used "
                             "different marks")
        metrics = ["ap50", "ap50_95"]
        value = {side: _box_value(_evaluate(cases), _accumulate) for side, cases in (("a", cases_a), ("b", cases_b))}
        name, headline = "AP50", "ap50"
    full = {side: fn(list(range(len(shared)))) for side, fn in value.items()}
    patients = [c["patient"] for c in shared]
    groups = {p: [i for i, q in enumerate(patients) if q == p] for p in dict.fromkeys(patients)}
    members = list(groups.values())
    rng = np.random.default_rng(seed)
    diffs = {m: [] for m in metrics}
    for _ in range(n_boot):
        pick = [i for g in rng.integers(len(members), size=len(members)) for i in members[g]]
        va, vb = value["a"](pick), value["b"](pick)
        for m in metrics:
            d = va[m] - vb[m]
            if d == d:
                diffs[m].append(d)
    out = {"metric": name, "value_a": full["a"][headline], "value_b": full["b"][headline],
           "difference": full["a"][headline] - full["b"][headline],
           "method": f"paired bootstrap over {len(members)} patients ({len(diffs[headline])} resamples)",
           "shared": len(shared), "only_a": len(a["cases"]) - len(shared), "only_b": len(b["cases"]) - len(shared)}
    for m in metrics:
        d = np.asarray(diffs[m])
        ci = [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))] if len(d) else [float("nan")] * 2
        p = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean()))) if len(d) else float("nan")
        if m == headline:
            out.update({"ci": ci, "p_value": p})
        else:
            out["also"] = {**out.get("also", {}), m: {"value_a": full["a"][m], "value_b": full["b"][m],
                                                      "difference": full["a"][m] - full["b"][m], "ci": ci,
                                                      "p_value": p}}
    return out


def _froc_value(cases: list[dict]):
    """A function of picked case indices (repeats allowed) to that sample's CPM."""
    from medflow.froc import cpm, froc_curve, sensitivity_at

    outcomes = [(np.asarray(c["fp_scores"], float),
                 np.array([-np.inf if v is None else v for v in c["lesion_best"]], float)) for c in cases]

    def value(pick):
        curve = froc_curve([], [outcomes[i] for i in pick])
        return {"cpm": cpm(sensitivity_at(curve)) if curve["n_lesions"] else float("nan")}

    return value


def _box_value(ev, accumulate):
    def value(pick):
        ap = accumulate(ev, pick)
        return {"ap50": ap["ap50"], "ap50_95": ap["ap50_95"]}

    return value
