"""Segmentation: a foreground mask per series (masks from DICOM SEG or NIfTI), U-Nets, Dice/HD95,
DICOM SEG out of ``medflow predict``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medflow.kinds.base import TaskKind
from medflow.runs import save_npz_atomic, write_json_atomic
from medflow.tables import write_csv_atomic

logger = logging.getLogger(__name__)

SEG_METRICS = ("dice", "iou", "hd95", "assd", "hd95_monai", "assd_monai", "volume_error")


def _ndim(spec) -> int:
    from models import info

    return info(spec.model.arch).ndim


def _patch(spec):
    """The (z, y, x) training patch of a 3D model, or None (whole slices / whole volumes)."""
    from models.segmentation import patch_shape

    if _ndim(spec) == 2 or not spec.train.patch_size:
        return None
    return patch_shape(3, spec.train.patch_size, (0, 0, 0))


def prep_pair(store, prep_key: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared volume and its prepared mask (zeros for a series without one: ``data.masks.missing: empty``)."""
    image = store.read_prep(prep_key, key)
    mask = store.read_prep_mask(prep_key, key)
    return image, (mask if mask is not None else np.zeros(image.shape, np.uint8))


def predict_native(model, store, key: str, prep_key: str, steps: list, *, two_d: bool, patch,
                   batch_size: int) -> np.ndarray:
    """Foreground probability of a stored series on its original grid (prediction mapped back)."""
    from medflow.preprocessing import invert_geometry, shape_trace
    from models.segmentation import predict_volume

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


def segmentation_warnings(per_case: pd.DataFrame, baseline: dict | None) -> list[str]:
    """What a reader must know before trusting a segmentation's test figures: few test patients with a lesion, and
    a model no better than the intensity baseline on the same cases.

    >>> cases = pd.DataFrame({"split": ["test"], "label": [1], "patient_key": ["a"], "dice": [0.0]})
    >>> [w.split(":")[0] for w in segmentation_warnings(cases, {"dice": 0.7})]
    ['only 1 test patient(s) with a lesion', 'below its baseline']
    """
    from medflow.metrics import MIN_TEST_PATIENTS

    out = []
    lesion = per_case[(per_case["split"] == "test") & (per_case["label"] == 1)]
    n = lesion["patient_key"].nunique() if "patient_key" in lesion else len(lesion)
    if n < MIN_TEST_PATIENTS:
        out.append(f"only {n} test patient(s) with a lesion: the intervals are wide (or missing, with fewer than 2) "
                   "and a few cases decide the metrics; test on more patients before comparing models")
    dice, base = (float(lesion["dice"].mean()) if len(lesion) else float("nan")), (baseline or {}).get("dice")
    if base is not None and base == base and dice == dice and dice <= base:
        out.append(f"below its baseline: Dice {dice:.3f} against the intensity baseline's {base:.3f} on the same test "
                   "cases; the model has learnt less than a threshold on the image (train longer, check the masks)")
    return out


def example_slices(cases: pd.DataFrame, slices: dict) -> dict | None:
    """Best, median and worst test lesion case by Dice, from each case's ``lesion_slice``."""
    lesion = cases[(cases["split"] == "test") & (cases["label"] == 1)].sort_values("dice", ascending=False)
    if lesion.empty:
        return None
    # best, median and worst only when they are different cases (one case shown once, two as best and worst)
    order = {1: [("case", 0)], 2: [("best", 0), ("worst", 1)]}.get(
        len(lesion), [("best", 0), ("median", len(lesion) // 2), ("worst", len(lesion) - 1)])
    picks = {which: lesion.iloc[i] for which, i in order}
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


class Segmentation(TaskKind):
    name = "segmentation"
    metrics = SEG_METRICS
    template = "segmentation.html.j2"

    def check_spec(self, spec) -> list[str]:
        problems = super().check_spec(spec)
        if spec.data.masks is None:
            problems.append("data.masks: model.task segmentation needs data.masks (DICOM SEG or NIfTI masks)")
        if spec.data.split.folds:
            problems.append(f"data.split.folds: k-fold ensembles are built for classification and signal runs; "
                            f"segmentation trains one model on the val split (received folds: {spec.data.split.folds})")
        if spec.evaluate.calibrate != "none":
            problems.append(f"evaluate.calibrate: calibrates class scores; segmentation has none (received "
                            f"{spec.evaluate.calibrate!r})")
        if spec.train.patch_size is not None:
            want = _ndim(spec)
            if len(spec.train.patch_size) != want:
                problems.append(f"train.patch_size: has {len(spec.train.patch_size)} values; {spec.model.arch} "
                                f"takes {want} ({'y, x' if want == 2 else 'z, y, x'})")
        return problems

    def cohort(self, spec, store) -> pd.DataFrame:
        from medflow.splitting import mask_cohort

        df = mask_cohort(store.catalog(), missing=spec.data.masks.missing)
        if df.empty:
            raise ValueError("no series in the store has a mask; check data.masks and the quarantine table")
        df["label_name"] = np.where(df["label"] == 1, "lesion", "no lesion")
        return df

    def class_names(self, evaluation: dict) -> list[str]:
        return ["no lesion", "lesion"]

    def train(self, spec, store, prep_key, cases, run_dir, on_epoch) -> dict:
        from models.segmentation import train_segmenter

        tr, va = cases[cases["split"] == "train"], cases[cases["split"] == "val"]
        shapes = {tuple(store.prep_ref(prep_key, k).open().shape) for k in cases["series_key"]}
        two_d = _ndim(spec) == 2
        varying = {s[1:] for s in shapes} if two_d else shapes
        if spec.train.patch_size is None and len(varying) != 1:
            what = "slice sizes" if two_d else "shapes"
            raise ValueError(f"prepared volumes differ in {what} ({sorted(varying)[:3]}...); set train.patch_size, "
                             "or end `preprocess` with a `resize` or `crop_pad` step")
        return train_segmenter(
            loader=lambda key: prep_pair(store, prep_key, key),
            train_keys=tr["series_key"].tolist(), val_keys=va["series_key"].tolist(), volume_shape=max(shapes),
            ndim=_ndim(spec), arch=spec.model.arch, params=spec.model.params, train=spec.train.model_dump(),
            augment=spec.augment.model_dump(), run_dir=run_dir, on_epoch=on_epoch,
        )

    def evaluate(self, spec, store, prep_key, cases, model_path, run_dir) -> dict:
        """Predict validation and test cases, map predictions to the original grid, score them against the
        stored masks (spacing from the catalog); per-case table, summary with bootstrap CIs, overlay examples."""
        import keras

        import models.losses  # noqa: F401
        from medflow.metrics import segmentation_metrics, summarize_segmentation

        run_dir = Path(run_dir)
        model = keras.models.load_model(model_path, compile=False)
        two_d, patch, steps = _ndim(spec) == 2, _patch(spec), spec.steps()
        rows, slices = [], {}
        for row in cases[cases["split"].isin(["val", "test"])].to_dict("records"):
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
        per_case = pd.DataFrame(rows)
        names = spec.metric_names()
        ev = spec.evaluate
        result = {"task": self.name, "metrics": names, "bootstrap": ev.bootstrap}
        for split in ("val", "test"):
            part = summarize_segmentation(per_case[per_case["split"] == split], names, n_boot=ev.bootstrap,
                                          seed=spec.train.seed)
            result[split] = part["summary"]
            if split == "test":
                result["ci"], result["ci_method"] = part["ci"], part["ci_method"]
        result["baseline"] = _baseline(store, cases, per_case, seed=spec.train.seed, n_boot=ev.bootstrap)
        result["warnings"] = segmentation_warnings(per_case, result["baseline"])

        write_csv_atomic(run_dir / "predictions.csv", per_case)
        examples = example_slices(per_case, slices)
        if examples:
            save_npz_atomic(run_dir / "seg_examples.npz", images=examples["images"], truths=examples["truths"],
                            preds=examples["preds"], meta=np.array(json.dumps(examples["meta"])))
        write_json_atomic(run_dir / "metrics.json", result)
        t = result["test"]
        logger.info("test: Dice %.3f (median %.3f), IoU %.3f, HD95 %.1f mm on %d lesion case(s); %d of %d empty "
                    "case(s) with a false positive", t["dice"], t["dice_median"], t.get("iou", float("nan")),
                    t.get("hd95", float("nan")), t["n_lesion"], t["empty_with_false_positive"], t["n_empty"])
        return result

    def result_line(self, evaluation: dict) -> str:
        t = evaluation["test"]
        b = evaluation.get("baseline") or {}
        base = f" · baseline Dice {b['dice']:.3f}" if isinstance(b.get("dice"), float) and b["dice"] == b["dice"] else ""
        return (f"Dice {t['dice']:.3f} (median {t['dice_median']:.3f}) · IoU {t['iou']:.3f} · HD95 {t['hd95']:.1f} mm "
                f"({t.get('missed', 0)} missed) "
                f"on {t['n_lesion']} case(s) with a lesion · false positives on {t['empty_with_false_positive']} of "
                f"{t['n_empty']} without{base}")

    def report_context(self, spec, run_dir, predictions, evaluation) -> dict:
        from medflow.metrics import DISTANCE_CONVENTIONS, MISSED_LESION
        from medflow.reporting import interval_methods, plot_overlays, plot_seg_distribution, seg_metrics_rows

        examples = None
        path = Path(run_dir) / "seg_examples.npz"
        if path.exists():
            with np.load(path) as data:
                examples = {"images": data["images"], "truths": data["truths"], "preds": data["preds"],
                            "meta": json.loads(str(data["meta"]))}
        test = predictions[predictions["split"] == "test"]
        columns = ["series_key", "label", "dice", "iou", "hd95", "assd", "hd95_monai", "assd_monai", "missed",
                   "volume_true_ml", "volume_pred_ml"]
        table = [{c: (round(float(r[c]), 3) if isinstance(r[c], float) else r[c]) for c in columns if c in r}
                 for r in test.sort_values("dice").to_dict("records")]
        return {
            "metrics": seg_metrics_rows(evaluation["test"], evaluation.get("ci", {}), evaluation["metrics"]),
            "ci_methods": interval_methods(evaluation.get("ci_method", {})),
            "dice_ci": (evaluation.get("ci") or {}).get("dice"),
            "warnings": evaluation.get("warnings", []),
            "seg": evaluation["test"],
            "seg_val": evaluation.get("val", {}),
            "conventions": DISTANCE_CONVENTIONS, "missed_rule": MISSED_LESION,
            "baseline": evaluation.get("baseline"),
            "cases": table,
            "plots": {
                "distribution": plot_seg_distribution(predictions),
                "overlays": plot_overlays(examples["images"], examples["truths"], examples["preds"], examples["meta"])
                if examples else None,
            },
        }

    def markdown(self, context: dict) -> list[str]:
        t = context["seg"]
        from medflow.metrics import MISSED_LESION

        b = context.get("baseline") or {}
        base = ([f"Baseline ({b['name']}, {b['threshold']:.0f}): Dice {b['dice']:.3f} on the same test cases."]
                if b.get("dice") is not None and b["dice"] == b["dice"] else [])
        return base + [f"Means over {t['n_lesion']} test case(s) with a lesion (median Dice {t['dice_median']:.3f}); "
                f"{t['empty_with_false_positive']} of {t['n_empty']} case(s) without one got a false positive.",
                f"Missed lesions: {t.get('missed', 0)} of {t['n_lesion']} ({MISSED_LESION})."]

    def predict(self, run, store, source, output, files_of) -> list[dict]:
        """A mask per series mapped onto its source slices, as a DICOM SEG (or ``.mask.npy`` where a SEG
        cannot reference the source slices one to one)."""
        import keras

        import models.losses  # noqa: F401
        from medflow.predicting import prep_key_for, seg_supported, source_slices, write_seg

        spec = run.spec
        steps = spec.steps()
        model = keras.models.load_model(run.model_path, compile=False)
        rows = []
        for key, entry in sorted(store.catalog().items()):
            files = files_of.get(entry.get("parent", key), [])
            prob = predict_native(model, store, key, prep_key_for(store, steps, key), steps,
                                  two_d=_ndim(spec) == 2, patch=_patch(spec), batch_size=spec.train.batch_size)
            mask = prob >= 0.5
            row = {"series_key": key, "foreground_voxels": int(mask.sum()),
                   "volume_ml": float(mask.sum() * np.prod(entry["spacing"]) / 1000.0)}
            why_not = seg_supported(entry)
            if why_not:
                row["seg"] = ""
                row["note"] = f"no DICOM SEG: {why_not}"
                np.save(output / f"{key}.mask.npy", mask)
                logger.warning("predict %s: %s; mask saved as %s.mask.npy", key, row["note"], key)
            else:
                out = write_seg(source_slices(source, files, entry["direction"]), mask, output / f"{key}.seg.dcm",
                                run=run, segment_label="lesion")
                row["seg"] = out.name
            logger.info("predict %s: %d foreground voxels (%.2f mL)", key, row["foreground_voxels"], row["volume_ml"])
            rows.append(row)
        return rows

    def predict_table_columns(self) -> tuple[str, ...]:
        return ("series_key", "seg", "volume_ml", "note")


def _baseline(store, cases: pd.DataFrame, per_case: pd.DataFrame, *, seed: int, n_boot: int) -> dict:
    """The declared rule (``medflow.baselines.threshold_component``): its threshold fitted on up to 24 train
    cases with a lesion, scored on the test cases with a lesion on their original grid, like the model."""
    from medflow.baselines import SEGMENTATION_BASELINE, fit_threshold, threshold_component
    from medflow.metrics import segmentation_metrics, unit_mean_ci

    def case(key):
        entry = store.catalog_entry(key)
        truth = store.read_mask(key)
        return store.read_image(key).astype(np.float32), truth > 0, tuple(entry["spacing"])

    train = cases[(cases["split"] == "train") & (cases["label"] == 1)]["series_key"].tolist()[:24]
    test = per_case[(per_case["split"] == "test") & (per_case["label"] == 1)]["series_key"].tolist()
    if not train or not test:
        return {"name": SEGMENTATION_BASELINE, "dice": float("nan"), "note": "no lesion case in train or test"}
    threshold = fit_threshold([case(k) for k in train])
    rows = []
    for key in test:
        image, truth, spacing = case(key)
        rows.append(segmentation_metrics(truth, threshold_component(image, spacing, threshold), spacing))
    dice = np.array([r["dice"] for r in rows])
    out = {"name": SEGMENTATION_BASELINE, "threshold": threshold, "n": len(rows), "dice": float(dice.mean()),
           "dice_ci": unit_mean_ci(dice, n=n_boot, seed=seed)[0], "hd95": float(np.mean([r["hd95"] for r in rows])),
           "missed": int(sum(r["missed"] for r in rows))}
    from medflow.compare import _paired_dice

    model = per_case.set_index("series_key").loc[test, "dice"].to_numpy(float)
    try:  # the model's Dice minus the baseline's on the same cases: a paired bootstrap, Wilcoxon's p-value
        paired = _paired_dice(pd.DataFrame({"dice_a": model, "dice_b": dice}), n_boot=max(n_boot, 200), seed=seed)
        out["difference"] = {k: paired[k] for k in ("difference", "ci", "p_value", "method")}
    except ValueError as exc:
        out["difference"] = {"difference": float("nan"), "ci": None, "p_value": float("nan"), "method": str(exc)}
    d = out["difference"]
    logger.info("baseline (%s at %.0f): test Dice %.3f, HD95 %.1f mm; model − baseline %+.3f (95%% CI %s)",
                SEGMENTATION_BASELINE, threshold, out["dice"], out["hd95"], d["difference"],
                f"{d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}" if d.get("ci") else "none")
    return out
