"""The run report: one self-contained HTML file with embedded plots, and its markdown summary."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jinja2 import Environment, FileSystemLoader, select_autoescape  # noqa: E402

from medflow.runs import is_interval  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

logger = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
METRIC_LABELS = {
    "auc": "ROC AUC", "accuracy": "Accuracy", "precision": "Precision (PPV)", "recall": "Recall (sensitivity)",
    "specificity": "Specificity", "f1": "F1", "auc_micro": "ROC AUC, micro average",
}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_example_panels(path: Path, draw, title: str) -> str | None:
    """The saved examples of a run (``path``: an npz of ``images`` and their JSON ``meta``), one panel each:
    the image in grey, then ``draw(ax, meta)`` draws its marks and returns the panel's title. None without
    the file (no example to show)."""
    if not path.exists():
        return None
    with np.load(path) as data:
        images, meta = data["images"], json.loads(str(data["meta"]))
    fig, axes = plt.subplots(1, len(images), figsize=(3.4 * len(images), 3.6), squeeze=False)
    for ax, image, m in zip(axes[0], images, meta):
        ax.imshow(image, cmap="gray")
        ax.set_title(draw(ax, m), fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def plot_history(history: dict[str, list[float]]) -> str:
    metrics = ["loss", *[m for m in ("auc", "dice") if m in history][:1]]  # a detector has a loss only
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for prefix, style in (("", "-"), ("val_", "--")):
            vals = history.get(prefix + metric)
            if vals:
                ax.plot(range(1, len(vals) + 1), vals, style, label=(prefix or "train_") + metric)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
        ax.grid(alpha=0.3)
    return _png(fig)


def _bootstrap_band(ax, y, s, curve, grid, seed: int, n_boot: int, color: str) -> None:
    """A 95% pointwise band of ``curve(y, s) -> values on grid`` over case resamples with both classes."""
    rng = np.random.default_rng(seed)
    curves = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            curves.append(curve(y[idx], s[idx]))
    if len(curves) >= 20:
        lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
        ax.fill_between(grid, lo, hi, color=color, alpha=0.18, lw=0, label="95% band (bootstrap)")


def _operating(y, s, threshold: float) -> tuple[float, float, float]:
    """Sensitivity, 1 - specificity and precision of the decisions ``s >= threshold``."""
    pred = s >= threshold
    sens = float(pred[y == 1].mean()) if (y == 1).any() else float("nan")
    fpr = float(pred[y == 0].mean()) if (y == 0).any() else float("nan")
    prec = float(y[pred].mean()) if pred.any() else float("nan")
    return sens, fpr, prec


def plot_roc(y_true, score, auc: float, *, threshold: float | None = None, baseline: dict | None = None,
             n_boot: int = 200, seed: int = 0) -> str:
    """The test ROC curve with a 95% pointwise band (true-positive rate over a grid of false-positive rates, from
    bootstrap resamples of the cases), the operating point at ``threshold``, and the declared baseline's curve
    (``baseline``: ``name``, ``scores``, ``auc``)."""
    from sklearn.metrics import roc_curve

    y, s = np.asarray(y_true).astype(int), np.asarray(score, dtype=float)
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    grid = np.linspace(0, 1, 101)

    def tpr_on_grid(yy, ss):
        fpr, tpr, _ = roc_curve(yy, ss)
        return np.interp(grid, fpr, tpr)

    _bootstrap_band(ax, y, s, tpr_on_grid, grid, seed, n_boot, "#1f77b4")
    fpr, tpr, _ = roc_curve(y, s)
    ax.plot(fpr, tpr, color="#1f77b4", label=f"model (AUC {auc:.3f})")
    if baseline is not None:
        bfpr, btpr, _ = roc_curve(y, np.asarray(baseline["scores"], float))
        ax.plot(bfpr, btpr, "--", color="#7f7f7f", label=f"baseline (AUC {baseline['auc']:.3f})")
    if threshold is not None:
        sens, op_fpr, _ = _operating(y, s, threshold)
        ax.plot([op_fpr], [sens], "o", color="#d62728", label=f"operating point (threshold {threshold:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false-positive rate (1 − specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.set_title("ROC curve, test split")
    ax.legend(loc="lower right", fontsize=7)
    return _png(fig)


def plot_pr(y_true, score, *, threshold: float | None = None, baseline: dict | None = None, n_boot: int = 200,
            seed: int = 0) -> str:
    """The test precision-recall curve with a 95% pointwise band (precision over a grid of recalls, from
    bootstrap resamples of the cases), the operating point, the baseline's curve, and the prevalence (what a
    model without skill reaches)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    y, s = np.asarray(y_true).astype(int), np.asarray(score, dtype=float)
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    grid = np.linspace(0, 1, 101)

    def precision_on_grid(yy, ss):
        precision, recall, _ = precision_recall_curve(yy, ss)
        r_up, p_up = recall[::-1], precision[::-1]  # recall ascending
        best_beyond = np.maximum.accumulate(p_up[::-1])[::-1]  # the best precision at this recall or more
        return np.interp(grid, r_up, best_beyond)

    _bootstrap_band(ax, y, s, precision_on_grid, grid, seed, n_boot, "#1f77b4")
    precision, recall, _ = precision_recall_curve(y, s)
    ax.step(recall, precision, where="post", color="#1f77b4",
            label=f"model (average precision {average_precision_score(y, s):.3f})")
    if baseline is not None:
        b = np.asarray(baseline["scores"], float)
        bp, br, _ = precision_recall_curve(y, b)
        ax.step(br, bp, "--", where="post", color="#7f7f7f",
                label=f"baseline (average precision {average_precision_score(y, b):.3f})")
    if threshold is not None:
        sens, _, prec = _operating(y, s, threshold)
        ax.plot([sens], [prec], "o", color="#d62728", label=f"operating point (threshold {threshold:.3f})")
    ax.axhline(y.mean(), ls=":", color="grey", label=f"prevalence {y.mean():.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (positive predictive value)")
    ax.set_title("Precision-recall curve, test split")
    ax.legend(loc="lower left", fontsize=7)
    return _png(fig)


def plot_confusion(y_true, y_pred, class_names: list[str], *, title: str) -> str:
    """The K x K confusion matrix of the test split (rows: truth, columns: decision)."""
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * max(k, 3), 0.9 + 0.8 * max(k, 3)))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(k)), display_labels=class_names,
                                            ax=ax, colorbar=False, cmap="Blues")
    ax.set_title(f"Confusion matrix ({title})", fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    return _png(fig)


def plot_roc_ovr(y_true, proba, class_names: list[str]) -> str:
    """One-vs-rest ROC curve of each class on the test split."""
    fig, ax = plt.subplots(figsize=(4.4, 4))
    y = np.asarray(y_true)
    for k, name in enumerate(class_names):
        if 0 < (y == k).sum() < len(y):
            RocCurveDisplay.from_predictions(y == k, proba[:, k], ax=ax, name=name)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("false-positive rate (1 − specificity)")  # not scikit-learn's "(Positive label: 1)"
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.set_title("ROC curves (one vs rest), test split", fontsize=9)
    return _png(fig)


def plot_reliability(curves: dict[str, list[dict]], *, binary: bool) -> str:
    """Reliability diagram: mean probability against observed frequency per bin (dot size: cases)."""
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    for (name, bins), marker in zip(curves.items(), ("o-", "s--")):
        if bins:
            n = np.array([b["n"] for b in bins], dtype=float)
            ax.plot([b["mean_p"] for b in bins], [b["observed"] for b in bins], marker, label=name,
                    markersize=3)
            ax.scatter([b["mean_p"] for b in bins], [b["observed"] for b in bins], s=10 + 80 * n / n.max(), alpha=0.4)
    ax.set_xlabel("mean score in bin" if binary else "mean confidence (most probable class)")
    ax.set_ylabel("fraction positive" if binary else "fraction correct")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability diagram, test split", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _png(fig)


def calibration_rows(calibration: dict) -> list[dict]:
    """Brier score and ECE on validation and test, before and after the calibration map.

    >>> c = {"method": "none", "bins": 10, "before": {"val": {"brier": 0.1, "ece": 0.05, "n": 9},
    ...      "test": {"brier": 0.2, "ece": 0.1, "n": 10}}}
    >>> c["after"] = c["before"]
    >>> calibration_rows(c)[1]
    {'split': 'test', 'n': 10, 'brier': '0.200', 'ece': '0.100'}
    """
    rows = []
    for split in ("val", "test"):
        before, after = calibration["before"][split], calibration["after"][split]
        row = {"split": split, "n": before["n"], "brier": _num(before["brier"]), "ece": _num(before["ece"])}
        if calibration["method"] != "none":
            row.update({"brier_calibrated": _num(after["brier"]), "ece_calibrated": _num(after["ece"])})
        rows.append(row)
    return rows


def _num(value, digits: int = 3) -> str:
    return "–" if value is None or value != value else f"{value:.{digits}f}"


def plot_scores(y_true, score, threshold: float) -> str:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    y, s = np.asarray(y_true), np.asarray(score)
    bins = np.linspace(0, 1, 21)
    ax.hist(s[y == 0], bins=bins, alpha=0.6, label="negative")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, label="positive")
    ax.axvline(threshold, color="k", ls="--", label="threshold")
    ax.set_xlabel("score")
    ax.set_title("Score distribution, test split")
    ax.legend()
    return _png(fig)


def plot_gradcam(images: np.ndarray, cams: np.ndarray, meta: list[dict]) -> str:
    """Each case in a column: the plain image (or slice) above, its Grad-CAM over it below (a perceptually uniform
    colour map, with a colour bar: 0 = no weight in the decision, 1 = the most)."""
    n = len(meta)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n + 0.8, 5.4), squeeze=False)
    shown = None
    for col, (image, cam, case) in enumerate(zip(images, cams, meta)):
        top, bottom = axes[0, col], axes[1, col]
        lo, hi = np.percentile(image, [1, 99])
        for ax in (top, bottom):
            ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
            ax.axis("off")
        shown = bottom.imshow(cam, cmap="magma", alpha=0.5, vmin=0, vmax=1)
        verdict = "correct" if case["prediction_name"] == case["label_name"] else "ERROR"
        where = f"\nslice {case['z']}" if case.get("z") else ""
        top.set_title(f"truth {case['label_name']}, predicted {case['prediction_name']}\n"
                      f"({case['confidence']:.2f}, {verdict}){where}", fontsize=8)
    if shown is not None:
        fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.025, pad=0.02, label="Grad-CAM weight")
    return _png(fig)


def plot_signal_explanations(traces: np.ndarray, heats: np.ndarray, meta: list[dict], *,
                             rate: float | None = None, lead: int = 1) -> str:
    """Each case's trace (one lead of the prepared waveform) with its attribution over time as a heat
    strip underneath (where in time the model's decision came from)."""
    n = len(meta)
    fig, axes = plt.subplots(n, 1, figsize=(11, 1.6 * n), squeeze=False)
    for ax, trace, heat, case in zip(axes[:, 0], traces, heats, meta):
        k = min(lead, trace.shape[1] - 1)
        t = np.arange(trace.shape[0]) / rate if rate else np.arange(trace.shape[0])
        y = trace[:, k]
        lo, hi = float(y.min()), float(y.max())
        band = 0.35 * (hi - lo or 1.0)
        ax.imshow(heat[None, :], aspect="auto", cmap="inferno", vmin=0, vmax=1,
                  extent=(t[0], t[-1], lo - 1.1 * band, lo - 0.1 * band))
        ax.plot(t, y, lw=0.7, color="black")
        ax.set_xlim(t[0], t[-1])
        ax.set_ylim(lo - 1.1 * band, hi + 0.05 * band)
        ax.set_yticks([])
        verdict = "correct" if case["prediction_name"] == case["label_name"] else "ERROR"
        ax.set_title(f"truth {case['label_name']}, predicted {case['prediction_name']} "
                     f"({case['confidence']:.2f}, {verdict})", fontsize=8, loc="left")
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("seconds" if rate else "sample", fontsize=7)
    fig.tight_layout()
    return _png(fig)


def quarantine_summary(rows: list[dict]) -> list[dict]:
    """Counts of quarantined files by reason (reasons shortened to their first clause)."""
    counts = Counter(r["reason"].split(" (")[0].split(":")[0] for r in rows)
    return [{"reason": reason, "files": n} for reason, n in counts.most_common()]


# (check, phrase in a quarantine reason, phrase in a catalog action)
QC_CHECKS = (
    ("mixed orientations or sizes", "mixed orientations", "split from"),
    ("duplicate positions", "duplicate slice position", ("dropped", "split into")),
    ("missing slices / uneven spacing", "non-uniform slice spacing", "resampled"),
    ("gantry tilt", "from the slice normal", "de-sheared"),
)


def qc_summary(catalog: dict[str, dict], quarantine: list[dict]) -> list[dict]:
    """Per geometry check: series quarantined and series corrected (split, deduplicated, resampled)."""
    rows = []
    for check, reason_phrase, action_phrases in QC_CHECKS:
        phrases = (action_phrases,) if isinstance(action_phrases, str) else action_phrases
        quarantined = {r.get("series_key") for r in quarantine if reason_phrase in r.get("reason", "")}
        corrected = {e.get("parent", k) for k, e in catalog.items()
                     if any(p in a for a in e.get("qc", {}).get("actions", []) for p in phrases)}
        rows.append({"check": check, "series quarantined": len(quarantined), "series corrected": len(corrected)})
    return rows


def interval_methods(methods: dict[str, str]) -> str:
    """Which method made which metric's interval, in one line for the report.

    >>> interval_methods({"auc": "patient bootstrap, BCa", "accuracy": "Wilson score (at a bound)"})
    'ROC AUC: patient bootstrap, BCa; Accuracy: Wilson score (at a bound)'
    """
    by_method: dict[str, list[str]] = {}
    for name, how in methods.items():
        by_method.setdefault(how, []).append(METRIC_LABELS.get(name, name))
    return "; ".join(f"{', '.join(names)}: {how}" for how, names in by_method.items())


def metrics_rows(metrics: dict, ci: dict, names: list[str], *, macro: bool = False) -> list[dict]:
    rows = []
    for name in names + (["auc_micro"] if macro else []):
        lo_hi = ci.get(name)
        label = METRIC_LABELS.get(name, name)
        rows.append({
            "metric": (f"{label}, macro average" if name != "accuracy" else label) if macro and name != "auc_micro"
            else label,
            "value": f"{metrics[name]:.3f}",
            "ci95": f"{lo_hi[0]:.3f} – {lo_hi[1]:.3f}" if is_interval(lo_hi) else "",
        })
    return rows


def per_class_rows(per_class: list[dict]) -> list[dict]:
    """The per-class table of a K-class run, values rounded for display."""
    return [{"class": r["class"], "support": r["support"],
             **{k: "–" if np.isnan(r[k]) else f"{r[k]:.3f}" for k in ("precision", "recall", "specificity", "f1",
                                                                      "auc")}}
            for r in per_class]


def render_html(context: dict) -> str:
    """The report HTML for a context assembled by ``build_context``."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html", "j2"]))
    return env.get_template("report.html.j2").render(**context)


def build_context(*, kind, section: dict, name: str, run_id: str, cohort: dict, split_counts: list[dict],
                  quarantine: list[dict], history: dict, provenance: dict, qc: list[dict] | None = None) -> dict:
    """Everything the template needs: what every report shows (run, cohort, training, quality
    control, provenance) and the kind's own ``section`` (from ``kind.report_context``)."""
    plots = {"history": plot_history(history) if history else None, **section.get("plots", {})}
    return {**section, "task": kind.name, "section": kind.template, "geometry_qc": kind.takes_images,
            "name": name, "run_id": run_id,
            "cohort": cohort, "split_counts": split_counts, "split_columns": list(split_counts[0]) if split_counts
            else [], "quarantine": quarantine_summary(quarantine), "n_quarantined": len(quarantine), "qc": qc or [],
            "provenance": provenance, "plots": plots}


def markdown_summary(context: dict, kind_lines: list[str]) -> str:
    """A short markdown version of the report (for a Prefect artifact)."""
    from medflow.tables import md  # values from the data (class names, header values in reasons): text, not markup

    lines = [f"# {md(context['name'])} — run `{context['run_id']}`", ""]
    lines += [f"> **Warning**: {md(w)}" for w in context.get("warnings", [])]
    lines += ["", "## Test metrics", "", "| metric | value | 95% CI |", "|---|---|---|"]
    lines += [f"| {md(r['metric'])} | {md(r['value'])} | {md(r['ci95'])} |" for r in context["metrics"]]
    lines += [""] + kind_lines
    columns = context["split_columns"]
    lines += ["", "## Cohort", "", "| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(md(r[c]) for c in columns) + " |" for r in context["split_counts"]]
    lines += ["", f"Quarantined files: {context['n_quarantined']}"]
    lines += [f"- {md(r['reason'])}: {r['files']}" for r in context["quarantine"]]
    stages = context["provenance"].get("stage_seconds", {})
    if stages:
        lines += ["", "## Time per stage", ""] + [f"- {k}: {v:.1f} s" for k, v in stages.items()]
    return "\n".join(lines)


# ------------------------------------------------------------------ segmentation
def seg_metrics_rows(summary: dict, ci: dict, names: list[str]) -> list[dict]:
    from medflow.metrics import SEG_LABELS

    rows = []
    for name in names:
        lo_hi = ci.get(name)
        digits = 3 if name in ("dice", "iou") else 2
        rows.append({"metric": SEG_LABELS.get(name, name), "value": f"{summary[name]:.{digits}f}",
                     "ci95": f"{lo_hi[0]:.{digits}f} – {lo_hi[1]:.{digits}f}" if is_interval(lo_hi) else
                     "none: fewer than 2 cases with a value"})
    return rows


def plot_seg_distribution(cases) -> str:
    """Per-case Dice and HD95 of the test cases with a lesion (box plot with the cases as dots)."""
    lesion = cases[(cases["split"] == "test") & (cases["label"] == 1)]
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    rng = np.random.default_rng(0)
    for ax, col, title in zip(axes, ("dice", "hd95"), ("Dice", "HD95 (mm)")):
        vals = lesion[col].dropna().to_numpy(dtype=float)
        if len(vals):
            ax.boxplot(vals, widths=0.5, showfliers=False)
            ax.plot(1 + rng.uniform(-0.12, 0.12, len(vals)), vals, "o", alpha=0.6, color="#1f77b4")
        ax.set_title(f"{title}, {len(vals)} test case(s)")
        ax.set_xticks([])
    return _png(fig)


def plot_overlays(images: np.ndarray, truths: np.ndarray, preds: np.ndarray, meta: list[dict]) -> str:
    """Best, median and worst test case: the slice with the most foreground, zoomed on the lesion, truth
    contour green, prediction contour red, over the image (1st-99th percentile grey scale)."""
    fig, axes = plt.subplots(1, len(images), figsize=(3.4 * len(images), 3.6), squeeze=False)
    for ax, image, truth, pred, m in zip(axes[0], images, truths, preds, meta):
        image, truth, pred = _zoom_on(image, truth | pred, truth, pred)
        lo, hi = np.percentile(image, [1, 99])
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi)
        if truth.any():
            ax.contour(truth.astype(float), levels=[0.5], colors=["#2ca02c"], linewidths=1.4)
        if pred.any():
            ax.contour(pred.astype(float), levels=[0.5], colors=["#d62728"], linewidths=1.0, linestyles="--")
        ax.set_title(f"{m['which']}: Dice {m['dice']:.3f} (slice {m['z']})", fontsize=9)
        ax.axis("off")
    fig.suptitle("truth (green) and prediction (red, dashed)", fontsize=9)
    return _png(fig)


def _zoom_on(image: np.ndarray, region: np.ndarray, *others: np.ndarray, margin: int = 24):
    """Crop ``image`` (and ``others``) to the bounding box of ``region`` plus a margin (small lesions stay visible)."""
    if not region.any():
        return (image, *others)
    rows, cols = np.nonzero(region)
    r0, r1 = max(0, rows.min() - margin), min(image.shape[0], rows.max() + margin + 1)
    c0, c1 = max(0, cols.min() - margin), min(image.shape[1], cols.max() + margin + 1)
    return tuple(a[r0:r1, c0:c1] for a in (image, *others))
