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
    if spec.model.task == "segmentation":
        return evaluate_segmentation(spec, store, prep_key, df, model_path, Path(run_dir), log)
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


def predict_native(model, store: Store, key: str, prep_key: str, steps: list, *, two_d: bool, patch,
                   batch_size: int) -> np.ndarray:
    """Foreground probability of a stored series on its original grid (prediction mapped back)."""
    from models.segmentation import predict_volume
    from tasks.preprocessing import invert_geometry, shape_trace

    entry = store.catalog_entry(key)
    prob = predict_volume(model, store.read_prep(prep_key, key), two_d=two_d, patch=patch, batch_size=batch_size)
    return invert_geometry(prob, shape_trace(entry["shape"], entry["spacing"], steps))


def lesion_slice(image_ref, truth: np.ndarray, pred: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The slice with the most foreground (truth or prediction): its index, image, truth and prediction.

    Only that slice of the image is read (``image_ref`` is a Zarr array), so a case costs a
    slice of memory, not a volume.
    """
    z = int(np.argmax((truth > 0).sum(axis=(1, 2)) + (pred > 0).sum(axis=(1, 2))))
    return z, np.asarray(image_ref[z], dtype=np.float32), truth[z] > 0, pred[z] > 0


def example_slices(cases: pd.DataFrame, slices: dict) -> dict | None:
    """Best, median and worst test lesion case by Dice, from each case's ``lesion_slice``."""
    lesion = cases[(cases["split"] == "test") & (cases["label"] == 1)].sort_values("dice", ascending=False)
    if lesion.empty:
        return None
    picks = {"best": lesion.iloc[0], "median": lesion.iloc[len(lesion) // 2], "worst": lesion.iloc[-1]}
    images, truths, preds, meta = [], [], [], []
    for which, row in picks.items():
        z, image, truth, pred = slices[row["series_key"]]
        images.append(image)
        truths.append(truth)
        preds.append(pred)
        meta.append({"which": which, "series_key": row["series_key"], "dice": float(row["dice"]), "z": z})
    shape = np.max([i.shape for i in images], axis=0)

    def pad(a):
        return np.pad(a, [(0, int(s) - n) for s, n in zip(shape, a.shape)])

    return {"images": np.stack([pad(i) for i in images]), "truths": np.stack([pad(t) for t in truths]),
            "preds": np.stack([pad(p) for p in preds]), "meta": meta}


def evaluate_segmentation(spec, store: Store, prep_key: str, df: pd.DataFrame, model_path: str,
                          run_dir: Path, log) -> dict:
    """Predict validation and test cases, map predictions to the original grid, score them against the
    stored masks (spacing from the catalog); per-case table, summary with bootstrap CIs, overlay examples."""
    import keras

    import models.losses  # noqa: F401
    from models.segmentation import patch_shape
    from tasks.metrics import segmentation_metrics, summarize_segmentation

    model = keras.models.load_model(model_path, compile=False)
    two_d = spec.model.arch == "unet2d"
    patch = None
    if not two_d and spec.train.patch_size:
        patch = patch_shape(spec.model.arch, spec.train.patch_size, (0, 0, 0))
    steps = spec.steps()
    rows, slices = [], {}
    for row in df[df["split"].isin(["val", "test"])].to_dict("records"):
        key = row["series_key"]
        entry = store.catalog_entry(key)
        prob = predict_native(model, store, key, prep_key, steps, two_d=two_d, patch=patch,
                              batch_size=spec.train.batch_size)
        pred = prob >= 0.5
        truth = store.read_mask(key)
        truth = truth > 0 if truth is not None else np.zeros(pred.shape, bool)
        rows.append({**row, **segmentation_metrics(truth, pred, entry["spacing"])})
        if row["split"] == "test" and row["label"] == 1:
            slices[key] = lesion_slice(store.image_ref(key).open(), truth, pred)
    cases = pd.DataFrame(rows)
    names = spec.metric_names()
    ev = spec.evaluate
    result = {"task": "segmentation", "metrics": names, "bootstrap": ev.bootstrap}
    for split in ("val", "test"):
        part = summarize_segmentation(cases[cases["split"] == split], names, n_boot=ev.bootstrap, seed=spec.train.seed)
        result[split] = part["summary"]
        if split == "test":
            result["ci"] = part["ci"]
    cases.to_csv(run_dir / "predictions.csv", index=False)
    examples = example_slices(cases, slices)
    if examples:
        np.savez_compressed(run_dir / "seg_examples.npz", images=examples["images"], truths=examples["truths"],
                            preds=examples["preds"], meta=np.array(json.dumps(examples["meta"])))
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=1, default=float))
    t = result["test"]
    log.info("test: Dice %.3f (median %.3f), IoU %.3f, HD95 %.1f mm on %d lesion case(s); %d of %d empty case(s) "
             "with a false positive", t["dice"], t["dice_median"], t.get("iou", float("nan")),
             t.get("hd95", float("nan")), t["n_lesion"], t["empty_with_false_positive"], t["n_empty"])
    return result
