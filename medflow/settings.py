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
    if not env.get("PREFECT_API_URL"):
        close_embedded_server(env)
    if workdir is not None:
        workdir = Path(workdir).resolve()
        env.setdefault("PREFECT_HOME", str(workdir / ".prefect"))
        env.setdefault("DASK_TEMPORARY_DIRECTORY", str(workdir / ".dask"))
        Path(env["DASK_TEMPORARY_DIRECTORY"]).mkdir(parents=True, exist_ok=True)
        make_private(Path(env["PREFECT_HOME"]))


# An origin no browser page can have (.invalid never resolves, RFC 2606): CORS then admits no web page.
NO_ORIGIN = "https://medflow.invalid"


def close_embedded_server(env) -> None:
    """Give the temporary Prefect server that a run starts (no ``PREFECT_API_URL``) a random credential and
    closed CORS, as ``medflow server`` gives the standing one.

    Prefect's temporary server listens on a loopback port: without this any local user could list its flow
    runs (their specs, paths, logs) and create flows while a run lasts, and any web page could through the
    browser (``Access-Control-Allow-Origin: *``). The server process inherits this environment; the client
    sends the credential (``PREFECT_API_AUTH_STRING``). Child processes of the run inherit it too."""
    import secrets

    if not env.get("PREFECT_SERVER_API_AUTH_STRING"):
        env["PREFECT_SERVER_API_AUTH_STRING"] = f"medflow:{secrets.token_urlsafe(24)}"
    env.setdefault("PREFECT_API_AUTH_STRING", env["PREFECT_SERVER_API_AUTH_STRING"])
    env.setdefault("PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS", NO_ORIGIN)


def make_private(folder: Path) -> None:
    """Create ``folder`` (a Prefect home: its database holds specs, paths and logs) readable by its owner only."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if folder.stat().st_uid == os.geteuid():
            folder.chmod(0o700)
    except OSError:  # not ours to change: the owner's choice stands
        pass


def enable_project_logs(level: int = logging.INFO) -> None:
    """Let the project's own loggers through at ``level`` (Prefect forwards them to the API)."""
    for name in PROJECT_LOGGERS.split(","):
        logging.getLogger(name).setLevel(level)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures whose message says all a user needs: a bad spec or labels, a busy store, a missing source."""
    from medflow.errors import MedflowError
    from storage.errors import SourceError, StoreLockedError

    return MedflowError, StoreLockedError, SourceError


class QuietExpectedErrors(logging.Filter):
    """Log lines about an expected error keep its message and lose the traceback (hundreds of lines for
    one refused lock); the same error logged again by each enclosing flow is logged once."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not isinstance(exc, expected_errors()):
            return True
        record.exc_info, record.exc_text = None, None
        text = f"{type(exc).__name__}: {exc}"
        if text in self._seen:
            return False
        self._seen.add(text)
        return True


def quiet_expected_errors() -> None:
    """Install ``QuietExpectedErrors`` on every handler of the root and Prefect loggers (call after
    Prefect has set up its logging)."""
    quiet = QuietExpectedErrors()
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                       if name.startswith("prefect")]
    for lg in loggers:
        for handler in lg.handlers:
            if not any(isinstance(f, QuietExpectedErrors) for f in handler.filters):
                handler.addFilter(quiet)
