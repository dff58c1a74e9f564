"""Classification: one class per series (a 3D volume or a 2D image), two or more classes.

Two classes keep the binary path: one sigmoid score, a decision threshold chosen on the
validation split, sensitivity and specificity. K > 2 classes get softmax probabilities, the
most probable class as the decision, per-class and macro/micro metrics and a K x K confusion
matrix. The input is 2D or 3D as the model registry says of ``model.arch``. Every report
shows a declared baseline (``medflow.baselines``) scored on the same test split.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medflow.kinds.base import TaskKind
from medflow.runs import is_interval, save_npz_atomic, write_json_atomic
from medflow.tables import write_csv_atomic

logger = logging.getLogger(__name__)

METRICS = ("auc", "accuracy", "precision", "recall", "specificity", "f1")
DICOM_KEYS = ("StudyInstanceUID", "PatientID", "AccessionNumber")


def classes_of(spec, cases: pd.DataFrame) -> list[str]:
    """The run's classes in index order (``data.labels.classes``, else sorted)."""
    from medflow.splitting import class_order

    return class_order(cases["label_name"].astype(str), spec.data.labels.classes if spec.data.labels else None)


def input_shape(arch: str, prepared_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The model input (spatial dims + channel) for arrays prepared as (Z, Y, X).

    >>> input_shape("seed_cnn", (1, 150, 150)), input_shape("cnn3d", (48, 80, 80))
    ((150, 150, 1), (48, 80, 80, 1))
    """
    from models import info

    if info(arch).ndim in (1, 2):  # an image (1, H, W), or a waveform (1, samples, leads)
        if prepared_shape[0] != 1:
            raise ValueError(f"{arch} is a {info(arch).ndim}D model, but the prepared arrays have {prepared_shape[0]} "
                             f"slices (shape {tuple(prepared_shape)}); use planar images (CR, DX, PNG/JPEG), "
                             "waveforms, or a 3D model")
        return (*prepared_shape[1:], 1)
    return (*prepared_shape, 1)


# modalities whose series are volumes, and those whose images are planar (one image per instance)
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}
PLANAR_MODALITIES = {"CR", "DX", "MG", "XA", "RF", "US", "OT"}


def shape_problems(spec) -> list[str]:
    """What the spec says about the prepared arrays against the model's input: a 2D model on volumes (no
    ``axial_slice``), a 3D model on planar images, and a 3D model without a step that fixes the shape. Known
    from the spec alone, so ``medflow validate`` says it, not a failed training minutes later."""
    from models import info

    ndim = info(spec.model.arch).ndim
    names = [name for name, _ in spec.steps()]
    modalities = set(spec.ingest.modalities or [])
    volumes = ((spec.data.format == "dicom" and modalities and modalities <= VOLUME_MODALITIES)
               or spec.data.format in ("nifti", "nrrd", "mha", "volumes")) and "axial_slice" not in names
    planar = spec.data.format == "images" or "axial_slice" in names or (
        spec.data.format == "dicom" and modalities and modalities <= PLANAR_MODALITIES)
    arch = spec.model.arch
    if ndim == 2 and volumes:
        return [f"model.arch: {arch} is a 2D model and ingest.modalities ({', '.join(sorted(modalities))}) are "
                f"volumes; add an axial_slice step, or use a 3D model ({', '.join(_archs(3))}) "
                f"(received: {arch})"]
    if ndim == 3 and planar:
        return [f"model.arch: {arch} is a 3D model and the images are planar; use a 2D model "
                f"({', '.join(_archs(2))}) (received: {arch})"]
    if ndim == 3 and not {"crop_pad", "resize"} & set(names):
        return [f"preprocess: {arch} takes arrays of one shape; add a crop_pad (or resize) step, e.g. "
                "crop_pad: {shape: [48, 80, 80]}, as the last step (received: " + (", ".join(names) or "no steps") + ")"]
    return []


def _archs(ndim: int) -> list[str]:
    from models import available, info

    return [a for a in available("classification") if info(a).ndim == ndim]


class Classification(TaskKind):
    name = "classification"
    metrics = METRICS
    template = "classification.html.j2"
    strong_baselines = ("radiomics", "hog")
    multi_worker = True

    def check_spec(self, spec) -> list[str]:
        from models import info

        problems = super().check_spec(spec)
        if "hog" in spec.evaluate.baselines and spec.model.arch and info(spec.model.arch).ndim != 2:
            problems.append(f"evaluate.baselines: hog describes 2D images; {spec.model.arch} takes volumes (use "
                            "radiomics)")
        labels = spec.data.labels
        if labels is None and spec.data.format == "dicom":
            problems.append("data.labels: classification of DICOM studies needs data.labels (a CSV keyed by "
                            f"{', '.join(DICOM_KEYS)})")
        if labels is not None and labels.key == "path" and spec.data.format == "dicom":
            problems.append("data.labels.key: `path` lists image or volume files; it needs data.format: images, "
                            "nifti, nrrd, mha or volumes")
        return problems

    def preflight(self, spec) -> list[str]:
        return shape_problems(spec)

    # -------------------------------------------------------------- cohort
    def cohort(self, spec, store) -> pd.DataFrame:
        from medflow.splitting import catalog_labels, join_labels

        catalog = store.catalog()
        lab = spec.data.labels
        if lab is not None and lab.key in DICOM_KEYS:
            table = pd.read_csv(lab.path, dtype=str, keep_default_na=True)
            df = join_labels(catalog, table, key=lab.key, key_column=lab.key_column_name,
                             label_column=lab.label_column, pseudo=store.pseudonymizer(),
                             split_column=spec.data.split.column if spec.data.split.from_ == "column" else None)
            if df.empty:
                raise ValueError(f"no series in the store matches a row of {lab.path} by {lab.key}; check "
                                 "data.labels.key")
        else:
            df = catalog_labels(catalog)
            if df.empty:
                raise ValueError("no image in the store has a class; use class folders or data.labels with key: path")
        classes = classes_of(spec, df)
        if len(classes) < 2:
            raise ValueError(f"the labelled cases hold one class only ({classes}); classification needs two or more")
        df["label"] = df["label_name"].map({c: i for i, c in enumerate(classes)}).astype(int)
        counts = df["label_name"].value_counts()
        logger.info("cohort: %d series, classes %s", len(df), ", ".join(f"{c} {int(counts.get(c, 0))}"
                                                                       for c in classes))
        return df

    def class_names(self, evaluation: dict) -> list[str]:
        return list(evaluation.get("classes", ["0", "1"]))

    # --------------------------------------------------------------- train
    def train(self, spec, store, prep_key, cases, run_dir, on_epoch) -> dict:
        from models.training import train_classifier

        tr, va = cases[cases["split"] == "train"], cases[cases["split"] == "val"]
        shapes = {tuple(store.prep_ref(prep_key, k).open().shape) for k in cases["series_key"]}
        if len(shapes) != 1:
            raise ValueError(f"prepared arrays differ in shape ({sorted(shapes)[:3]}...); end `preprocess` with a "
                             "`resize`, `resize2d` or `crop_pad` step so that every array has the same shape")
        return train_classifier(
            loader=functools.partial(store.read_prep, prep_key),  # pickles: multi_worker sends it to workers
            train_keys=tr["series_key"].tolist(), train_labels=tr["label"].to_numpy(np.int64),
            val_keys=va["series_key"].tolist(), val_labels=va["label"].to_numpy(np.int64),
            input_shape=input_shape(spec.model.arch, shapes.pop()), arch=spec.model.arch, params=spec.model.params,
            n_classes=len(classes_of(spec, cases)), train=spec.train.model_dump(), augment=spec.augment.model_dump(),
            run_dir=run_dir, on_epoch=on_epoch,
        )

    # ------------------------------------------------------------ evaluate
    def evaluate(self, spec, store, prep_key, cases, model_path, run_dir) -> dict:
        """Predict every split; choose the threshold (binary) on validation; score the test split, with
        bootstrap intervals, beside the declared baseline; Grad-CAM for a few test cases."""
        from medflow.metrics import classification_warnings
        from models.training import predict

        run_dir = Path(run_dir)
        df = cases.copy()
        classes = classes_of(spec, df)
        loader = lambda k: store.read_prep(prep_key, k)  # noqa: E731
        scores = predict(model_path, loader, df["series_key"].tolist(), batch_size=spec.train.batch_size)
        ev = spec.evaluate
        names = spec.metric_names()
        scores, calibration = _calibrate(df, scores, ev.calibrate, bins=ev.calibration_bins)
        if len(classes) == 2:
            df["score"] = scores
            result = _binary_evaluation(df, threshold_method=ev.threshold, metric_names=names,
                                        bootstrap=ev.bootstrap, seed=spec.train.seed)
            df["prediction"] = (df["score"] >= result["threshold"]).astype(int)
            df["confidence"] = np.where(df["prediction"] == 1, df["score"], 1 - df["score"])
        else:
            result = _multiclass_evaluation(df, scores, classes, metric_names=names, bootstrap=ev.bootstrap,
                                            seed=spec.train.seed)
            for i, c in enumerate(classes):
                df[f"p_{c}"] = scores[:, i]
            df["prediction"] = scores.argmax(axis=1)
            df["confidence"] = scores.max(axis=1)
        df["prediction_name"] = [classes[i] for i in df["prediction"]]
        result.update({"task": self.name, "classes": classes, "n_classes": len(classes), "metrics": names,
                       "bootstrap": ev.bootstrap, "calibration": calibration})
        feature = np.array([self.baseline_feature(store, prep_key, k) for k in df["series_key"]])
        result["baseline"] = _baseline(df, feature, classes, name=self.baseline_name, bootstrap=ev.bootstrap,
                                       seed=spec.train.seed)
        # the baseline's test scores beside the model's (the report draws its curves from them)
        base_proba, test_rows = result["baseline"].pop("test_proba"), (df["split"] == "test").to_numpy()
        for i, c in enumerate(classes if len(classes) > 2 else classes[1:]):
            column = np.full(len(df), np.nan)
            column[test_rows] = base_proba[:, i if len(classes) > 2 else 1]
            df["baseline_score" if len(classes) == 2 else f"baseline_p_{c}"] = column
        result["strong_baselines"] = self._strong_baselines(spec, store, prep_key, df, scores, classes)
        result["warnings"] = classification_warnings(df, len(classes), result["val"]["auc"])
        chance = _chance_warning(spec, run_dir, df, len(classes))
        if chance:
            result["warnings"].append(chance)
        from models.ensemble import manifest_of

        manifest = manifest_of(model_path)
        if manifest is None:
            dead = _dead_units_warning(model_path, loader, df, spec.train.batch_size)
            if dead:
                result["warnings"].append(dead)
        if manifest:
            result["folds"] = _fold_metrics(manifest, Path(model_path).parent, loader, df, classes,
                                            batch_size=spec.train.batch_size, calibrator=calibration["map"])
            f = result["folds"]
            logger.info("%d folds: test AUC %.3f ± %.3f (mean ± SD of the fold models); the ensemble's %.3f",
                        len(f["per_fold"]), f["test_auc_mean"], f["test_auc_sd"], result["test"]["auc"])
        write_csv_atomic(run_dir / "predictions.csv", df)
        result["explanation"] = self.explain(model_path, loader, df, run_dir)
        write_json_atomic(run_dir / "metrics.json", result)
        logger.info("test: %s", self.result_line(result))
        for warning in result["warnings"]:
            logger.warning("%s", warning)
        if np.isnan(result["test"]["auc"]):
            logger.warning("the test split lacks a class: AUC is undefined; use a larger cohort or split.test")
        return result

    def _strong_baselines(self, spec, store, prep_key: str, df: pd.DataFrame, scores: np.ndarray,
                          classes: list[str]) -> list[dict]:
        """Each of ``evaluate.baselines`` fitted outside the test split, scored on it, and the model's paired
        difference to it."""
        import time

        from medflow.metrics import binary_intervals, multiclass_metrics
        from medflow.strong_baselines import DESCRIPTIONS, fit_and_score, paired_difference
        from sklearn.metrics import roc_auc_score

        out = []
        test = (df["split"] == "test").to_numpy()
        y, patients = df["label"].to_numpy(int), df["patient_key"].to_numpy()
        model = np.asarray(scores, float)
        model = np.column_stack([1 - model, model]) if model.ndim == 1 else model
        for name in spec.evaluate.baselines:
            t0 = time.perf_counter()
            features = np.array([self.strong_feature(name, store, prep_key, k) for k in df["series_key"]])
            proba = fit_and_score(name, features, y, patients, test, len(classes), spec.train.seed)
            yt = y[test]
            if len(classes) == 2:
                auc = float(roc_auc_score(yt, proba[:, 1])) if len(np.unique(yt)) == 2 else float("nan")
                ci_all, _ = binary_intervals(yt, proba[:, 1], 0.5, patients[test], metrics=["auc"],
                                             n=spec.evaluate.bootstrap, seed=spec.train.seed)
                ci = ci_all.get("auc")
            else:
                auc = multiclass_metrics(yt, proba, classes)["auc"]
                ci = macro_auc_interval(yt, proba, classes, auc, n=spec.evaluate.bootstrap, seed=spec.train.seed)
            paired = paired_difference(yt, model[test], proba, patients[test], classes, n_boot=spec.evaluate.bootstrap,
                                       seed=spec.train.seed)
            out.append({"name": name, "description": DESCRIPTIONS[name], "auc": auc, "ci": ci, "features":
                        int(features.shape[1]), "seconds": round(time.perf_counter() - t0, 1), "vs_model": paired})
            logger.info("baseline %s (%s): test AUC %.3f; model − baseline %+.3f (95%% CI %s)", name,
                        DESCRIPTIONS[name], auc, paired["difference"],
                        "–".join(f"{v:+.3f}" for v in paired["ci"]) if paired.get("ci") else "none")
        return out

    # the declared baseline, and the explanation of a few test cases
    @property
    def baseline_name(self) -> str:
        from medflow.baselines import CLASSIFICATION_BASELINE

        return CLASSIFICATION_BASELINE

    def baseline_feature(self, store, prep_key: str, key: str) -> np.ndarray | float:
        from medflow.baselines import intensity_features

        return intensity_features(store.read_prep(prep_key, key))

    def strong_feature(self, name: str, store, prep_key: str, key: str) -> np.ndarray:
        """The features of ``evaluate.baselines`` entry ``name`` for one case (``medflow.strong_baselines``)."""
        from medflow.strong_baselines import hog_features, radiomics_features

        array = np.asarray(store.read_prep(prep_key, key))  # a volume (D, H, W) or an image (1, H, W)
        return hog_features(array) if name == "hog" else radiomics_features(array)

    def explain(self, model_path: str, loader, df: pd.DataFrame, run_dir: Path) -> dict | None:
        """Heat maps of a few test cases into ``explain.npz``; returns the explanation's record
        (``models.explain.explain_isolated``), or None when there was nothing to explain."""
        return _explain(model_path, loader, df, run_dir)

    def result_line(self, evaluation: dict) -> str:
        t, b = evaluation["test"], evaluation.get("baseline", {})
        base = f" · baseline AUC {b['auc']:.3f}" if b else ""
        for strong in evaluation.get("strong_baselines") or []:
            base += f" · {strong['name']} AUC {strong['auc']:.3f}"
        if evaluation.get("n_classes", 2) == 2:
            return (f"AUC {t['auc']:.3f} · accuracy {t['accuracy']:.3f} · sensitivity {t['recall']:.3f} · "
                    f"specificity {t['specificity']:.3f} (n={t['n']}){base}")
        per_class = ", ".join(f"{r['class']} {r['auc']:.3f}" for r in t["per_class"])
        return (f"macro AUC {t['auc']:.3f} (micro {t['auc_micro']:.3f}; {per_class}) · accuracy "
                f"{t['accuracy']:.3f} · macro F1 {t['f1']:.3f} (n={t['n']}){base}")

    # -------------------------------------------------------------- report
    def report_context(self, spec, run_dir, predictions, evaluation) -> dict:
        from medflow import reporting as r
        from medflow.subgroups import binary_scores, multiclass_scores, subgroup_rows

        classes = self.class_names(evaluation)
        test = predictions[predictions["split"] == "test"]
        y = test["label"].to_numpy(int)
        m = evaluation["test"]
        explain = None
        path = Path(run_dir) / "explain.npz"
        if path.exists():
            with np.load(path) as data:
                if "cams" in data:  # Grad-CAM of images (a kind built on this one may save other examples)
                    explain = {"images": data["images"], "cams": data["cams"], "meta": json.loads(str(data["meta"]))}
        context = {
            "binary": len(classes) == 2,
            "classes": classes,
            "metrics": r.metrics_rows(m, evaluation.get("ci", {}), evaluation["metrics"],
                                      macro=len(classes) > 2),
            "baseline": _with_interval(evaluation.get("baseline")),
            "strong_baselines": [{**_with_interval(b), "vs_model": {**b["vs_model"], "ci": _interval_or_none(
                b["vs_model"].get("ci"))}} for b in evaluation.get("strong_baselines") or []],
            "model_auc": m["auc"],
            "model_auc_ci": _interval_or_none(evaluation.get("ci", {}).get("auc")),
            "ci_methods": r.interval_methods(evaluation.get("ci_method", {})),
            "warnings": evaluation.get("warnings", []),
            "val": evaluation.get("val", {}),
            "calibration": _calibration_context(evaluation.get("calibration"), binary=len(classes) == 2),
            "folds": _folds_context(evaluation.get("folds")),
            "plots": {"gradcam": r.plot_gradcam(explain["images"], explain["cams"], explain["meta"])
                      if explain else None},
            "explanation": evaluation.get("explanation"),
        }
        context["subgroups"] = subgroup_rows(test, binary_scores(evaluation["threshold"]) if len(classes) == 2
                                             else multiclass_scores)
        if context["subgroups"]:
            context.setdefault("tables", {})["subgroups"] = {"rows": context["subgroups"], "description":
                                                             "test metrics per manufacturer, slice thickness, sex "
                                                             "and age band"}
        if context["folds"]:
            context.setdefault("tables", {})["folds"] = {"rows": context["folds"]["rows"], "description":
                                                         "each fold model on its held-out fold and on the test split"}
        if len(classes) == 2:
            s, thr = test["score"].to_numpy(), evaluation["threshold"]
            context.update({"threshold": thr, "confusion": m["confusion"],
                            "threshold_method": evaluation.get("threshold_method"),
                            "threshold_stability": evaluation.get("threshold_stability"),
                            "operating_points": evaluation.get("operating_points") or []})
            two = len(np.unique(y)) == 2
            base = evaluation.get("baseline")
            base = {"name": base["name"], "auc": base["auc"], "scores": test["baseline_score"].to_numpy()} \
                if base and "baseline_score" in test and test["baseline_score"].notna().all() else None
            context["plots"].update({
                "roc": r.plot_roc(y, s, m["auc"], threshold=thr, baseline=base) if two else None,
                "pr": r.plot_pr(y, s, threshold=thr, baseline=base) if two else None,
                "confusion": r.plot_confusion(y, (s >= thr).astype(int), classes, title=f"threshold {thr:.3f}"),
                "scores": r.plot_scores(y, s, thr),
            })
        else:
            proba = test[[f"p_{c}" for c in classes]].to_numpy()
            context.update({"per_class": r.per_class_rows(m["per_class"]), "auc_micro": m["auc_micro"]})
            context.setdefault("tables", {})["per-class"] = {"rows": context["per_class"], "description":
                                                             "test metrics per class (one vs rest)"}
            context["plots"].update({
                "roc": r.plot_roc_ovr(y, proba, classes),
                "confusion": r.plot_confusion(y, proba.argmax(axis=1), classes, title="most probable class"),
            })
        return context

    def markdown(self, context: dict) -> list[str]:
        lines = []
        b = context.get("baseline")
        if b:
            lines.append(f"Baseline ({b['name']}): AUC {b['auc']:.3f}"
                         + (f" (95% CI {b['ci'][0]:.3f} – {b['ci'][1]:.3f})" if is_interval(b.get("ci")) else "") + ".")
        if context.get("folds"):
            lines.append(f"k-fold: {context['folds']['summary']}; the test metrics above are the ensemble's "
                         "(mean probability of the fold models).")
        cal = context.get("calibration")
        if cal:
            test = next(r for r in cal["rows"] if r["split"] == "test")
            lines.append(f"Calibration on test: Brier {test['brier']}, ECE {test['ece']}"
                         + (f"; after {cal['method']} scaling (fitted on validation): Brier {test['brier_calibrated']}, "
                            f"ECE {test['ece_calibrated']}" if cal["method"] != "none" else "") + ".")
        if context["binary"]:
            c = context["confusion"]
            lines.append(f"Threshold {context['threshold']:.3f} (chosen on validation). "
                         f"Confusion: TP {c['tp']}, FP {c['fp']}, FN {c['fn']}, TN {c['tn']}.")
        else:
            lines += ["", "| class | n | precision | recall | F1 | AUC (one vs rest) |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['class']} | {r['support']} | {r['precision']} | {r['recall']} | {r['f1']} | {r['auc']} |"
                      for r in context["per_class"]]
        return lines

    # ------------------------------------------------------------- predict
    def predict(self, run, store, source, output, files_of) -> list[dict]:
        """A score per series (binary: the positive class's score and the decision at the run's
        validation threshold; K classes: one probability per class and the most probable class)."""
        import keras

        from medflow.preprocessing import apply_steps

        from medflow.calibration import apply_calibrator

        classes = self.class_names(run.metrics)
        calibrator = (run.metrics.get("calibration") or {}).get("map")
        model = keras.models.load_model(run.model_path, compile=False)
        spatial = tuple(model.input_shape[1:-1])
        rows = []
        for key, entry in sorted(store.catalog().items()):
            image, _ = apply_steps(store.read_image(key), entry["spacing"], run.spec.steps(), leads=entry.get("leads"))
            if int(np.prod(image.shape)) != int(np.prod(spatial)):
                rows.append({"series_key": key, "note": f"prepared shape {image.shape} does not fit the model's "
                             f"input {spatial}"})
                continue
            out = np.asarray(model.predict(image.reshape(spatial)[None, ..., None], verbose=0), dtype=float)[0]
            if calibrator:  # the map the run fitted on its validation split
                out = apply_calibrator(calibrator, out[:1] if len(classes) == 2 else out[None]).reshape(-1)
            row = {"series_key": key}
            if len(classes) == 2:
                threshold = run.metrics.get("threshold", 0.5)
                score = float(out[0])
                row.update({"score": score, "threshold": threshold, "prediction": classes[int(score >= threshold)]})
            else:
                row.update({f"p_{c}": float(p) for c, p in zip(classes, out)})
                row["prediction"] = classes[int(out.argmax())]
            logger.info("predict %s: %s", key, row["prediction"])
            rows.append(row)
        return rows

    def predict_table_columns(self) -> tuple[str, ...]:
        return ("series_key", "score", "prediction", "note")


# ----------------------------------------------------------------- helpers
def _fold_metrics(manifest: dict, run_dir: Path, loader, df: pd.DataFrame, classes: list[str], *, batch_size: int,
                  calibrator: dict | None) -> dict:
    """Each fold model's AUC on its own held-out fold and on the test split, and their mean ± SD."""
    from medflow.calibration import apply_calibrator
    from medflow.metrics import binary_summary, multiclass_metrics
    from models.training import predict

    test = df[df["split"] == "test"]
    y_test = test["label"].to_numpy(int)
    rows = []

    def auc(y, s):
        if len(np.unique(y)) < 2:
            return float("nan")
        return binary_summary(y, s, 0.5)["auc"] if len(classes) == 2 else multiclass_metrics(y, s, classes)["auc"]

    for fold, member in enumerate(manifest["models"]):
        scores = apply_calibrator(calibrator, predict(run_dir / member, loader, test["series_key"].tolist(),
                                                      batch_size=batch_size))
        held = df[df["series_key"].isin(set(manifest["held_out"][fold]))]
        held_scores = held["score"].to_numpy() if len(classes) == 2 else held[[f"p_{c}" for c in classes]].to_numpy()
        rows.append({"fold": fold, "n_held_out": int(len(held)), "held_out_auc": auc(held["label"].to_numpy(int),
                                                                                    held_scores),
                     "test_auc": auc(y_test, scores), **manifest["per_fold"][fold]})
    test_aucs = np.array([r["test_auc"] for r in rows], dtype=float)
    held_aucs = np.array([r["held_out_auc"] for r in rows], dtype=float)
    return {"per_fold": rows, "test_auc_mean": float(np.nanmean(test_aucs)),
            "test_auc_sd": float(np.nanstd(test_aucs, ddof=1)), "held_out_auc_mean": float(np.nanmean(held_aucs)),
            "held_out_auc_sd": float(np.nanstd(held_aucs, ddof=1))}


def _calibrate(df: pd.DataFrame, scores: np.ndarray, method: str, *, bins: int) -> tuple[np.ndarray, dict]:
    """Scores through the calibration map fitted on the validation rows (``method`` none: unchanged),
    with Brier score, ECE and reliability bins on validation and test, before and after."""
    from medflow.calibration import apply_calibrator, calibration_summary, fit_calibrator

    y = df["label"].to_numpy(int)
    binary = scores.ndim == 1 or scores.shape[1] == 1
    raw = scores.reshape(-1) if binary else scores
    val, test = (df["split"] == "val").to_numpy(), (df["split"] == "test").to_numpy()
    out = {"method": method, "bins": bins,
           "before": {name: calibration_summary(y[rows], raw[rows], bins=bins)
                      for name, rows in (("val", val), ("test", test))}}
    if method == "none":
        return scores, {**out, "map": None, "after": out["before"]}
    calibrator = fit_calibrator(method, y[val], raw[val])
    calibrated = apply_calibrator(calibrator, raw)
    out.update({"map": calibrator, "after": {name: calibration_summary(y[rows], calibrated[rows], bins=bins)
                                               for name, rows in (("val", val), ("test", test))}})
    t0, t1 = out["before"]["test"], out["after"]["test"]
    logger.info("calibration (%s, fitted on validation): test Brier %.3f -> %.3f, ECE %.3f -> %.3f", method,
                t0["brier"], t1["brier"], t0["ece"], t1["ece"])
    df["score_uncalibrated" if binary else "top_uncalibrated"] = raw if binary else raw.max(axis=1)
    return calibrated, out


def _folds_context(folds: dict | None) -> dict | None:
    if not folds:
        return None
    fmt = lambda v: "–" if v is None or v != v else f"{v:.3f}"  # noqa: E731
    rows = [{"fold": r["fold"] + 1, "held out": r["n_held_out"], "epochs": r["epochs_run"],
             "best val_loss": fmt(r["best_val_loss"]), "held-out AUC": fmt(r["held_out_auc"]),
             "test AUC": fmt(r["test_auc"])} for r in folds["per_fold"]]
    return {"rows": rows, "summary": f"test AUC {fmt(folds['test_auc_mean'])} ± {fmt(folds['test_auc_sd'])}, "
            f"held-out AUC {fmt(folds['held_out_auc_mean'])} ± {fmt(folds['held_out_auc_sd'])} (mean ± SD over "
            f"{len(rows)} fold models)"}


def _calibration_context(calibration: dict | None, *, binary: bool) -> dict | None:
    from medflow import reporting as r

    if not calibration:
        return None
    curves = {"model scores": calibration["before"]["test"]["bins"]}
    if calibration["method"] != "none":
        curves = {"before": curves["model scores"], f"after {calibration['method']}": calibration["after"]["test"]["bins"]}
    return {"method": calibration["method"], "bins": calibration["bins"], "map": calibration.get("map"),
            "rows": r.calibration_rows(calibration), "plot": r.plot_reliability(curves, binary=binary)}


def _chance_warning(spec, run_dir: Path, df: pd.DataFrame, n_classes: int) -> str | None:
    """``metrics.chance_loss_warning`` on the run's training history (none for k-fold runs: each fold has its own)."""
    from medflow.metrics import chance_loss_warning
    from models.training import read_history

    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return None
    losses = read_history(path).get("loss", [])
    train = df.loc[df["split"] == "train", "label"].to_numpy(int)
    prior = (np.bincount(train, minlength=n_classes) / max(len(train), 1)).tolist()
    return chance_loss_warning(losses, n_classes, prior, class_weighted=spec.train.class_weight == "balanced")


def _dead_units_warning(model_path, loader, df: pd.DataFrame, batch_size: int) -> str | None:
    """``metrics.dead_units_warning`` on the validation cases (the test cases are not looked at)."""
    from medflow.metrics import dead_units_warning
    from models.training import dense_activity

    keys = df.loc[df["split"] == "val", "series_key"].tolist()
    return dead_units_warning(dense_activity(model_path, loader, keys, batch_size=batch_size))


def macro_auc_interval(y, proba, classes: list[str], auc: float, *, n: int, seed: int):
    """The macro AUC's 95% interval: a percentile bootstrap over cases, or, where it cannot vary (at 1.0 or 0.0),
    the classes' one-vs-rest Newcombe intervals averaged (``multiclass_bound_interval``)."""
    from medflow.metrics import multiclass_bound_interval, multiclass_ci

    ci = multiclass_ci(y, proba, classes, metrics=["auc"], n=n, seed=seed).get("auc")
    if n and (auc in (0.0, 1.0) or (is_interval(ci) and ci[0] == ci[1])):
        bound = multiclass_bound_interval("auc", auc, y, np.asarray(proba).argmax(axis=1), len(classes), proba=proba)
        ci = list(bound) if bound is not None else ci
    return ci


def _interval_or_none(value):
    return value if is_interval(value) else None


def _with_interval(baseline: dict | None) -> dict | None:
    return {**baseline, "ci": _interval_or_none(baseline.get("ci"))} if baseline else None


def _binary_evaluation(df: pd.DataFrame, *, threshold_method, metric_names: list[str], bootstrap: int,
                       seed: int) -> dict:
    """Threshold from the validation rows; metrics and bootstrap intervals on the test rows."""
    from medflow.metrics import binary_intervals, binary_metrics, choose_threshold, operating_points, stable_threshold

    val, test = df[df["split"] == "val"], df[df["split"] == "test"]
    stability = stable_threshold(val["label"], val["score"], val["patient_key"], seed=seed)
    thr = stability["threshold"] if threshold_method == "youden_median" else \
        choose_threshold(val["label"], val["score"], threshold_method)
    ci, method = binary_intervals(test["label"], test["score"], thr, test["patient_key"], metrics=metric_names,
                                  n=bootstrap, seed=seed)
    return {
        "threshold": thr,
        "threshold_method": threshold_method,
        # how far a resample of the validation patients moves Youden's threshold (whatever the method)
        "threshold_stability": stability,
        "operating_points": operating_points(val["label"], val["score"], test["label"], test["score"]),
        "val": binary_metrics(val["label"], val["score"], thr),
        "test": binary_metrics(test["label"], test["score"], thr),
        "ci": ci,
        "ci_method": method,
    }


def _multiclass_evaluation(df: pd.DataFrame, proba: np.ndarray, classes: list[str], *, metric_names: list[str],
                           bootstrap: int, seed: int) -> dict:
    from medflow.metrics import multiclass_ci, multiclass_metrics

    out = {}
    for split in ("val", "test"):
        rows = (df["split"] == split).to_numpy()
        out[split] = multiclass_metrics(df["label"].to_numpy()[rows], proba[rows], classes)
    rows = (df["split"] == "test").to_numpy()
    y_test = df["label"].to_numpy()[rows]
    out["ci"] = multiclass_ci(y_test, proba[rows], classes, metrics=[*metric_names, "auc_micro"], n=bootstrap,
                              seed=seed)
    out["ci_method"] = {name: "case bootstrap, percentile" for name in out["ci"]}
    from medflow.metrics import multiclass_bound_interval

    for name in dict.fromkeys([*metric_names, *out["ci"]]):
        value, interval = out["test"].get(name), out["ci"].get(name)
        # at 0 or 1, or for a model that gives every case one class, the resamples cannot move a metric
        collapsed = interval is not None and len(interval) == 2 and interval[0] == interval[1]
        if isinstance(value, float) and (value in (0.0, 1.0) or collapsed):
            bound = multiclass_bound_interval(name, value, y_test, proba[rows].argmax(axis=1), len(classes),
                                              proba=proba[rows] if name == "auc" else None)
            if bound is not None:
                out["ci"][name] = list(bound)
                out["ci_method"][name] = "the classes' one-vs-rest Wilson (Newcombe for AUC) intervals, averaged " \
                                         "(the bootstrap cannot vary)"
    return out


def _baseline(df: pd.DataFrame, feature: np.ndarray, classes: list[str], *, name: str, bootstrap: int,
              seed: int) -> dict:
    """The declared baseline fitted outside the test split, scored on test (AUC; macro one-vs-rest for K > 2)."""
    from medflow.baselines import feature_logistic
    from medflow.metrics import binary_intervals, multiclass_metrics
    from sklearn.metrics import roc_auc_score

    # fitted on every case outside the test split (a baseline has nothing to select on validation)
    train, test = (df["split"] != "test").to_numpy(), (df["split"] == "test").to_numpy()
    y = df["label"].to_numpy(int)
    proba = feature_logistic(feature[train], y[train], feature[test], len(classes))
    yt = y[test]
    if len(classes) == 2:
        auc = float(roc_auc_score(yt, proba[:, 1])) if len(np.unique(yt)) == 2 else float("nan")
        ci_all, how = binary_intervals(yt, proba[:, 1], 0.5, df["patient_key"].to_numpy()[test], metrics=["auc"],
                                       n=bootstrap, seed=seed)
        ci, method = ci_all.get("auc"), how.get("auc")
    else:
        auc = multiclass_metrics(yt, proba, classes)["auc"]
        ci = macro_auc_interval(yt, proba, classes, auc, n=bootstrap, seed=seed)
        method = "case bootstrap, percentile"
    logger.info("baseline (%s): test AUC %.3f", name, auc)
    return {"name": name, "auc": auc, "ci": ci, "ci_method": method, "test_proba": proba}


def _explain(model_path: str, loader, df: pd.DataFrame, run_dir: Path) -> dict | None:
    """Grad-CAM for a few test cases (errors first) into ``explain.npz``, for the report, computed in a
    child process: if it crashes, the cases are kept without heat maps and the record says why."""
    from models.explain import explain_cases, select_cases

    rows = df[df["split"] == "test"][["series_key", "label", "label_name", "prediction", "prediction_name",
                                      "confidence"]].to_dict("records")
    chosen = select_cases(rows)
    if not chosen:
        return None
    cases, record = explain_cases(model_path, loader, chosen)
    meta = [{k: (c[k].item() if hasattr(c[k], "item") else c[k]) for k in
             ("series_key", "label_name", "prediction_name", "confidence", "z")} for c in cases]
    arrays = {"images": np.stack([c["image"] for c in cases]), "meta": np.array(json.dumps(meta))}
    if record["status"] == "ok":
        arrays["cams"] = np.stack([c["cam"] for c in cases])
        logger.info("Grad-CAM for %d test case(s)", len(cases))
    save_npz_atomic(run_dir / "explain.npz", **arrays)
    return {**record, "cases": meta}
