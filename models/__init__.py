"""Model registry: names in a spec map to Keras builders (config holds no code).

Each entry records what the model predicts (its task kind, see ``medflow.kinds``) and the
number of spatial dimensions of its input, so the spec can check ``model.arch`` against
``model.task`` and the kinds can feed 2D or 3D batches without knowing model names.
Builders are imported lazily, so validating a spec does not import Keras.

>>> info("seed_cnn").task, info("seed_cnn").ndim
('classification', 2)
>>> "cnn3d" in available("classification") and "unet2d" not in available("classification")
True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import medflow  # noqa: F401  (sets TensorFlow's CPU options before any builder imports it)


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its builder (``"module:function"``), task kind and input dimensionality."""

    target: str
    task: str
    ndim: int  # dimensions of one input: 1 (samples, leads: a waveform), 2 (H, W) or 3 (Z, Y, X)
    summary: str = ""


# Every builder takes ``input_shape`` (spatial dims + channels) and keyword parameters;
# classifiers also take ``n_classes`` (2: one sigmoid unit; K > 2: K softmax units).
_REGISTRY: dict[str, ModelInfo] = {
    "cnn3d": ModelInfo("models.cnn3d:build_cnn3d", "classification", 3, "small 3D CNN, global max pooling"),
    "seed_cnn": ModelInfo("models.cnn2d:build_seed_cnn", "classification", 2,
                          "Keras Sequential chest X-ray CNN: Conv 32/64/128, Dense 512, Dropout 0.5"),
    "resnet2d": ModelInfo("models.cnn2d:build_resnet2d", "classification", 2,
                          "pre-activation ResNet (He et al. 2016) sized for training from scratch"),
    "efficientnet_b0": ModelInfo("models.cnn2d:build_efficientnet_b0", "classification", 2,
                                 "keras.applications EfficientNetB0, weights=None"),
    "gru": ModelInfo("models.rnn:build_gru", "signal", 1, "GRU over the samples of a waveform"),
    "lstm": ModelInfo("models.rnn:build_lstm", "signal", 1, "LSTM over the samples (bidirectional option)"),
    "cnn_gru": ModelInfo("models.rnn:build_cnn_gru", "signal", 1,
                         "1D CNN front end and a bidirectional GRU: the common ECG architecture"),
    "unet2d": ModelInfo("models.unet:build_unet2d", "segmentation", 2, "2D U-Net on slices"),
    "unet3d": ModelInfo("models.unet:build_unet3d", "segmentation", 3, "3D U-Net on volumes or patches"),
    "centernet3d": ModelInfo("models.detector:build_centernet3d", "detection", 3,
                             "CenterNet-style heat map and size heads on a 3D U-Net"),
    "centernet2d": ModelInfo("models.detector:build_centernet2d", "detection2d", 2,
                             "CenterNet-style heat map and box-size heads on a 2D U-Net"),
}


def available(task: str | None = None) -> list[str]:
    """Names of the registered models (of one task kind when ``task`` is given)."""
    return sorted(name for name, i in _REGISTRY.items() if task is None or i.task == task)


def info(name: str) -> ModelInfo:
    """The registry entry of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"Received an unknown model {name!r}; expected one of: {', '.join(available())}.") from None


def register(name: str, target: str, *, task: str, ndim: int, summary: str = "") -> None:
    """Register a builder as ``"package.module:function"`` under ``name``, for a task kind."""
    if ":" not in target:
        raise ValueError(f"Received target={target!r}, expected 'package.module:function'.")
    if ndim not in (1, 2, 3):
        raise ValueError(f"Received ndim={ndim!r}, expected 1, 2 or 3 spatial dimensions.")
    _REGISTRY[name] = ModelInfo(target, task, ndim, summary)


def get(name: str) -> Callable:
    """The builder registered under ``name``."""
    module, func = info(name).target.split(":")
    return getattr(importlib.import_module(module), func)
