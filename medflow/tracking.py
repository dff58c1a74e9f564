"""The experiment tracker: TensorBoard event files in each run folder.

Training writes its per-epoch curves (Keras' TensorBoard callback, ``tensorboard/train`` and
``tensorboard/validation``); ``log_evaluation`` adds the evaluation (``tensorboard/evaluate``):
every number of the test and validation summaries, the baseline, calibration and k-fold
figures as scalars, and the run's spec name and id as text. ``tensorboard --logdir RUNS``
then compares all runs of a runs folder side by side.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)


def scalars(evaluation: dict) -> dict[str, float]:
    """The evaluation's numbers as ``group/name`` scalars (finite values only).

    >>> scalars({"test": {"auc": 0.9, "n": 20, "confusion": {"tp": 1}}, "baseline": {"auc": 0.6, "name": "x"},
    ...          "val": {"auc": float("nan")}})
    {'test/auc': 0.9, 'test/n': 20.0, 'baseline/auc': 0.6}
    """
    out = {}
    for group in ("test", "val"):
        for name, value in (evaluation.get(group) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{group}/{name}"] = float(value)
    baseline = evaluation.get("baseline") or {}
    if isinstance(baseline.get("auc"), (int, float)) and math.isfinite(baseline["auc"]):
        out["baseline/auc"] = float(baseline["auc"])
    calibration = evaluation.get("calibration") or {}
    for when in ("before", "after"):
        for name in ("brier", "ece"):
            value = ((calibration.get(when) or {}).get("test") or {}).get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"calibration/{name}_{when}"] = float(value)
    folds = evaluation.get("folds") or {}
    for name in ("test_auc_mean", "test_auc_sd", "held_out_auc_mean", "held_out_auc_sd"):
        if isinstance(folds.get(name), (int, float)) and math.isfinite(folds[name]):
            out[f"folds/{name}"] = float(folds[name])
    return out


def log_evaluation(run_dir: str | Path, evaluation: dict, *, spec_name: str) -> Path | None:
    """Write the evaluation's scalars to ``run_dir/tensorboard/evaluate`` (step 0); returns that folder."""
    try:
        import tensorflow as tf
    except ImportError:  # another Keras backend without TensorFlow installed
        logger.info("no TensorBoard evaluation: TensorFlow is not installed")
        return None
    folder = Path(run_dir) / "tensorboard" / "evaluate"
    writer = tf.summary.create_file_writer(str(folder))
    with writer.as_default():
        for tag, value in scalars(evaluation).items():
            tf.summary.scalar(tag, value, step=0)
        tf.summary.text("run", f"{spec_name} · {Path(run_dir).name} · task {evaluation.get('task', '')}", step=0)
    writer.flush()
    writer.close()
    return folder
