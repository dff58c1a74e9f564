"""Explainability: Grad-CAM heat maps for a volume classifier, and the cases the report shows."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)


def grad_cam(model, volume: np.ndarray, *, layer: str | None = None) -> np.ndarray:
    """Grad-CAM of the positive-class logit: float32 map of shape (Z, Y, X) in [0, 1].

    Uses the last layer with a 5-D output (the deepest feature maps) unless ``layer`` names
    one, and differentiates the logit of the final sigmoid unit rather than the probability,
    which saturates (and has no gradient) on confident cases. TensorFlow backend only.

    Args:
        model: a Keras model with a final ``Dense(1, activation="sigmoid")``.
        volume: float ndarray of shape (Z, Y, X), preprocessed like the training data.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(f"Grad-CAM needs the TensorFlow backend; Keras runs on {keras.backend.backend()}")
    import tensorflow as tf

    target = model.get_layer(layer) if layer else [lay for lay in model.layers if len(lay.output.shape) == 5][-1]
    head = model.layers[-1]
    if not isinstance(head, keras.layers.Dense) or head.units != 1:
        raise ValueError(f"Received a model whose last layer is {head.name!r}, expected Dense(1) (a binary score).")
    probe = keras.Model(model.inputs, [target.output, head.input])
    x = tf.convert_to_tensor(volume[None, ..., None], dtype=tf.float32)
    kernel, bias = (tf.cast(w, tf.float32) for w in head.weights[:2])
    with tf.GradientTape() as tape:
        features, pooled = probe(x, training=False)
        logit = tf.matmul(tf.cast(pooled, tf.float32), kernel)[:, 0] + bias[0]
    grads = tape.gradient(logit, features)
    weights = tf.reduce_mean(grads, axis=(1, 2, 3))  # one weight per channel
    cam = tf.nn.relu(tf.reduce_sum(features * weights[:, None, None, None, :], axis=-1))[0].numpy()
    cam = ndimage.zoom(cam, np.asarray(volume.shape) / np.asarray(cam.shape), order=1)
    peak = float(cam.max())
    return (cam / peak if peak > 0 else cam).astype(np.float32)


def select_cases(rows: list[dict], threshold: float, *, n: int = 4) -> list[dict]:
    """Test cases worth explaining: every error first, then the most confident positive and negative.

    ``rows`` have ``series_key``, ``label`` and ``score``.

    >>> rows = [{"series_key": k, "label": l, "score": s} for k, l, s in
    ...         [("a", 1, 0.9), ("b", 0, 0.1), ("c", 1, 0.2), ("d", 0, 0.3)]]
    >>> [r["series_key"] for r in select_cases(rows, 0.5)]
    ['c', 'a', 'b']
    """
    errors = [r for r in rows if (r["score"] >= threshold) != bool(r["label"])]
    errors.sort(key=lambda r: -abs(r["score"] - threshold))
    positives = sorted((r for r in rows if r["label"] == 1 and r not in errors), key=lambda r: -r["score"])
    negatives = sorted((r for r in rows if r["label"] == 0 and r not in errors), key=lambda r: r["score"])
    out = errors[: max(0, n - 2)] + positives[:1] + negatives[:1]
    return out[:n]


def explain_cases(model_path: str, loader: Callable[[str], np.ndarray], cases: list[dict]) -> list[dict]:
    """For each case: the axial slice where Grad-CAM peaks, with the image and the heat map there."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    out = []
    for case in cases:
        volume = loader(case["series_key"])
        cam = grad_cam(model, volume)
        z = int(np.argmax(cam.reshape(cam.shape[0], -1).max(axis=1)))
        out.append({**case, "z": z, "image": volume[z].astype(np.float32), "cam": cam[z]})
    return out
