"""Explainability: Grad-CAM heat maps for 2D and 3D classifiers, and the cases the report shows."""

from __future__ import annotations

import logging
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
    probe = _probe(keras, model, target, head)
    x = tf.convert_to_tensor(image[None, ..., None], dtype=tf.float32)
    kernel, bias = (tf.cast(w, tf.float32) for w in head.weights[:2])
    with tf.GradientTape() as tape:
        features, pooled = probe(x, training=False)
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


def _probe(keras, model, target, head):
    """A model from the input to (``target``'s feature maps, the head's input).

    A loaded ``Sequential`` model's layer outputs are not connected to its inputs, so its
    layers are called anew on a fresh input.
    """
    if not isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, [target.output, head.input])
    inputs = keras.Input(shape=model.input_shape[1:])
    x, features = inputs, None
    for layer in model.layers[:-1]:
        x = layer(x)
        if layer is target:
            features = x
    return keras.Model(inputs, [features, x])


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


def explain_cases(model_path: str, loader: Callable[[str], np.ndarray], cases: list[dict]) -> list[dict]:
    """For each case: the image (a 2D image, or a volume's axial slice where Grad-CAM peaks) with its
    heat map, for the predicted class (of a k-fold ensemble: fold 0's model)."""
    import keras

    from models.ensemble import member_for_explanations

    model = keras.models.load_model(member_for_explanations(model_path), compile=False)
    spatial = tuple(model.input_shape[1:-1])
    out = []
    for case in cases:
        image = loader(case["series_key"]).reshape(spatial).astype(np.float32)
        cam = grad_cam(model, image, class_index=case.get("prediction"))
        if image.ndim == 2:
            out.append({**case, "z": 0, "image": image, "cam": cam})
            continue
        z = int(np.argmax(cam.reshape(cam.shape[0], -1).max(axis=1)))
        out.append({**case, "z": z, "image": image[z], "cam": cam[z]})
    return out


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
