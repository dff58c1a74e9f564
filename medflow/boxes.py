"""Scoring 2D box detections: COCO average precision (pycocotools), matching at IoU 0.5, intervals by
patient, the operating threshold, and the declared baseline detector.

Boxes are ``[r0, c0, r1, c1]`` on an image's array grid (``storage.marks``: pixel centres at whole
numbers, edges at half-integers); IoU does not depend on where the grid starts. An image is
``{"truth": [boxes], "detections": [{"box", "score"}], "patient"?}``. AP is COCO's: precision
interpolated at 101 recall points, IoU thresholds 0.5:0.95 in steps of 0.05, up to 100
detections per image, one class; detections on an image without a lesion are false positives.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np

AP_METRICS = ("ap50", "ap50_95", "ap75")
HIT_IOU = 0.5
HIT_RULE = "a detection hits a lesion box when their intersection over union is at least 0.5 (each box hit once)"
BASELINE = ("bright blobs where lesions usually are: local maxima of a difference of Gaussians of the prepared "
            "image (sigmas a sixth and a half of the training boxes' median size) times the density of the training "
            "boxes' centres, each given the training boxes' median size, scored by that product")


def _xywh(box) -> list[float]:
    r0, c0, r1, c1 = (float(v) for v in box)
    return [c0 + 0.5, r0 + 0.5, c1 - c0, r1 - r0]


def coco_ap(images: list[dict]) -> dict:
    """AP at IoU 0.5, 0.75 and the mean over 0.5:0.95 (``nan`` without any truth box), the precision-recall
    curve at IoU 0.5 (``recall``, ``precision`` at COCO's 101 recall points) and the counts.

    >>> one = {"truth": [[0, 0, 9, 9]], "detections": [{"box": [0, 0, 9, 9], "score": 0.9}]}
    >>> round(coco_ap([one])["ap50"], 3), round(coco_ap([{**one, "detections": []}])["ap50"], 3)
    (1.0, 0.0)
    """
    out = _accumulate(_evaluate(images), list(range(len(images))))
    return {**out, "n_boxes": sum(len(i["truth"]) for i in images), "n_images": len(images)}


def _evaluate(images: list[dict]):
    """pycocotools' per-image matching of ``images`` (one class, all areas, 100 detections per image): a
    ``COCOeval`` after ``evaluate()``, or None when there is no detection at all."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = {"images": [{"id": i + 1} for i in range(len(images))], "categories": [{"id": 1, "name": "lesion"}],
          "annotations": []}
    dets = []
    for i, image in enumerate(images, start=1):
        for box in image["truth"]:
            x, y, w, h = _xywh(box)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": 1,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        dets += [{"image_id": i, "category_id": 1, "bbox": _xywh(d["box"]), "score": float(d["score"])}
                 for d in image["detections"]]
    if not dets or not gt["annotations"]:
        return {"n_truth": [len(i["truth"]) for i in images]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        truth = COCO()
        truth.dataset = gt
        truth.createIndex()
        ev = COCOeval(truth, truth.loadRes(dets), "bbox")
        ev.params.maxDets = [100]
        ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]
        ev.evaluate()
    return ev


def _accumulate(ev, picks: list[int]) -> dict:
    """AP of the images ``picks`` (indices into the evaluated images; repeats allowed: a bootstrap sample) from
    the per-image matching of ``_evaluate``, by pycocotools' own accumulation."""
    nan = float("nan")
    recall = np.linspace(0.0, 1.0, 101)
    if isinstance(ev, dict):  # no detection, or no truth box
        has_truth = sum(ev["n_truth"][i] for i in picks) > 0
        value = 0.0 if has_truth else nan
        return {"ap50": value, "ap50_95": value, "ap75": value,
                "curve": {"recall": recall.tolist() if has_truth else [],
                          "precision": np.zeros(101).tolist() if has_truth else []}}
    sample = copy.copy(ev)
    sample.evalImgs = [ev.evalImgs[i] for i in picks]  # one class and one area range: one entry per image
    sample.params = copy.copy(ev.params)
    sample.params.imgIds = list(range(len(picks)))
    sample._paramsEval = copy.copy(sample.params)
    with contextlib.redirect_stdout(io.StringIO()):
        sample.accumulate()
    precision = sample.eval["precision"][:, :, 0, 0, -1]  # IoU threshold x recall point

    def mean(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else nan

    if not (precision > -1).any():
        return {"ap50": nan, "ap50_95": nan, "ap75": nan, "curve": {"recall": [], "precision": []}}
    return {"ap50": mean(precision[0]), "ap75": mean(precision[5]), "ap50_95": mean(precision),
            "curve": {"recall": recall.tolist(), "precision": np.maximum(precision[0], 0.0).tolist()}}


def iou(a, b) -> np.ndarray:
    """Intersection over union of every box of ``a`` with every box of ``b`` (pycocotools)."""
    from pycocotools import mask

    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    return np.asarray(mask.iou([_xywh(x) for x in a], [_xywh(x) for x in b], [0] * len(b)))


def match(detections: list[dict], truth: list) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching in score order at ``HIT_IOU``: for each detection (best first) the index of the truth box
    it hits (-1: a false positive), and the detections' scores in that order."""
    order = sorted(range(len(detections)), key=lambda i: -detections[i]["score"])
    dets = [detections[i] for i in order]
    overlaps = iou([d["box"] for d in dets], truth)
    taken: set[int] = set()
    hits = np.full(len(dets), -1)
    for i in range(len(dets)):
        free = [j for j in np.argsort(-overlaps[i]) if j not in taken and overlaps[i, j] >= HIT_IOU] \
            if overlaps.shape[1] else []
        if free:
            hits[i] = int(free[0])
            taken.add(int(free[0]))
    return hits, np.array([d["score"] for d in dets], dtype=float)


def operating_threshold(images: list[dict]) -> float:
    """The score threshold with the best F1 (hits at ``HIT_IOU``) over ``images`` (chosen on validation);
    ``inf`` when nothing can be hit.

    >>> imgs = [{"truth": [[0, 0, 9, 9]], "detections": [{"box": [0, 0, 9, 9], "score": 0.8},
    ...                                               {"box": [20, 20, 29, 29], "score": 0.9}]}]
    >>> operating_threshold(imgs)
    0.8
    """
    hits, scores = [], []
    for image in images:
        h, s = match(image["detections"], image["truth"])
        hits.append(h >= 0)
        scores.append(s)
    hit, score = np.concatenate(hits or [[]]).astype(bool), np.concatenate(scores or [[]])
    n_truth = sum(len(i["truth"]) for i in images)
    if not hit.any():
        return float("inf")
    best, threshold = -1.0, float("inf")
    for t in np.unique(score[hit]):
        tp, fp = int((hit & (score >= t)).sum()), int((~hit & (score >= t)).sum())
        f1 = 2 * tp / (2 * tp + fp + (n_truth - tp))
        if f1 > best:
            best, threshold = f1, float(t)
    return threshold


def at_threshold(images: list[dict], threshold: float) -> dict:
    """Recall, precision, F1 and false positives per image of the detections at or above ``threshold``."""
    tp = fp = 0
    for image in images:
        h, s = match(image["detections"], image["truth"])
        tp += int(((h >= 0) & (s >= threshold)).sum())
        fp += int(((h < 0) & (s >= threshold)).sum())
    n = sum(len(i["truth"]) for i in images)
    nan = float("nan")
    return {"threshold": threshold, "recall": tp / n if n else nan, "precision": tp / (tp + fp) if tp + fp else nan,
            "f1": 2 * tp / (2 * tp + fp + n - tp) if n + fp else nan, "hits": tp, "n_boxes": n,
            "fp_per_image": fp / len(images) if images else nan}


def box_summary(images: list[dict], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """``coco_ap`` of ``images`` with 95% BCa intervals from a bootstrap over patients (each image's
    ``patient``; all images of a drawn patient go together): ``ci`` maps each AP metric to its interval.
    The images are matched once; each resample only re-accumulates."""
    from medflow.intervals import patient_bootstrap

    ev = _evaluate(images)
    out = {**_accumulate(ev, list(range(len(images)))), "n_boxes": sum(len(i["truth"]) for i in images),
           "n_images": len(images), "ci": {}}
    patients = [i.get("patient", str(k)) for k, i in enumerate(images)]
    if n_boot and len(set(patients)) > 1 and out["n_boxes"]:
        def stat(rows):
            ap = _accumulate(ev, [int(r) for r in rows])
            return {m: ap[m] for m in AP_METRICS}

        ci = patient_bootstrap(stat, patients, list(AP_METRICS), n=int(n_boot), seed=seed)
        out["ci"] = {m: [float(v) for v in ci[m]] for m in AP_METRICS if m in ci}
    out["ci_method"] = {m: "patient bootstrap, BCa" for m in out["ci"]}
    if n_boot and out["n_boxes"]:
        from medflow.intervals import WILSON_MEAN, wilson_mean

        for m in AP_METRICS:  # one patient, or every resample alike (AP 1.0 or 0.0): a Wilson interval over the boxes
            if m not in out["ci"] and np.isfinite(out[m]):
                out["ci"][m], out["ci_method"][m] = list(wilson_mean(out[m], out["n_boxes"])), WILSON_MEAN
    return out


def centre_prior(shape, boxes, size) -> np.ndarray:
    """Where lesions usually are: the training boxes' centres (on the model grid) smoothed with a Gaussian of
    half the median box size, scaled to a maximum of 1 (ones everywhere without a training box)."""
    from scipy import ndimage

    prior = np.zeros(shape, np.float64)
    for r0, c0, r1, c1 in boxes:
        r, c = int(round((r0 + r1) / 2)), int(round((c0 + c1) / 2))
        if 0 <= r < shape[0] and 0 <= c < shape[1]:
            prior[r, c] += 1.0
    if not prior.any():
        return np.ones(shape, np.float32)
    prior = ndimage.gaussian_filter(prior, np.asarray(size, dtype=float) / 2.0)
    return (prior / prior.max()).astype(np.float32)


def baseline_boxes(image: np.ndarray, size, prior: np.ndarray | None = None, *, max_boxes: int = 20) -> list[dict]:
    """The declared baseline (``BASELINE``) on a prepared image (H, W): boxes of ``size`` (height, width) at the
    local maxima of a difference of Gaussians weighted by ``prior`` (``centre_prior``; none: 1), best first."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    h, w = (float(v) for v in size)
    small, large = np.array([h, w]) / 6.0, np.array([h, w]) / 2.0
    dog = ndimage.gaussian_filter(img, small) - ndimage.gaussian_filter(img, large)
    if prior is not None:
        dog = dog * prior
    local = dog == ndimage.maximum_filter(dog, size=3)
    idx = np.argwhere(local & (dog > 0))
    order = np.argsort(-dog[tuple(idx.T)], kind="stable")[:max_boxes]
    return [{"box": [r - h / 2, c - w / 2, r + h / 2, c + w / 2], "score": float(dog[r, c])}
            for r, c in idx[order].tolist()]
