"""Explainability: Grad-CAM heat maps for 2D and 3D classifiers, and the cases the report shows."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


def grad_cam(model, image: np.ndarray, *, layer: str | None = None, class_index: int | None = None) -> np.ndarray:
    """Grad-CAM of one class's logit: float32 map of the image's shape in [0, 1].

    Works for 2D and 3D classifiers: ``image`` is (H, W) or (Z, Y, X), preprocessed like the
    training data. Uses the last layer with spatial feature maps (the deepest ones) unless
    ``layer`` names one, and differentiates the logit of the final unit (before the sigmoid
    or softmax, which saturate and have no gradient on confident cases). For a sigmoid
    output the class is the positive one; for a softmax output ``class_index`` (default: the
    predicted class). TensorFlow backend only.

    Args:
        model: a Keras model ending in ``Dense(1, sigmoid)`` or ``Dense(K, softmax)``.
        image: float ndarray of shape (H, W) or (Z, Y, X).
        layer: name of the layer whose feature maps are weighted.
        class_index: the class to explain (softmax outputs).
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(f"Grad-CAM needs the TensorFlow backend; Keras runs on {keras.backend.backend()}")
    import tensorflow as tf

    rank = image.ndim + 2  # batch and channel axes
    target = model.get_layer(layer) if layer else [lay for lay in model.layers
                                                   if len(getattr(lay, "output").shape) == rank][-1]
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense):
        raise ValueError(f"Received a model whose last layer is {head.name!r}, expected a Dense classifier head.")
    front, tail = _split(keras, model, target, head)
    x = tf.convert_to_tensor(image[None, ..., None], dtype=tf.float32)
    kernel, bias = (tf.cast(w, tf.float32) for w in head.weights[:2])
    # The feature maps are computed outside the tape, and only the layers after them (pooling,
    # dropout, dense) are differentiated: no convolution's gradient is ever taken. TensorFlow's
    # eager Conv2D filter gradient crashed the process in oneDNN's AVX-512 kernels (issue 24), and
    # Grad-CAM never needed it.
    features = tf.convert_to_tensor(front(x, training=False))
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(features)
        pooled = tail(features, training=False)
        logits = tf.matmul(tf.cast(pooled, tf.float32), kernel) + bias
        if head.units == 1:
            chosen = 0
        else:
            chosen = int(tf.argmax(logits[0])) if class_index is None else int(class_index)
        logit = logits[:, chosen]
    grads = tape.gradient(logit, features)
    spatial = tuple(range(1, rank - 1))
    weights = tf.reduce_mean(grads, axis=spatial)  # one weight per channel
    weights = tf.reshape(weights, [1] * (rank - 1) + [-1])
    cam = tf.nn.relu(tf.reduce_sum(features * weights, axis=-1))[0].numpy()
    cam = ndimage.zoom(cam, np.asarray(image.shape) / np.asarray(cam.shape), order=1)
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).astype(np.float32)


def _split(keras, model, target, head):
    """Two models: the input to ``target``'s feature maps, and those maps to the head's input.

    A loaded ``Sequential`` model's layer outputs are not connected to its inputs, so its
    layers are called anew on fresh inputs.
    """
    if not isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, target.output), keras.Model(target.output, head.input)
    body = model.layers[:-1]
    cut = body.index(target) + 1
    inputs = keras.Input(shape=model.input_shape[1:])
    x = inputs
    for layer in body[:cut]:
        x = layer(x)
    front = keras.Model(inputs, x)
    maps = keras.Input(shape=tuple(x.shape[1:]))
    y = maps
    for layer in body[cut:]:
        y = layer(y)
    return front, keras.Model(maps, y)


def select_cases(rows: list[dict], *, n_errors: int = 2) -> list[dict]:
    """Test cases worth explaining: up to ``n_errors`` errors (most confident first), then the most
    confident correct case of each class.

    ``rows`` have ``series_key``, ``label``, ``prediction`` and ``confidence`` (the score of the
    predicted class).

    >>> rows = [{"series_key": k, "label": l, "prediction": p, "confidence": c} for k, l, p, c in
    ...         [("a", 1, 1, 0.9), ("b", 0, 0, 0.9), ("c", 1, 0, 0.8), ("d", 0, 0, 0.7)]]
    >>> [r["series_key"] for r in select_cases(rows)]
    ['c', 'a', 'b']
    """
    errors = sorted((r for r in rows if r["prediction"] != r["label"]), key=lambda r: -r["confidence"])
    correct = [r for r in rows if r["prediction"] == r["label"]]
    best = []
    for label in sorted({r["label"] for r in correct}, reverse=True):
        best.append(max((r for r in correct if r["label"] == label), key=lambda r: r["confidence"]))
    return errors[:n_errors] + best


def explanation_env() -> dict[str, str]:
    """The environment of the explanation child: oneDNN capped at AVX2 unless the user set a cap.

    TensorFlow's eager gradients take kernels that training (graph mode) never runs; on CPUs with
    AVX-512 some of oneDNN's crashed (issue 24). Explanations are a few cases, so the AVX2
    kernels, the ones most CPUs run, cost nothing that matters.
    """
    return {} if os.environ.get("ONEDNN_MAX_CPU_ISA") else {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def explain_isolated(job: str, model_path: str, inputs: list[np.ndarray], classes: list, *,
                     method: str) -> tuple[list[np.ndarray] | None, dict]:
    """Run an explanation job (``grad_cam_job`` or ``integrated_gradients_job``) in a child process.

    Returns the maps (None when there are none) and a record for ``metrics.json`` and the report:
    ``{"method", "status": "ok" | "failed" | "unavailable", "reason", "signal", "where"}``. A native
    crash or an error in the child fails the explanation only, never the run.
    """
    from medflow.isolation import ChildCrashed, ChildFailed, run_isolated

    record = {"method": method, "status": "ok", "reason": None, "signal": None, "where": None}
    try:
        maps = run_isolated(f"models.explain:{job}", {"model_path": str(model_path), "inputs": inputs,
                                                      "classes": classes}, env=explanation_env())
    except ChildCrashed as exc:
        logger.warning("%s failed, the run goes on without heat maps: %s", method, exc)
        return None, {**record, "status": "failed", "reason": str(exc), "signal": exc.signal_name,
                      "where": exc.where}
    except ChildFailed as exc:
        status = "unavailable" if exc.exc_type == "NotImplementedError" else "failed"
        logger.warning("%s %s: %s", method, status, exc)
        return None, {**record, "status": status, "reason": str(exc)}
    return maps, record


def grad_cam_job(model_path: str, inputs: list[np.ndarray], classes: list) -> list[np.ndarray]:
    """Grad-CAM maps of ``inputs`` (each reshaped to the model's input) for ``classes``; runs in the
    explanation child. A k-fold ensemble is explained by fold 0's model."""
    import keras

    from models.ensemble import member_for_explanations

    model = keras.models.load_model(member_for_explanations(model_path), compile=False)
    spatial = tuple(model.input_shape[1:-1])
    return [grad_cam(model, np.asarray(x, np.float32).reshape(spatial), class_index=c)
            for x, c in zip(inputs, classes)]


def integrated_gradients_job(model_path: str, inputs: list[np.ndarray], classes: list) -> list[np.ndarray]:
    """Integrated gradients over time of waveforms ``inputs`` for ``classes``; runs in the explanation child."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    shape = tuple(model.input_shape[1:-1])
    return [integrated_gradients(model, np.asarray(x, np.float32).reshape(shape), class_index=c)
            for x, c in zip(inputs, classes)]


def explain_cases(model_path: str, loader: Callable[[str], np.ndarray], cases: list[dict]
                  ) -> tuple[list[dict], dict]:
    """For each case: the image (a 2D image, or a volume's axial slice where Grad-CAM peaks) with its
    heat map for the predicted class, computed in a child process (``explain_isolated``); and the
    explanation's record. When it failed, the cases come back without ``cam`` (the middle slice of a
    volume)."""
    images = [np.asarray(loader(case["series_key"]), np.float32) for case in cases]
    cams, record = explain_isolated("grad_cam_job", model_path, images, [c.get("prediction") for c in cases],
                                    method="Grad-CAM")
    out = []
    for i, (case, volume) in enumerate(zip(cases, images)):
        if cams is None:  # the cases without heat maps: the image, or a volume's middle slice
            z = volume.shape[0] // 2
            out.append({**case, "z": z, "image": volume[z]})
            continue
        cam = cams[i]
        image = volume.reshape(cam.shape)
        if cam.ndim == 2:
            out.append({**case, "z": 0, "image": image, "cam": cam})
            continue
        z = int(np.argmax(cam.reshape(cam.shape[0], -1).max(axis=1)))
        out.append({**case, "z": z, "image": image[z], "cam": cam[z]})
    return out, record


def integrated_gradients(model, signal: np.ndarray, *, class_index: int | None = None, steps: int = 32,
                         smooth: int = 9) -> np.ndarray:
    """Attribution over time of one waveform: integrated gradients (Sundararajan et al. 2017) of the
    explained class's score from an all-zero signal, summed in magnitude over leads, smoothed and
    scaled to [0, 1]. Works for any differentiable model, recurrent ones included. TensorFlow only.

    Args:
        model: a Keras classifier whose input is (samples, leads, 1).
        signal: (samples, leads), preprocessed like the training data.
        class_index: the class to explain (softmax outputs; default the predicted one).
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(f"integrated gradients need the TensorFlow backend; Keras runs on "
                                  f"{keras.backend.backend()}")
    import tensorflow as tf

    x = tf.constant(signal[None, ..., None].astype(np.float32))
    alphas = tf.reshape(tf.linspace(1.0 / steps, 1.0, steps), (steps, 1, 1, 1))
    path = alphas * x  # from the zero signal to the input
    with tf.GradientTape() as tape:
        tape.watch(path)
        out = model(path, training=False)
        if out.shape[-1] == 1:
            score = out[:, 0]
        else:
            k = int(np.argmax(model(x, training=False)[0])) if class_index is None else int(class_index)
            score = out[:, k]
    grads = tape.gradient(score, path).numpy().mean(axis=0)[..., 0]  # (samples, leads)
    attribution = np.abs(signal * grads).sum(axis=1)
    attribution = ndimage.uniform_filter1d(attribution, max(1, smooth))
    top = float(attribution.max())
    return (attribution / top if top > 0 else attribution).astype(np.float32)
