"""Task kinds: what differs between classification, segmentation, ... behind one interface.

The lifecycle (ingest → preprocess → split → train → evaluate → report → predict) is the
same for every kind of problem; a kind answers, for each stage, what is particular to it.
The spec's ``model.task`` names the kind; stages call ``get(spec.model.task)`` and never
compare its name. Adding a kind is one module with a ``TaskKind`` subclass and one line
in ``_KINDS`` below (plus its models in ``models._REGISTRY`` and its tests).

>>> available()
['classification', 'detection', 'detection2d', 'segmentation', 'signal']
>>> get("segmentation").name
'segmentation'
"""

from __future__ import annotations

import importlib
from functools import cache

from medflow.kinds.base import TaskKind

# name -> "module:class"; imported on first use (validating a spec imports no Keras).
_KINDS: dict[str, str] = {
    "classification": "medflow.kinds.classification:Classification",
    "detection": "medflow.kinds.detection:Detection",
    "detection2d": "medflow.kinds.detection2d:Detection2D",
    "segmentation": "medflow.kinds.segmentation:Segmentation",
    "signal": "medflow.kinds.signal:Signal",
}


def available() -> list[str]:
    """Names of the registered task kinds."""
    return sorted(_KINDS)


@cache
def get(name: str) -> TaskKind:
    """The task kind registered as ``name``.

    Raises:
        KeyError: no such kind.
    """
    try:
        module, cls = _KINDS[name].split(":")
    except KeyError:
        raise KeyError(f"Received an unknown task kind {name!r}; expected one of: {', '.join(available())}.") from None
    return getattr(importlib.import_module(module), cls)()


__all__ = ["TaskKind", "available", "get"]
