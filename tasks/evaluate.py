"""Prefect task of the validate/test stage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.logging import get_run_logger

from storage.store import Store
from tasks.metrics import binary_metrics, bootstrap_ci, choose_threshold


def evaluate_predictions(df: pd.DataFrame, *, threshold_method, metric_names: list[str], bootstrap: int,
                         seed: int) -> dict:
    """Threshold from the validation rows; metrics and bootstrap intervals on the test rows."""
    val, test = df[df["split"] == "val"], df[df["split"] == "test"]
    thr = choose_threshold(val["label"], val["score"], threshold_method)
    result = {
        "threshold": thr,
        "threshold_method": threshold_method,
        "val": binary_metrics(val["label"], val["score"], thr),
        "test": binary_metrics(test["label"], test["score"], thr),
        "ci": bootstrap_ci(test["label"], test["score"], thr, metrics=metric_names, n=bootstrap, seed=seed),
        "bootstrap": bootstrap,
        "metrics": metric_names,
    }
    return result


def explain_test_cases(model_path: str, loader, df: pd.DataFrame, threshold: float, run_dir: Path, log) -> None:
    """Grad-CAM for a few test cases (errors first) into ``explain.npz``, for the report."""
    from models.explain import explain_cases, select_cases

    rows = df[df["split"] == "test"][["series_key", "label", "score"]].to_dict("records")
    try:
        cases = explain_cases(model_path, loader, select_cases(rows, threshold))
    except NotImplementedError as exc:
        log.warning("no Grad-CAM examples: %s", exc)
        return
    np.savez_compressed(
        run_dir / "explain.npz",
        images=np.stack([c["image"] for c in cases]), cams=np.stack([c["cam"] for c in cases]),
        meta=np.array(json.dumps([{k: c[k] for k in ("series_key", "label", "score", "z")} for c in cases])),
    )
    log.info("Grad-CAM for %d test case(s)", len(cases))


@task(name="evaluate_model")
def evaluate_model_task(spec, run_dir: str, prep_key: str, split_csv: str, model_path: str) -> dict:
    """Predict every split, choose the threshold on validation, score the test split.

    Writes ``predictions.csv`` (pseudonymous keys) and ``metrics.json`` into the run folder.
    """
    from models.training import predict

    log = get_run_logger()
    store = Store(spec.data.store)
    df = pd.read_csv(split_csv)
    df["score"] = predict(model_path, lambda k: store.read_prep(prep_key, k), df["series_key"].tolist(),
                          batch_size=spec.train.batch_size)
    ev = spec.evaluate
    result = evaluate_predictions(df, threshold_method=ev.threshold, metric_names=[m for m in spec.metric_names()],
                                  bootstrap=ev.bootstrap, seed=spec.train.seed)
    df["prediction"] = (df["score"] >= result["threshold"]).astype(int)
    df.to_csv(Path(run_dir) / "predictions.csv", index=False)
    explain_test_cases(model_path, lambda k: store.read_prep(prep_key, k), df, result["threshold"], Path(run_dir), log)
    (Path(run_dir) / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    t = result["test"]
    log.info("test: AUC %.3f, accuracy %.3f, sensitivity %.3f, specificity %.3f at threshold %.3f (n=%d)",
             t["auc"], t["accuracy"], t["recall"], t["specificity"], result["threshold"], t["n"])
    if np.isnan(t["auc"]):
        log.warning("the test split holds one class only: AUC is undefined; use a larger cohort or split.test")
    return result
