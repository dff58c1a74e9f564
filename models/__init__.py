"""Model registry: names in a spec map to Keras builders (config holds no code).

Builders are imported lazily, so validating a spec does not import Keras.

>>> "cnn3d" in available()
True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

# name -> "module:function"; every builder takes ``input_shape`` and keyword parameters.
_REGISTRY: dict[str, str] = {
    "cnn3d": "models.cnn3d:build_cnn3d",
    "unet2d": "models.unet:build_unet2d",
    "unet3d": "models.unet:build_unet3d",
}
# name -> what the model predicts
_TASKS: dict[str, str] = {"cnn3d": "classification", "unet2d": "segmentation", "unet3d": "segmentation"}


def available() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def task_of(name: str) -> str:
    """``classification`` or ``segmentation``: what the model registered as ``name`` predicts."""
    return _TASKS.get(name, "classification")


def register(name: str, target: str, task: str = "classification") -> None:
    """Register a builder as ``"package.module:function"`` under ``name``, for ``task``."""
    if ":" not in target:
        raise ValueError(f"Received target={target!r}, expected 'package.module:function'.")
    if task not in ("classification", "segmentation"):
        raise ValueError(f"Received task={task!r}, expected 'classification' or 'segmentation'.")
    _REGISTRY[name] = target
    _TASKS[name] = task


def get(name: str) -> Callable:
    """The builder registered under ``name``."""
    try:
        module, func = _REGISTRY[name].split(":")
    except KeyError:
        raise KeyError(f"Received an unknown model {name!r}; expected one of: {', '.join(available())}.") from None
    return getattr(importlib.import_module(module), func)
