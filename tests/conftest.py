"""Shared fixtures. Settings are applied before Prefect is imported anywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="medflow-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SCRATCH / "prefect"))

from medflow import settings  # noqa: E402

settings.configure(_SCRATCH)

import pytest  # noqa: E402

from medflow.synth import synthesize  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """6 patients of 32x32 slices, with broken files and canary PHI (read-only: copy before changing)."""
    return synthesize(tmp_path_factory.mktemp("cohort"), patients=6, seed=3, matrix=32)


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"
