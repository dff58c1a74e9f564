"""Process settings that must be in place before Prefect, Dask or TensorFlow are imported."""

from __future__ import annotations

import logging
import os
from pathlib import Path

PROJECT_LOGGERS = "storage,tasks,models,flows,medflow"


def configure(workdir: str | Path | None = None) -> None:
    """Offline-friendly defaults; values already in the environment win.

    Args:
        workdir: folder for Prefect's home (its SQLite database) and scratch space.
    """
    env = os.environ
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", PROJECT_LOGGERS)
    env.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    if workdir is not None:
        workdir = Path(workdir).resolve()
        env.setdefault("PREFECT_HOME", str(workdir / ".prefect"))
        env.setdefault("DASK_TEMPORARY_DIRECTORY", str(workdir / ".dask"))
        Path(env["DASK_TEMPORARY_DIRECTORY"]).mkdir(parents=True, exist_ok=True)


def enable_project_logs(level: int = logging.INFO) -> None:
    """Let the project's own loggers through at ``level`` (Prefect forwards them to the API)."""
    for name in PROJECT_LOGGERS.split(","):
        logging.getLogger(name).setLevel(level)
