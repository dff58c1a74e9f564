"""Detection: lesion centres and diameters per series (marks from DICOM SR or a CSV), a CenterNet-style
3D detector, FROC and CPM against a declared baseline, DICOM SR and CSV out of ``medflow predict``.

Marks are stored with each series on its own voxel grid (``storage.marks``). Training maps them
through the preprocessing geometry onto the model's grid; evaluation maps detections back onto
the series' grid and into patient coordinates (mm), where hits are decided, so the metrics do
not depend on the model's resolution.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medflow.intervals import WILSON_MEAN
from medflow.kinds.base import TaskKind
from medflow.runs import write_json_atomic
from medflow.tables import write_csv_atomic

logger = logging.getLogger(__name__)

DET_METRICS = ("cpm", "sens_0.125", "sens_0.25", "sens_0.5", "sens_1", "sens_2", "sens_4", "sens_8")
OPERATING_FP = 1.0  # false positives per scan of the operating point chosen on validation
# a TID 1500 report needs at least one measurement group: a series without a detection gets no SR, and says so
NO_DETECTION = "no detection at or above the threshold: no SR written"
NEARBY_MM = 10.0  # detections closer than this (or than their radius) to a better one are the same lesion


# ------------------------------------------------------------------ geometry
def _crop_offset(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Where ``crop_pad`` puts index 0 of its output on its input, per axis (negative where it pads)."""
    return np.where(before >= after, (before - after) // 2, -((after - before) // 2))


def to_model_grid(zyx, trace) -> np.ndarray:
    """A point (array index on the stored grid) through the geometric preprocessing steps of ``shape_trace``:
    resampling and resizing scale about voxel centres (half-voxel convention of the resamplers), crop/pad shifts.

    >>> to_model_grid([1.0, 1.0, 1.0], [("resample", {}, (4, 4, 4), (8, 8, 2)), ("crop_pad", {}, (8, 8, 2), (6, 8, 4))]).tolist()
    [1.5, 2.5, 1.25]
    """
    p = np.asarray(zyx, dtype=float)
    for name, _kwargs, before, after in trace:
        before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
        if name == "crop_pad":
            p = p - _crop_offset(before, after)
        elif name in ("resample", "resize"):
            p = (p + 0.5) * after / before - 0.5
        else:
            raise ValueError(f"detection cannot map lesion marks through preprocessing step {name!r}")
    return p


def to_source_grid(zyx, trace) -> np.ndarray:
    """``to_model_grid``'s inverse: a model-grid point back onto the stored series' grid.

    >>> to_source_grid([1.5, 2.5, 1.25], [("resample", {}, (4, 4, 4), (8, 8, 2)), ("crop_pad", {}, (8, 8, 2), (6, 8, 4))]).tolist()
    [1.0, 1.0, 1.0]
    """
    p = np.asarray(zyx, dtype=float)
    for name, _kwargs, before, after in reversed(trace):
        before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
        if name == "crop_pad":
            p = p + _crop_offset(before, after)
        elif name in ("resample", "resize"):
            p = (p + 0.5) * before / after - 0.5
        else:
            raise ValueError(f"detection cannot map detections back through preprocessing step {name!r}")
    return p


def _trace(entry: dict, steps):
    from medflow.preprocessing import shape_trace

    return shape_trace(entry["shape"], entry["spacing"], steps)


def truth_lesions(entry: dict) -> list[dict]:
    """A series' stored marks in patient coordinates: ``{"xyz", "diameter_mm"}``."""
    from storage.marks import to_patient

    return [{"xyz": to_patient(m["zyx"], entry["spacing"], entry["origin"], entry["direction"]).tolist(),
             "diameter_mm": float(m["diameter_mm"])} for m in entry.get("marks") or []]


def model_lesions(entry: dict, steps) -> list[dict]:
    """A series' marks on the model's grid: ``{"zyx", "diameter_mm"}``."""
    trace = _trace(entry, steps)
    return [{"zyx": to_model_grid(m["zyx"], trace).tolist(), "diameter_mm": float(m["diameter_mm"])}
            for m in entry.get("marks") or []]


def to_detections(candidates: list[dict], entry: dict, steps, *, sizes: np.ndarray | None = None) -> list[dict]:
    """Model-grid candidates (``zyx``, ``score``) as detections in patient coordinates, best first, with
    candidates near a better one dropped: ``{"xyz", "diameter_mm", "score"}``."""
    from storage.marks import to_patient

    trace = _trace(entry, steps)
    out: list[dict] = []
    for c in sorted(candidates, key=lambda c: -c["score"]):
        xyz = to_patient(to_source_grid(c["zyx"], trace), entry["spacing"], entry["origin"], entry["direction"])
        diameter = float(sizes[tuple(int(round(v)) for v in c["index"])]) if sizes is not None else 0.0
        if any(np.linalg.norm(xyz - np.asarray(d["xyz"])) < max(NEARBY_MM, d["diameter_mm"] / 2) for d in out):
            continue
        out.append({"xyz": [float(v) for v in xyz], "diameter_mm": max(diameter, 0.0), "score": float(c["score"])})
    return out


# -------------------------------------------------------------------- kind
class Detection(TaskKind):
    name = "detection"
    metrics = DET_METRICS
    template = "detection.html.j2"

    def check_spec(self, spec) -> list[str]:
        from models import info

        problems = super().check_spec(spec)
        if spec.data.marks is None:
            problems.append("data.marks: model.task detection needs data.marks (DICOM SR or a CSV of lesion marks)")
        if info(spec.model.arch).ndim != 3:
            problems.append(f"model.arch: detection takes a 3D model (received {spec.model.arch!r})")
        if not spec.train.patch_size or len(spec.train.patch_size) != 3:
            problems.append(f"train.patch_size: detection trains on 3D patches: give z, y, x (received "
                            f"{spec.train.patch_size})")
        bad = [name for name, _ in spec.steps() if name in ("axial_slice", "resize2d")]
        if bad:
            problems.append(f"preprocess: detection works on volumes; remove {', '.join(bad)}")
        if spec.data.split.folds:
            problems.append(f"data.split.folds: k-fold ensembles are built for classification and signal runs "
                            f"(received folds: {spec.data.split.folds})")
        if spec.evaluate.calibrate != "none":
            problems.append(f"evaluate.calibrate: calibrates class scores; detection scores are ranked by FROC "
                            f"(received {spec.evaluate.calibrate!r})")
        return problems

    def cohort(self, spec, store) -> pd.DataFrame:
        rows = []
        catalog = store.catalog()
        for key, entry in sorted(catalog.items()):
            if "marks" not in entry or entry.get("kind", "volume") != "volume":
                continue
            n = len(entry["marks"])
            rows.append({"series_key": key, "patient_key": entry["patient_key"], "study_key": entry["study_key"],
                         "label": int(n > 0), "label_name": "lesion" if n else "no lesion", "n_lesions": n})
        if not rows:
            raise ValueError("no series in the store was ingested with lesion marks; check data.marks (its source "
                             "and the quarantine table)")
        df = pd.DataFrame(rows)
        logger.info("detection cohort: %d series, %d with lesions (%d lesions)", len(df), int(df["label"].sum()),
                    int(df["n_lesions"].sum()))
        pointless = sum(1 for key in df["series_key"] for m in catalog[key]["marks"] if not m["diameter_mm"] > 0)
        if pointless:  # a hit is a detection within the lesion's radius: a point mark can never be hit
            logger.warning("%d lesion mark(s) have no diameter (a point without a Diameter measurement): no "
                           "detection can hit them, so they count as missed; give each mark its diameter", pointless)
        return df

    def class_names(self, evaluation: dict) -> list[str]:
        return ["no lesion", "lesion"]

    def train(self, spec, store, prep_key, cases, run_dir, on_epoch) -> dict:
        from models.detector import train_detector

        steps = spec.steps()

        def loader(key):
            entry = store.catalog_entry(key)
            attrs = store.prep_attrs(prep_key, key) or {}
            return store.read_prep(prep_key, key), model_lesions(entry, steps), tuple(attrs["spacing"])

        tr, va = cases[cases["split"] == "train"], cases[cases["split"] == "val"]
        return train_detector(loader=loader, train_keys=tr["series_key"].tolist(), val_keys=va["series_key"].tolist(),
                              arch=spec.model.arch, params=spec.model.params, train=spec.train.model_dump(),
                              augment=spec.augment.model_dump(), run_dir=run_dir, on_epoch=on_epoch)

    def evaluate(self, spec, store, prep_key, cases, model_path, run_dir) -> dict:
        """Detect in the validation and test series, score both with FROC against their marks; choose the
        operating threshold (1 false positive per scan) on validation; the baseline detector the same way."""
        import keras

        from medflow.froc import (BASELINE, BASELINE_SIGMAS_MM, FP_RATES, HIT_RULE, baseline_candidates, cpm,
                                  froc_curve, froc_summary, match, operating_threshold, sensitivity_at)
        from models.detector import peaks, predict_maps

        run_dir = Path(run_dir)
        model = keras.models.load_model(model_path, compile=False)
        steps = spec.steps()
        found: dict[str, dict] = {}  # series key -> {"model": detections, sigma: baseline detections}
        lesions: dict[str, list[dict]] = {}
        slices = {}
        part = cases[cases["split"].isin(["val", "test"])]
        for i, row in enumerate(part.to_dict("records")):
            key = row["series_key"]
            entry = store.catalog_entry(key)
            lesions[key] = truth_lesions(entry)
            image = store.read_prep(prep_key, key)
            heat, sizes = predict_maps(model, image)
            found[key] = {"model": to_detections(peaks(heat), entry, steps, sizes=sizes)}
            base = baseline_candidates(store.read_image(key), entry["spacing"])  # on the stored grid
            found[key].update({sigma: to_detections(c, entry, []) for sigma, c in base.items()})
            if row["split"] == "test":
                slices[key] = (image, heat)
            if (i + 1) % 10 == 0 or i + 1 == len(part):
                logger.info("detect %d/%d series", i + 1, len(part))

        def scans(source, split):
            rows = part[part["split"] == split]
            return [{"detections": found[k][source], "lesions": lesions[k], "patient": p, "series_key": k}
                    for k, p in zip(rows["series_key"], rows["patient_key"])]

        ev = spec.evaluate
        val_curve = froc_curve(scans("model", "val"))
        threshold = operating_threshold(val_curve, OPERATING_FP)
        result = {"task": self.name, "metrics": spec.metric_names(), "bootstrap": ev.bootstrap,
                  "hit_rule": HIT_RULE, "fp_rates": list(FP_RATES), "operating_fp_per_scan": OPERATING_FP,
                  "threshold": threshold}
        for split in ("val", "test"):
            s = scans("model", split)
            summary = froc_summary(s, n_boot=ev.bootstrap if split == "test" else 0, seed=spec.train.seed,
                                   patients=[x["patient"] for x in s])
            result[split] = _flat(summary)
            if split == "test":
                result["ci"] = _flat_ci(summary)
                result["ci_method"] = _flat_ci_methods(summary)
                result["curve"] = summary["curve"]
        # the baseline's smoothing is chosen on validation, like the model's threshold
        val_cpm = {sigma: cpm(sensitivity_at(froc_curve(scans(sigma, "val")))) for sigma in BASELINE_SIGMAS_MM}
        sigma = max(BASELINE_SIGMAS_MM, key=lambda s_: (np.nan_to_num(val_cpm[s_], nan=-1.0), -s_))
        b = scans(sigma, "test")
        bsum = froc_summary(b, n_boot=ev.bootstrap, seed=spec.train.seed, patients=[x["patient"] for x in b])
        result["baseline"] = {"name": BASELINE, "sigma_mm": sigma, "val_cpm": val_cpm[sigma], **_flat(bsum),
                              "cpm_ci": bsum.get("cpm_ci"), "curve": bsum["curve"]}
        det_rows = []
        for key, split in zip(part["series_key"], part["split"]):
            for source, name in (("model", "model"), (sigma, "baseline")):
                hits, _ = match(found[key][source], lesions[key])
                det_rows += [{"series_key": key, "split": split, "source": name, "x": d["xyz"][0], "y": d["xyz"][1],
                              "z": d["xyz"][2], "diameter_mm": d["diameter_mm"], "score": d["score"], "hit": int(h)}
                             for d, h in zip(found[key][source], hits)]
        model_scans = {"val": scans("model", "val"), "test": scans("model", "test")}
        per_case, missed = _cases(part, model_scans, threshold)
        result["operating"] = _operating(per_case, threshold)
        result["missed"] = missed
        write_csv_atomic(run_dir / "predictions.csv", per_case)
        write_csv_atomic(run_dir / "detections.csv", pd.DataFrame(det_rows))
        outcomes = froc_outcomes(model_scans["test"])
        write_json_atomic(run_dir / "test_outcomes.json", outcomes)
        result["baseline"]["difference"] = baseline_difference(outcomes, froc_outcomes(b), n_boot=ev.bootstrap,
                                                               seed=spec.train.seed)
        _save_examples(run_dir, per_case, slices, model_scans["test"], store, steps, prep_key)
        write_json_atomic(run_dir / "metrics.json", result)
        t = result["test"]
        logger.info("test: CPM %.3f (%s) on %d lesion(s) in %d scan(s); baseline CPM %.3f; at %.3f (1 FP/scan on "
                    "validation): sensitivity %.3f, %.2f FP/scan", t["cpm"], _ci_text(result["ci"].get("cpm")),
                    t["n_lesions"], t["n_scans"], result["baseline"]["cpm"], threshold,
                    result["operating"]["sensitivity"], result["operating"]["fp_per_scan"])
        return result

    def result_line(self, evaluation: dict) -> str:
        t, b, o = evaluation["test"], evaluation.get("baseline") or {}, evaluation.get("operating") or {}
        sens = " ".join(f"{r:g}:{t[f'sens_{r:g}']:.2f}" for r in evaluation.get("fp_rates", []))
        return (f"CPM {t['cpm']:.3f} ({_ci_text((evaluation.get('ci') or {}).get('cpm'))}) · baseline CPM "
                f"{b.get('cpm', float('nan')):.3f} · sensitivity at FP/scan {sens} · {t['n_lesions']} lesion(s) in "
                f"{t['n_scans']} test scan(s) · at the validation threshold: sensitivity "
                f"{o.get('sensitivity', float('nan')):.3f}, {o.get('fp_per_scan', float('nan')):.2f} FP/scan")

    def report_context(self, spec, run_dir, predictions, evaluation) -> dict:
        t, ci, b = evaluation["test"], evaluation.get("ci") or {}, evaluation.get("baseline") or {}
        rows = []
        for name in evaluation["metrics"]:
            label = "CPM (mean sensitivity at 1/8-8 FP/scan)" if name == "cpm" else \
                f"sensitivity at {name.split('_')[1]} FP/scan"
            how = (evaluation.get("ci_method") or {}).get(name)
            text = _ci_text(ci.get(name)) + (" (Wilson)" if how == WILSON_MEAN and ci.get(name) else "")
            rows.append({"metric": label, "value": f"{t[name]:.3f}", "ci95": text,
                         "baseline": f"{b[name]:.3f}" if isinstance(b.get(name), float) else ""})
        return detection_context(evaluation, predictions, rows,
                                 ["series_key", "n_lesions", "hits", "false_positives", "best_lesion_score"],
                                 {"froc": plot_froc(evaluation), "examples": plot_examples(Path(run_dir))},
                                 ("missed-lesions", "Test lesions missed at the validation threshold"))

    def markdown(self, context: dict) -> list[str]:
        o, b = context["operating"], context["baseline"]
        return [f"Baseline ({b.get('name', '')}): CPM {b.get('cpm', float('nan')):.3f} on the same test scans.",
                f"At the validation threshold {context['threshold']:.3f} (1 FP/scan on validation): sensitivity "
                f"{o.get('sensitivity', float('nan')):.3f}, {o.get('fp_per_scan', float('nan')):.2f} false positives "
                f"per scan; {len(context['missed'])} missed lesion(s)."]

    def predict(self, run, store, source, output, files_of) -> list[dict]:
        """Per series: detections at or above the run's validation threshold as a DICOM SR (TID 1500, a 3D point,
        diameter and probability each, referencing the source slices, naming the algorithm and run) and rows of
        ``detections.csv`` in patient coordinates."""
        import keras
        from pydicom.uid import generate_uid

        from medflow import __version__
        from medflow.predicting import prep_key_for, source_slices
        from models.detector import peaks, predict_maps
        from storage.marks import write_sr

        spec = run.spec
        steps = spec.steps()
        threshold = run.metrics.get("threshold")
        if not isinstance(threshold, float) or not np.isfinite(threshold):
            raise ValueError(f"run {run.run_id} has no finite detection threshold in metrics.json (received "
                             f"{threshold!r}); evaluate the run first")
        algorithm = {"name": f"medflow {spec.name}", "version": __version__,
                     "parameters": [f"run_id={run.run_id}", f"arch={spec.model.arch}", f"threshold={threshold:.4f}"]}
        model = keras.models.load_model(run.model_path, compile=False)
        rows, det_rows = [], []
        for key, entry in sorted(store.catalog().items()):
            image = store.read_prep(prep_key_for(store, steps, key), key)
            heat, sizes = predict_maps(model, image)
            dets = [d for d in to_detections(peaks(heat), entry, steps, sizes=sizes) if d["score"] >= threshold]
            row = {"series_key": key, "detections": len(dets), "threshold": threshold}
            files = files_of.get(entry.get("parent", key), [])
            row["sr"], row["note"] = "", NO_DETECTION
            if dets:
                marks = [{"x": d["xyz"][0], "y": d["xyz"][1], "z": d["xyz"][2], "diameter_mm": d["diameter_mm"],
                          "score": d["score"]} for d in dets]
                out = write_sr(source_slices(source, files, entry["direction"]), marks, output / f"{key}.sr.dcm",
                               series_uid=generate_uid(), sop_uid=generate_uid(), algorithm=algorithm,
                               description=f"medflow detections {spec.name}"[:64])
                row["sr"], row["note"] = out.name, ""
            det_rows += [{"series_key": key, "x_mm": d["xyz"][0], "y_mm": d["xyz"][1], "z_mm": d["xyz"][2],
                          "diameter_mm": round(d["diameter_mm"], 2), "score": round(d["score"], 4)} for d in dets]
            logger.info("predict %s: %d detection(s) at or above %.3f", key, len(dets), threshold)
            rows.append(row)
        write_csv_atomic(output / "detections.csv", pd.DataFrame(
            det_rows, columns=["series_key", "x_mm", "y_mm", "z_mm", "diameter_mm", "score"]))
        return rows

    def predict_table_columns(self) -> tuple[str, ...]:
        return ("series_key", "detections", "sr", "note")


# ---------------------------------------------------------------- helpers
def detection_context(evaluation: dict, predictions: pd.DataFrame, rows: list[dict], columns: list[str],
                      plots: dict, missed: tuple[str, str]) -> dict:
    """A detection report's context (both detection kinds): the metric ``rows``, the test cases' ``columns``,
    the ``plots``, and the missed lesions as a Prefect table (``missed``: its name and description)."""
    test = predictions[predictions["split"] == "test"]
    table = [{c: (round(float(r[c]), 3) if isinstance(r[c], float) else r[c]) for c in columns}
             for r in test.sort_values("series_key").to_dict("records")]
    return {"metrics": rows, "det": evaluation["test"], "det_val": evaluation.get("val") or {},
            "baseline": evaluation.get("baseline") or {}, "operating": evaluation.get("operating") or {},
            "threshold": evaluation.get("threshold"), "missed": evaluation.get("missed") or [], "cases": table,
            "hit_rule": evaluation.get("hit_rule"), "plots": plots,
            "tables": {missed[0]: {"rows": evaluation.get("missed") or [], "description": missed[1]}}}


def _flat(summary: dict) -> dict:
    out = {"cpm": summary["cpm"], "n_lesions": summary["n_lesions"], "n_scans": summary["n_scans"]}
    for rate, value in summary["sensitivity"].items():
        out[f"sens_{float(rate):g}"] = value
    return out


def _flat_ci(summary: dict) -> dict:
    out = {"cpm": summary.get("cpm_ci")}
    for rate, value in (summary.get("sensitivity_ci") or {}).items():
        out[f"sens_{float(rate):g}"] = value
    return out


def _flat_ci_methods(summary: dict) -> dict:
    """Which metric's interval is not the patient bootstrap (Wilson's where every resample was alike)."""
    return {("cpm" if k == "cpm" else f"sens_{float(k):g}"): v for k, v in (summary.get("ci_methods") or {}).items()}


def _ci_text(ci) -> str:
    return f"{ci[0]:.3f} – {ci[1]:.3f}" if ci and all(v == v for v in ci) else "no interval"


def baseline_difference(model: dict, baseline: dict, *, n_boot: int, seed: int) -> dict:
    """The model's headline metric (CPM; AP50 for boxes) minus the baseline's on the same test scans: one paired
    bootstrap over patients (``medflow.compare``'s), its 95% interval and two-sided p-value."""
    from medflow.compare import _paired_detection

    try:
        r = _paired_detection(model, baseline, n_boot=max(int(n_boot), 200), seed=seed)
    except ValueError as exc:
        return {"difference": float("nan"), "ci": None, "p_value": float("nan"), "method": str(exc)}
    return {"difference": r["difference"], "ci": r["ci"], "p_value": r["p_value"], "method": r["method"]}


def froc_outcomes(scans: list[dict]) -> dict:
    """What ``medflow compare`` pairs two detection runs by: per test scan, its patient, the scores of its
    false positives and each lesion's best hit score (None: never hit)."""
    from medflow.froc import scan_outcome

    cases = []
    for scan in scans:
        fp, best = scan_outcome(scan)
        cases.append({"series_key": scan["series_key"], "patient": scan["patient"], "fp_scores": fp.tolist(),
                      "lesion_best": [float(b) if np.isfinite(b) else None for b in best]})
    return {"kind": "froc", "cases": cases}


def _cases(part: pd.DataFrame, scans: dict, threshold: float) -> tuple[pd.DataFrame, list[dict]]:
    """One row per scan at the operating threshold, and the test lesions missed there."""
    from medflow.froc import match

    by_key = {s["series_key"]: s for split in scans.values() for s in split}
    rows, missed = [], []
    for row in part.to_dict("records"):
        scan = by_key[row["series_key"]]
        hits, scores = match(scan["detections"], scan["lesions"])
        kept = scores >= threshold
        best = [max([s for h, s in zip(hits, scores) if h == j], default=0.0) for j in range(len(scan["lesions"]))]
        hit = [j for j in range(len(scan["lesions"])) if best[j] >= threshold]
        rows.append({**row, "hits": len(hit), "false_positives": int((kept & (hits < 0)).sum()),
                     "best_lesion_score": float(min(best)) if best else float("nan"),
                     "top_score": float(scores.max()) if len(scores) else 0.0})
        if row["split"] == "test":
            missed += [{"series_key": row["series_key"], "lesion": j + 1,
                        "diameter_mm": round(scan["lesions"][j]["diameter_mm"], 1),
                        "best_score": round(best[j], 3)} for j in range(len(scan["lesions"])) if j not in hit]
    return pd.DataFrame(rows), missed


def _operating(per_case: pd.DataFrame, threshold: float) -> dict:
    test = per_case[per_case["split"] == "test"]
    n = int(test["n_lesions"].sum())
    return {"threshold": threshold, "sensitivity": float(test["hits"].sum() / n) if n else float("nan"),
            "fp_per_scan": float(test["false_positives"].mean()) if len(test) else float("nan"),
            "hits": int(test["hits"].sum()), "n_lesions": n}


def _save_examples(run_dir: Path, per_case: pd.DataFrame, slices: dict, scans: list[dict], store, steps,
                   prep_key: str) -> None:
    """Best, median and worst test case with a lesion (by the score of its lesion): the model-grid slice through
    the lesion, with truth and detections on that slice, for the report."""
    from medflow.runs import save_npz_atomic
    from storage.marks import to_voxel

    lesion = per_case[(per_case["split"] == "test") & (per_case["n_lesions"] > 0)].sort_values(
        "best_lesion_score", ascending=False)
    if lesion.empty:
        return
    picks = {"best": lesion.iloc[0], "median": lesion.iloc[len(lesion) // 2], "worst": lesion.iloc[-1]}
    by_key = {s["series_key"]: s for s in scans}
    images, meta = [], []
    for which, row in picks.items():
        key = row["series_key"]
        entry = store.catalog_entry(key)
        image, _heat = slices[key]
        truth = model_lesions(entry, steps)
        z = int(round(truth[0]["zyx"][0])) if truth else image.shape[0] // 2
        z = min(max(z, 0), image.shape[0] - 1)
        trace = _trace(entry, steps)
        dets = []
        for d in by_key[key]["detections"][:10]:
            zyx = to_model_grid(to_voxel(d["xyz"], entry["spacing"], entry["origin"], entry["direction"]), trace)
            if abs(zyx[0] - z) <= 2:
                dets.append({"yx": zyx[1:].tolist(), "score": d["score"]})
        attrs = store.prep_attrs(prep_key, key) or {}
        pix = float(attrs.get("spacing", [1, 1, 1])[1])
        meta.append({"which": which, "z": z, "score": float(row["best_lesion_score"]),
                     "truth": [{"yx": t["zyx"][1:], "r": t["diameter_mm"] / 2 / pix} for t in truth
                               if abs(t["zyx"][0] - z) <= 2], "detections": dets})
        images.append(image[z])
    save_npz_atomic(run_dir / "det_examples.npz", images=np.stack(images), meta=np.array(json.dumps(meta)))


def plot_froc(evaluation: dict) -> str:
    """The FROC curves of the model and the baseline on the test split (log FP/scan axis, LUNA16's range)."""
    import matplotlib.pyplot as plt

    from medflow.reporting import _png

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, curve, style in (("model", evaluation.get("curve"), "-"),
                                ("baseline", (evaluation.get("baseline") or {}).get("curve"), "--")):
        if curve and curve["fps"]:
            fps = np.maximum(np.asarray(curve["fps"], dtype=float), 1 / 16)
            ax.step(fps, curve["sensitivity"], style, where="post", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 8, 8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def plot_examples(run_dir: Path) -> str | None:
    """Best, median and worst test case: truth circles (green), detections (red crosses, with their scores)."""
    import matplotlib.pyplot as plt

    from medflow.reporting import plot_example_panels

    def draw(ax, m):
        for t in m["truth"]:
            ax.add_patch(plt.Circle((t["yx"][1], t["yx"][0]), max(t["r"], 1.5), fill=False, color="#2ca02c", lw=1.4))
        for d in m["detections"]:
            ax.plot(d["yx"][1], d["yx"][0], "x", color="#d62728", ms=7)
            ax.text(d["yx"][1] + 2, d["yx"][0] - 2, f"{d['score']:.2f}", color="#d62728", fontsize=7)
        return f"{m['which']}: lesion score {m['score']:.2f} (slice {m['z']})"

    return plot_example_panels(run_dir / "det_examples.npz", draw,
                               "truth (green circles) and detections within 2 slices (red, with scores)")
