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
}


def available() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def register(name: str, target: str) -> None:
    """Register a builder as ``"package.module:function"`` under ``name``."""
    if ":" not in target:
        raise ValueError(f"Received target={target!r}, expected 'package.module:function'.")
    _REGISTRY[name] = target


def get(name: str) -> Callable:
    """The builder registered under ``name``."""
    try:
        module, func = _REGISTRY[name].split(":")
    except KeyError:
        raise KeyError(f"Received an unknown model {name!r}; expected one of: {', '.join(available())}.") from None
    return getattr(importlib.import_module(module), func)
