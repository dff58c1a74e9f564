"""The docstring examples of the pure modules are tests: they run here."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "medflow.baselines", "medflow.kinds", "medflow.metrics", "medflow.preprocessing", "medflow.splitting",
    "models", "models.explain", "models.segmentation", "models.training", "medflow.kinds.classification",
    "medflow.signals", "medflow.resampling", "medflow.retry", "storage.errors", "storage.dicom", "storage.ingest",
    "storage.store", "medflow.intervals", "medflow.reporting", "medflow.compare", "medflow.calibration", "medflow.runs", "medflow.report_server", "tasks.train", "medflow.tracking", "medflow.subgroups",
    "medflow.froc", "medflow.kinds.detection", "models.detector", "storage.marks", "medflow.boxes",
    "medflow.kinds.detection2d", "medflow.isolation", "medflow.hardware", "models.multiworker",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
    assert result.attempted > 0, f"{name} has no examples: take it off the list"
