"""Models that leave medflow: a finished run's model as ONNX or a TensorFlow SavedModel, with its contract.

``export_run`` writes the model through Keras 3's own exporter (``Model.export``: ONNX through
tf2onnx, or a SavedModel with a ``serve`` signature) and ``contract.json`` beside it: what the
model expects and returns, so that another runtime or an inference server beside the PACS can
use it without medflow. The model takes prepared arrays: medflow's preprocessing steps (listed
in the contract, with their parameters) applied to the image in its stored orientation and
units (CT in HU); the export does not contain them. After writing, the export is loaded by its
runtime (onnxruntime, ``tf.saved_model.load``) and run on a random input against the Keras
model; a difference above ``TOLERANCE`` fails the export.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import numpy as np

FORMATS = ("onnx", "savedmodel")
TOLERANCE = 1e-4


def export_run(run_dir: str | Path, fmt: str, output: str | Path | None = None) -> dict:
    """Export a finished run's model as ``fmt`` (``onnx`` or ``savedmodel``) into ``output`` (default
    ``RUN/export/<fmt>``); returns the contract (also written as ``contract.json``).

    Raises:
        ValueError: an unknown format, or an export that does not reproduce the Keras model.
    """
    import keras

    import models.losses  # noqa: F401 - custom objects of the saved segmentation and detection models
    from medflow import __version__
    from medflow.predicting import load_run
    from medflow.runs import write_text_atomic

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    run = load_run(run_dir)
    model = keras.models.load_model(run.model_path, compile=False)
    model(np.zeros([1, *[int(d) for d in model.input_shape[1:]]], "float32"))  # the ONNX exporter wants a called model
    out = Path(output).expanduser().resolve() if output else run.run_dir / "export" / fmt
    out.mkdir(parents=True, exist_ok=True)
    name = "model.onnx" if fmt == "onnx" else "savedmodel"
    tmp = out / f".{name}.{uuid.uuid4().hex[:8]}.tmp"  # whole or not at all: written beside, then renamed
    try:
        model.export(str(tmp), format="onnx" if fmt == "onnx" else "tf_saved_model", verbose=False)
        difference = _check(model, tmp, fmt)
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    spatial = list(model.input_shape[1:])
    metrics = run.metrics
    contract = {
        "medflow_version": __version__, "run_id": run.run_id, "pipeline": run.spec.name,
        "task": run.spec.model.task, "arch": run.spec.model.arch, "format": fmt, "file": name,
        "input": {"shape": [None, *spatial], "dtype": "float32",
                  "layout": "batch, " + ("z, y, x" if len(spatial) == 4 else "y, x" if len(spatial) == 3 else
                                         "samples, leads") + ", channel",
                  "what": "the image after the preprocessing steps below, in the stored orientation (rows y, "
                          "columns x, slices z ascending along the slice normal) and units (CT: HU)"},
        "preprocessing": {"source": run.spec.data.format, "modalities": run.spec.ingest.modalities,
                          "steps": [{name: args} for name, args in run.spec.steps()]},
        "output": {"shape": [None, *list(model.output_shape[1:])]},
        "checked": {"runtime": "onnxruntime" if fmt == "onnx" else "tf.saved_model", "max_abs_difference":
                    difference},
    }
    if run.spec.model.task in ("classification", "signal"):
        classes = list(metrics.get("classes", ["0", "1"]))
        contract["output"].update({
            "classes": classes,
            "meaning": (f"the probability of {classes[1]!r} (sigmoid)" if len(classes) == 2
                        else "one probability per class, in the order of classes (softmax)"),
            "threshold": metrics.get("threshold") if len(classes) == 2 else None,
            "calibration": (metrics.get("calibration") or {}).get("map"),
        })
    write_text_atomic(out / "contract.json", json.dumps(contract, indent=1, default=str))
    return {**contract, "path": str(out / name), "folder": str(out)}


def _check(model, path: Path, fmt: str) -> float:
    """The largest difference between the Keras model and the exported one on a random batch of two."""
    shape = [2, *[int(d) for d in model.input_shape[1:]]]
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    expected = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
    got = np.asarray(run_exported(path, fmt, x), dtype=np.float64)
    difference = float(np.abs(got - expected).max())
    if not difference <= TOLERANCE:
        raise ValueError(f"the {fmt} export differs from the Keras model by {difference:.2e} (more than "
                         f"{TOLERANCE:g}); not written")
    return difference


def run_exported(path: str | Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """An exported model's output for the batch ``x`` in its own runtime (onnxruntime, or TensorFlow's SavedModel
    loader): what another program does with the export."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.astype("float32")})[0]
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))
    return loaded.serve(tf.constant(x, dtype=tf.float32)).numpy()
