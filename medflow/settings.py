"""Process settings that must be in place before Prefect, Dask or TensorFlow are imported."""

from __future__ import annotations

import errno
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


def import_tensorflow_quietly(verbose: bool = False) -> None:
    """Import TensorFlow with its native start-up lines held back (shown with ``verbose``).

    TensorFlow 2.21 logs "oneDNN custom operations are on" twice through abseil before abseil's
    logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot silence it: stderr's descriptor is
    pointed at a temporary file for the import and restored after. What was held back is printed
    if the import fails. Call it before starting threads or processes that write to stderr."""
    import sys
    import tempfile

    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


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


# OSErrors that say what is wrong with the machine, not with medflow: the message is all a user needs
ENVIRONMENT_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                      errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                      errno.EPERM: "operation not permitted"}


def expected_cause(exc: BaseException | None) -> BaseException | None:
    """The expected failure in ``exc``'s chain of causes (``expected_errors``, or an OSError of
    ``ENVIRONMENT_ERRNOS``: a full disk, a read-only store), or None: such a failure's message says all a
    user needs, and its tracebacks only hide it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, expected_errors()):
            return exc
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def describe(exc: BaseException) -> str:
    """One line for an expected failure: for a full disk or a read-only store, what happened and where."""
    if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        return (f"{ENVIRONMENT_ERRNOS[exc.errno]} ({errno.errorcode.get(exc.errno, exc.errno)}){where}: "
                + {errno.ENOSPC: "free space there and run the same command again (finished work is kept)",
                   errno.EDQUOT: "free space there and run the same command again (finished work is kept)",
                   errno.EROFS: "point data.store and data.runs at a folder this user can write"}.get(
                    exc.errno, "check the folder's owner and permissions"))
    return f"{type(exc).__name__}: {exc}"


class QuietExpectedErrors(logging.Filter):
    """Log lines about an expected error keep its message and lose the traceback (hundreds of lines for
    one refused lock); the same error logged again by each enclosing flow is logged once."""

    def __init__(self):
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        cause = expected_cause(exc)
        if cause is None:
            return True
        record.exc_info, record.exc_text = None, None
        text = describe(cause)
        if isinstance(cause, OSError):  # what the errno means and what to do, on the line that reports it
            record.msg, record.args = f"{record.getMessage().splitlines()[0]}: {text}", None
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
            if isinstance(handler, _QuietFileHandler):  # the log file keeps the tracebacks
                continue
            if not any(isinstance(f, QuietExpectedErrors) for f in handler.filters):
                handler.addFilter(quiet)


class _Once(logging.Filter):
    """Pass a record once to a handler that hangs on several loggers of one propagation chain."""

    def __init__(self):
        super().__init__()
        self._last: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if id(record) == self._last:
            return False
        self._last = id(record)
        return True


class _QuietFileHandler(logging.FileHandler):
    """A log file that stops, silently, when it cannot be written (a full disk): the failure is reported on
    the console, not buried under a logging traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's naming)
        self.setLevel(logging.CRITICAL + 1)


def log_to_file(path: Path) -> Path:
    """Also write every log line, with full tracebacks, to ``path`` (the console keeps one line per expected
    failure). Call after Prefect has set up its logging."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = _QuietFileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Once())
    handler.setLevel(logging.INFO)
    names = {"", "prefect", *PROJECT_LOGGERS.split(",")} | {
        name for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger) and lg.handlers}
    for name in names:
        # first among each logger's handlers: it formats the traceback before a console filter drops it
        logging.getLogger(name).handlers.insert(0, handler)
    return path
