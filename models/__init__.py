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
    forwards: str = ""  # the builder that the target's ``**params`` go to, if it has them


_UNET = "models.unet:build_unet"
# set by the task kinds, not by model.params
_NOT_PARAMS = {"input_shape", "ndim", "n_classes"}

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
    "unet2d": ModelInfo("models.unet:build_unet2d", "segmentation", 2, "2D U-Net on slices", _UNET),
    "unet3d": ModelInfo("models.unet:build_unet3d", "segmentation", 3, "3D U-Net on volumes or patches", _UNET),
    "centernet3d": ModelInfo("models.detector:build_centernet3d", "detection", 3,
                             "CenterNet-style heat map and size heads on a 3D U-Net", _UNET),
    "centernet2d": ModelInfo("models.detector:build_centernet2d", "detection2d", 2,
                             "CenterNet-style heat map and box-size heads on a 2D U-Net", _UNET),
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


def params_of(name: str) -> set[str] | None:
    """The keyword parameters ``model.params`` may give the builder of ``name``, read from the builders' source
    (so checking a spec imports no Keras); None when they cannot be told (a builder registered from elsewhere
    that takes ``**kwargs`` with no ``forwards``).

    >>> sorted(params_of("seed_cnn"))
    ['batch_norm', 'dense', 'dropout', 'filters']
    >>> {"filters", "norm", "head"} <= params_of("centernet3d")
    True
    """
    entry = info(name)
    names, open_ended = _signature(entry.target)
    if open_ended:
        if not entry.forwards:
            return None
        more, open_ended = _signature(entry.forwards)
        if open_ended:
            return None
        names |= more
    return names - _NOT_PARAMS


def _signature(target: str) -> tuple[set[str], bool]:
    """The parameter names of ``module:function`` and whether it takes ``**kwargs``, by parsing its module."""
    import ast
    import importlib.util

    module, func = target.split(":")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return set(), True
    with open(spec.origin, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == func:
            a = node.args
            names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
            return names, a.kwarg is not None
    return set(), True


def get(name: str) -> Callable:
    """The builder registered under ``name``."""
    module, func = info(name).target.split(":")
    return getattr(importlib.import_module(module), func)
