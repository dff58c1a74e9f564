"""Box detection on planar images (chest X-rays): lesion boxes per image (a CSV of boxes or DICOM SR 2D regions),
a CenterNet-style 2D detector, COCO average precision (IoU 0.5 and 0.5:0.95) against a declared baseline,
DICOM SR and CSV out of ``medflow predict``.

Boxes are stored with each image on its own pixel grid (``storage.marks``). Training maps them
through the preprocessing geometry (``resize2d``: a resize, then a centred pad) onto the model's
grid; evaluation maps detections back onto the stored image, where they are scored, so the
metrics do not depend on the model's resolution.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medflow.boxes import AP_METRICS
from medflow.intervals import WILSON_MEAN
from medflow.kinds.base import TaskKind
from medflow.kinds.detection import (NO_DETECTION, _ci_text, _trace, baseline_difference, detection_context,
                                     to_model_grid, to_source_grid)
from medflow.runs import write_json_atomic
from medflow.tables import write_csv_atomic

logger = logging.getLogger(__name__)


def stored_boxes(entry: dict) -> list[list[float]]:
    """An image's lesion boxes ``[r0, c0, r1, c1]`` on its stored grid."""
    return [list(m["box"]) for m in entry.get("marks") or [] if m.get("box")]


def map_boxes(boxes, trace, *, forward: bool) -> list[list[float]]:
    """Boxes through the geometric preprocessing (``forward``: stored grid to model grid; else back): each corner
    as a point of the one-slice volume.

    >>> trace = [("resize", {}, (1, 200, 100), (1, 100, 50)), ("crop_pad", {}, (1, 100, 50), (1, 100, 100))]
    >>> map_boxes([[9.5, 19.5, 29.5, 39.5]], trace, forward=True)
    [[4.5, 34.5, 14.5, 44.5]]
    >>> map_boxes([[4.5, 34.5, 14.5, 44.5]], trace, forward=False)
    [[9.5, 19.5, 29.5, 39.5]]
    """
    move = to_model_grid if forward else to_source_grid
    out = []
    for r0, c0, r1, c1 in boxes:
        a, b = move([0.0, r0, c0], trace), move([0.0, r1, c1], trace)
        out.append([float(a[1]), float(a[2]), float(b[1]), float(b[2])])
    return out


def pixel_box(box) -> list[float]:
    """A stored-grid box as ``x0, y0, x1, y1`` in pixels (the image's top left corner at 0, 0)."""
    r0, c0, r1, c1 = box
    return [round(c0 + 0.5, 2), round(r0 + 0.5, 2), round(c1 + 0.5, 2), round(r1 + 0.5, 2)]


class Detection2D(TaskKind):
    name = "detection2d"
    metrics = AP_METRICS
    template = "detection2d.html.j2"

    def check_spec(self, spec) -> list[str]:
        problems = super().check_spec(spec)
        if spec.data.marks is None:
            problems.append("data.marks: model.task detection2d needs data.marks (a CSV of boxes, or DICOM SR with "
                            "2D regions)")
        names = [name for name, _ in spec.steps()]
        if "resize2d" not in names:
            problems.append("preprocess: detection2d trains on whole images of one size; add resize2d (e.g. "
                            "resize2d: {shape: [128, 128], aspect: pad})")
        bad = [n for n in names if n in ("resample", "axial_slice", "lung_mask")]
        if bad:
            problems.append(f"preprocess: detection2d works on planar images; remove {', '.join(bad)}")
        if spec.data.split.folds:
            problems.append(f"data.split.folds: k-fold ensembles are built for classification and signal runs "
                            f"(received folds: {spec.data.split.folds})")
        if spec.evaluate.calibrate != "none":
            problems.append(f"evaluate.calibrate: calibrates class scores; box scores are ranked by average "
                            f"precision (received {spec.evaluate.calibrate!r})")
        return problems

    def cohort(self, spec, store) -> pd.DataFrame:
        rows, boxless = [], 0
        for key, entry in sorted(store.catalog().items()):
            if "marks" not in entry or entry.get("kind") != "image":
                continue
            n = len(stored_boxes(entry))
            boxless += len(entry["marks"]) - n
            rows.append({"series_key": key, "patient_key": entry["patient_key"], "study_key": entry["study_key"],
                         "label": int(n > 0), "label_name": "lesion" if n else "no lesion", "n_boxes": n})
        if not rows:
            raise ValueError("no planar image in the store was ingested with lesion marks; check data.marks (its "
                             "source, the modalities, and the quarantine table)")
        if boxless:
            logger.warning("%d lesion mark(s) are points without a box (an SR point region): detection2d cannot "
                           "use them; give each lesion a box, circle, ellipse or polyline", boxless)
        df = pd.DataFrame(rows)
        if not df["n_boxes"].any():
            raise ValueError(f"none of the {len(df)} planar image(s) has a lesion box: check data.marks (the table's "
                             "SOPInstanceUIDs, or the SRs' references) and the quarantine table")
        logger.info("detection2d cohort: %d images, %d with lesions (%d boxes)", len(df), int(df["label"].sum()),
                    int(df["n_boxes"].sum()))
        return df

    def class_names(self, evaluation: dict) -> list[str]:
        return ["no lesion", "lesion"]

    def train(self, spec, store, prep_key, cases, run_dir, on_epoch) -> dict:
        from models.detector import train_box_detector

        steps = spec.steps()

        def loader(key):
            entry = store.catalog_entry(key)
            return store.read_prep(prep_key, key), map_boxes(stored_boxes(entry), _trace(entry, steps), forward=True)

        tr, va = cases[cases["split"] == "train"], cases[cases["split"] == "val"]
        return train_box_detector(loader=loader, train_keys=tr["series_key"].tolist(),
                                  val_keys=va["series_key"].tolist(), arch=spec.model.arch, params=spec.model.params,
                                  train=spec.train.model_dump(), augment=spec.augment.model_dump(), run_dir=run_dir,
                                  on_epoch=on_epoch)

    def evaluate(self, spec, store, prep_key, cases, model_path, run_dir) -> dict:
        """Detect in the validation and test images, score both with COCO AP against their boxes; choose the
        operating threshold (best F1 at IoU 0.5) on validation; the baseline detector the same way."""
        import keras

        from medflow.boxes import (BASELINE, HIT_IOU, HIT_RULE, at_threshold, baseline_boxes,
                                   box_summary, centre_prior, coco_ap, iou, match, operating_threshold)
        from models.detector import predict_boxes

        run_dir = Path(run_dir)
        model = keras.models.load_model(model_path, compile=False)
        steps = spec.steps()
        # the baseline's box: the median training box on the model grid
        train_boxes = []
        for key in cases.loc[cases["split"] == "train", "series_key"]:
            entry = store.catalog_entry(key)
            train_boxes += map_boxes(stored_boxes(entry), _trace(entry, steps), forward=True)
        size = np.median([[b[2] - b[0], b[3] - b[1]] for b in train_boxes], axis=0) if train_boxes else [16.0, 16.0]
        part = cases[cases["split"].isin(["val", "test"])]
        prior = None
        found: dict[str, dict] = {}
        images_of: dict[str, np.ndarray] = {}
        for i, row in enumerate(part.to_dict("records")):
            key = row["series_key"]
            entry = store.catalog_entry(key)
            trace = _trace(entry, steps)
            image = store.read_prep(prep_key, key)
            if prior is None or prior.shape != image.shape[1:]:
                prior = centre_prior(image.shape[1:], train_boxes, size)
            back = {}
            for source, dets in (("model", predict_boxes(model, image)),
                                 ("baseline", baseline_boxes(image[0], size, prior))):
                boxes = map_boxes([d["box"] for d in dets], trace, forward=False)
                back[source] = [{"box": b, "score": d["score"]} for b, d in zip(boxes, dets)]
            found[key] = {**back, "truth": stored_boxes(entry), "patient": row["patient_key"]}
            if row["split"] == "test":
                images_of[key] = image[0]
            if (i + 1) % 25 == 0 or i + 1 == len(part):
                logger.info("detect %d/%d images", i + 1, len(part))

        def images(source, split):
            keys = part.loc[part["split"] == split, "series_key"]
            return [{"truth": found[k]["truth"], "detections": found[k][source], "patient": found[k]["patient"],
                     "series_key": k} for k in keys]

        ev = spec.evaluate
        threshold = operating_threshold(images("model", "val"))
        base_threshold = operating_threshold(images("baseline", "val"))
        summary = box_summary(images("model", "test"), n_boot=ev.bootstrap, seed=spec.train.seed)
        base = box_summary(images("baseline", "test"), n_boot=ev.bootstrap, seed=spec.train.seed)
        val = coco_ap(images("model", "val"))

        def flat(s):
            return {m: s[m] for m in (*AP_METRICS, "n_boxes", "n_images")}

        result = {"task": self.name, "metrics": spec.metric_names(), "bootstrap": ev.bootstrap, "hit_rule": HIT_RULE,
                  "hit_iou": HIT_IOU, "threshold": threshold, "test": flat(summary), "ci": summary["ci"],
                  "ci_method": summary.get("ci_method") or {},
                  "curve": summary["curve"], "val": flat(val),
                  "baseline": {"name": BASELINE, "box_size": [float(v) for v in size], **flat(base),
                               "ci": base["ci"], "curve": base["curve"],
                               "operating": at_threshold(images("baseline", "test"), base_threshold)},
                  "operating": at_threshold(images("model", "test"), threshold)}
        per_case, det_rows, missed = [], [], []
        for row in part.to_dict("records"):
            key, f = row["series_key"], found[row["series_key"]]
            matched = {source: match(f[source], f["truth"]) for source in ("model", "baseline")}
            hits, scores = matched["model"]
            kept = scores >= threshold
            overlap = iou([d["box"] for d in f["model"]], f["truth"])
            best = overlap.max(axis=0) if overlap.size else np.zeros(len(f["truth"]))
            hit = {int(h) for h, k in zip(hits, kept) if h >= 0 and k}
            per_case.append({**row, "hits": len(hit), "false_positives": int((kept & (hits < 0)).sum()),
                             "lowest_best_iou": float(best.min()) if len(best) else float("nan"),
                             "top_score": float(scores.max()) if len(scores) else 0.0})
            if row["split"] == "test":
                missed += [{"series_key": key, "box_px": pixel_box(b), "best_iou": round(float(best[j]), 3)}
                           for j, b in enumerate(f["truth"]) if j not in hit]
            for source, (h, _) in matched.items():
                ordered = sorted(f[source], key=lambda d: -d["score"])
                det_rows += [{"series_key": key, "split": row["split"], "source": source,
                              **dict(zip(("x0", "y0", "x1", "y1"), pixel_box(d["box"]))), "score": d["score"],
                              "hit": int(hj >= 0)} for d, hj in zip(ordered, h)]
        per_case = pd.DataFrame(per_case)
        result["missed"] = missed
        write_csv_atomic(run_dir / "predictions.csv", per_case)
        write_csv_atomic(run_dir / "detections.csv", pd.DataFrame(det_rows))
        # what `medflow compare` pairs two runs by: each test image's truth and the model's scored boxes
        def outcomes(source: str) -> dict:
            return {"kind": "boxes", "cases": [
                {"series_key": i["series_key"], "patient": i["patient"],
                 "truth": [[float(v) for v in b] for b in i["truth"]],
                 "detections": [{"box": [float(v) for v in d["box"]], "score": float(d["score"])}
                                for d in i["detections"]]} for i in images(source, "test")]}

        model_outcomes = outcomes("model")
        write_json_atomic(run_dir / "test_outcomes.json", model_outcomes)
        result["baseline"]["difference"] = baseline_difference(model_outcomes, outcomes("baseline"),
                                                               n_boot=ev.bootstrap, seed=spec.train.seed)
        _save_examples(run_dir, per_case, images_of, found, store, steps, threshold)
        write_json_atomic(run_dir / "metrics.json", result)
        t, o = result["test"], result["operating"]
        logger.info("test: AP50 %.3f (%s), AP50:95 %.3f on %d box(es) in %d image(s); baseline AP50 %.3f; at %.3f "
                    "(best F1 on validation): recall %.3f, precision %.3f", t["ap50"],
                    _ci_text(result["ci"].get("ap50")), t["ap50_95"], t["n_boxes"], t["n_images"],
                    result["baseline"]["ap50"], threshold, o["recall"], o["precision"])
        return result

    def result_line(self, evaluation: dict) -> str:
        t, b, o = evaluation["test"], evaluation.get("baseline") or {}, evaluation.get("operating") or {}
        return (f"AP50 {t['ap50']:.3f} ({_ci_text((evaluation.get('ci') or {}).get('ap50'))}) · AP50:95 "
                f"{t['ap50_95']:.3f} · baseline AP50 {b.get('ap50', float('nan')):.3f} · {t['n_boxes']} box(es) in "
                f"{t['n_images']} test image(s) · at the validation threshold: recall {o.get('recall', float('nan')):.3f}, "
                f"precision {o.get('precision', float('nan')):.3f}")

    def report_context(self, spec, run_dir, predictions, evaluation) -> dict:
        t, ci, b = evaluation["test"], evaluation.get("ci") or {}, evaluation.get("baseline") or {}
        labels = {"ap50": "AP at IoU 0.5", "ap50_95": "AP at IoU 0.5:0.95 (COCO)", "ap75": "AP at IoU 0.75"}
        how = evaluation.get("ci_method") or {}
        rows = [{"metric": labels[name], "value": f"{t[name]:.3f}",
                 "ci95": _ci_text(ci.get(name)) + (" (Wilson)" if how.get(name) == WILSON_MEAN and ci.get(name) else ""),
                 "baseline": f"{b[name]:.3f}" if isinstance(b.get(name), float) else ""}
                for name in evaluation["metrics"]]
        return detection_context(evaluation, predictions, rows,
                                 ["series_key", "n_boxes", "hits", "false_positives", "lowest_best_iou"],
                                 {"pr": plot_pr(evaluation), "examples": plot_examples(Path(run_dir))},
                                 ("missed-boxes", "Test lesion boxes missed at the validation threshold"))

    def markdown(self, context: dict) -> list[str]:
        o, b = context["operating"], context["baseline"]
        return [f"Baseline ({b.get('name', '')}): AP50 {b.get('ap50', float('nan')):.3f} on the same test images.",
                f"At the validation threshold {context['threshold']:.3f} (best F1 on validation): recall "
                f"{o.get('recall', float('nan')):.3f}, precision {o.get('precision', float('nan')):.3f}, "
                f"{o.get('fp_per_image', float('nan')):.2f} false positives per image; {len(context['missed'])} "
                "missed box(es)."]

    def predict(self, run, store, source, output, files_of) -> list[dict]:
        """Per image: boxes at or above the run's validation threshold as a DICOM SR (TID 1500, each box a closed
        polyline on the image with its probability, naming the algorithm and run) and rows of ``detections.csv``
        in pixels."""
        import keras
        import pydicom
        from pydicom.uid import generate_uid

        from medflow import __version__
        from medflow.predicting import prep_key_for
        from models.detector import predict_boxes
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
            if entry.get("kind") != "image":
                rows.append({"series_key": key, "detections": 0, "sr": "", "note": "not a planar image"})
                continue
            image = store.read_prep(prep_key_for(store, steps, key), key)
            dets = [d for d in predict_boxes(model, image) if d["score"] >= threshold]
            boxes = [pixel_box(b) for b in map_boxes([d["box"] for d in dets], _trace(entry, steps), forward=False)]
            files = files_of.get(key, [])
            row = {"series_key": key, "detections": len(dets), "threshold": threshold, "sr": "", "note": NO_DETECTION}
            if dets:
                out = write_sr([pydicom.dcmread(source / files[0])],
                               [{"box_px": b, "score": d["score"]} for b, d in zip(boxes, dets)],
                               output / f"{key}.sr.dcm", series_uid=generate_uid(), sop_uid=generate_uid(),
                               algorithm=algorithm, description=f"medflow detections {spec.name}"[:64])
                row["sr"], row["note"] = out.name, ""
            det_rows += [{"series_key": key, **dict(zip(("x0", "y0", "x1", "y1"), b)), "score": round(d["score"], 4)}
                         for b, d in zip(boxes, dets)]
            logger.info("predict %s: %d box(es) at or above %.3f", key, len(dets), threshold)
            rows.append(row)
        write_csv_atomic(output / "detections.csv", pd.DataFrame(
            det_rows, columns=["series_key", "x0", "y0", "x1", "y1", "score"]))
        return rows

    def predict_table_columns(self) -> tuple[str, ...]:
        return ("series_key", "detections", "sr", "note")


# ---------------------------------------------------------------- helpers
def _save_examples(run_dir: Path, per_case: pd.DataFrame, images_of: dict, found: dict, store, steps,
                   threshold: float) -> None:
    """Best, median and worst test image with a lesion (by the lowest best IoU of its boxes), on the model grid,
    with its truth boxes and the detections at or above the threshold, for the report."""
    from medflow.runs import save_npz_atomic

    lesion = per_case[(per_case["split"] == "test") & (per_case["n_boxes"] > 0)].sort_values(
        "lowest_best_iou", ascending=False)
    if lesion.empty:
        return
    picks = {"best": lesion.iloc[0], "median": lesion.iloc[len(lesion) // 2], "worst": lesion.iloc[-1]}
    images, meta = [], []
    for which, row in picks.items():
        key = row["series_key"]
        trace = _trace(store.catalog_entry(key), steps)
        kept = [d for d in found[key]["model"] if d["score"] >= threshold][:10]
        meta.append({"which": which, "iou": float(row["lowest_best_iou"]),
                     "truth": map_boxes(found[key]["truth"], trace, forward=True),
                     "detections": [{"box": b, "score": d["score"]}
                                    for b, d in zip(map_boxes([d["box"] for d in kept], trace, forward=True), kept)]})
        images.append(images_of[key])
    save_npz_atomic(run_dir / "det_examples.npz", images=np.stack(images), meta=np.array(json.dumps(meta)))


def plot_pr(evaluation: dict) -> str:
    """Precision against recall at IoU 0.5 on the test images: the model and the baseline (COCO's interpolated
    precision at 101 recall points)."""
    import matplotlib.pyplot as plt

    from medflow.reporting import _png

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for label, curve, style in (("model", evaluation.get("curve"), "-"),
                                ("baseline", (evaluation.get("baseline") or {}).get("curve"), "--")):
        if curve and curve["recall"]:
            ax.plot(curve["recall"], curve["precision"], style, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision (interpolated)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    return _png(fig)


def plot_examples(run_dir: Path) -> str | None:
    """Best, median and worst test image: truth boxes (green), detections at the threshold (red, with scores)."""
    import matplotlib.pyplot as plt

    from medflow.reporting import plot_example_panels

    def draw(ax, m):
        for r0, c0, r1, c1 in m["truth"]:
            ax.add_patch(plt.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, color="#2ca02c", lw=1.4))
        for d in m["detections"]:
            r0, c0, r1, c1 = d["box"]
            ax.add_patch(plt.Rectangle((c0, r0), c1 - c0, r1 - r0, fill=False, color="#d62728", lw=1.0, ls="--"))
            ax.text(c0, r0 - 1, f"{d['score']:.2f}", color="#d62728", fontsize=7)
        return f"{m['which']}: lowest best IoU {m['iou']:.2f}"

    return plot_example_panels(run_dir / "det_examples.npz", draw,
                               "truth boxes (green) and detections at the validation threshold (red, with scores)")
