"""Runs listed, and two runs compared on the test cases they share.

``list_runs`` reads each run folder's ``run.json``, ``spec.yaml``, ``provenance.json`` and
``metrics.json``. ``compare_runs`` pairs two classification runs' test predictions by series
key (two runs of one store and one split seed share their test split) and tests the difference
of their AUCs with DeLong's paired test: the AUCs' variances and covariance from the
structural components of the Mann-Whitney statistic (DeLong, DeLong and Clarke-Pearson 1988).
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


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    """DeLong's paired test of two binary classification runs on the test cases both scored."""
    frames = []
    for run in (run_a, run_b):
        path = Path(run) / "predictions.csv"
        if not path.exists():
            raise FileNotFoundError(f"{run} has no predictions.csv: pass finished classification run folders")
        df = read_csv(path)
        if "score" not in df:
            raise ValueError(f"{run} is not a two-class classification run (no score column); compare compares "
                             "binary classifiers")
        frames.append(df[df["split"] == "test"][["series_key", "label", "score"]])
    both = frames[0].merge(frames[1], on="series_key", suffixes=("_a", "_b"))
    if both.empty:
        raise ValueError("the two runs share no test case: compare runs of one store with one split seed")
    if (both["label_a"] != both["label_b"]).any():
        raise ValueError("the two runs label their shared test cases differently: they used different labels")
    result = delong_test(both["label_a"].to_numpy(), both["score_a"].to_numpy(), both["score_b"].to_numpy())
    result.update({"shared": len(both), "only_a": len(frames[0]) - len(both), "only_b": len(frames[1]) - len(both)})
    return result
