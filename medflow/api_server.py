"""Prefect's temporary API server, started early.

With no ``PREFECT_API_URL``, Prefect starts a temporary server when a flow first calls its API
and waits until it answers; importing and starting that server is seconds of a short run.
``start_early`` starts the same server (Prefect's ``SubprocessASGIServer``, the instance its
client uses) on a thread while the command does its own work (loading the spec, making a
cohort, importing the flows); ``wait`` joins the thread before the first flow runs, so the flow
finds the server up. Nothing changes when a standing server is configured.

A new Prefect home costs more: the server first builds its SQLite database by running every
schema migration. ``seed_home`` gives a new home a copy of an empty, migrated database kept
per Prefect version in the user's cache (``MEDFLOW_CACHE``, else ``~/.cache/medflow``), made
by the first server that had to build one.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from importlib.metadata import version
from pathlib import Path

logger = logging.getLogger(__name__)
_thread: threading.Thread | None = None


def start_early() -> bool:
    """Start the temporary server in the background unless an API URL is set or one is starting.
    Call after ``medflow.settings.configure`` (the server reads PREFECT_HOME when it starts).
    Returns whether a start was begun."""
    global _thread
    if _thread is not None:
        return False
    from prefect.settings import get_current_settings

    current = get_current_settings()
    if current.api.url or not current.server.ephemeral.enabled:
        return False
    from prefect.server.api.server import SubprocessASGIServer

    seed_home()
    server = SubprocessASGIServer()  # the instance Prefect's client asks for
    if server.running:
        return False
    # A failed start leaves the server not running; the flow's own start then raises the error.
    _thread = threading.Thread(target=_start, args=(server,), name="prefect-server-start", daemon=True)
    _thread.start()
    return True


def _start(server) -> None:
    try:
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported again, with its cause, by the flow's own start
        logger.debug("early start of Prefect's temporary server failed: %s", exc)
        return
    db = _database()
    if db is not None and db.is_file():
        db.chmod(0o600)
    save_template()


def _database() -> Path | None:
    """The SQLite file of this process's Prefect home, or None when another database is configured."""
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get(
            "PREFECT_SERVER_DATABASE_CONNECTION_URL") or not os.environ.get("PREFECT_HOME"):
        return None
    return Path(os.environ["PREFECT_HOME"]) / "prefect.db"


def template_path() -> Path:
    """The cached empty database of the installed Prefect version."""
    cache = Path(os.environ.get("MEDFLOW_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                         Path.home() / ".cache") / "medflow")
    return cache / f"prefect-{version('prefect')}.db"


def seed_home() -> bool:
    """Give a Prefect home without a database a copy of the cached empty one; returns whether it did.
    The copy is written beside its place and renamed, so a killed copy leaves no half database."""
    db, template = _database(), template_path()
    if db is None or db.exists() or not template.is_file():
        return False
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        _backup(template, db)
    except (OSError, sqlite3.Error) as exc:  # e.g. a full disk: the server builds its own (and says why not)
        logger.debug("could not seed Prefect home %s: %s", db.parent, exc)
        return False
    logger.debug("Prefect home %s seeded from %s", db.parent, template)
    return True


def save_template() -> None:
    """Keep a copy of this home's database as the template, if there is none yet (called once the
    server answers: its schema is then complete). Copied with SQLite's backup API, which gives
    a consistent copy while the server writes."""
    db, template = _database(), template_path()
    if db is None or template.exists() or not db.is_file():
        return
    try:
        template.parent.mkdir(parents=True, exist_ok=True)
        _backup(db, template)
    except (OSError, sqlite3.Error) as exc:  # a cache we cannot write only costs the next new home time
        logger.debug("could not keep Prefect's database as a template: %s", exc)


def _backup(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    src, dst = sqlite3.connect(source), sqlite3.connect(tmp)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
    except BaseException:
        dst.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        dst.close()
        src.close()
    os.chmod(tmp, 0o600)  # runs, specs and logs: the owner's only
    os.replace(tmp, target)


def wait() -> None:
    """Block until an early start has finished (the server answers, or the start failed)."""
    if _thread is not None:
        _thread.join()


def stop() -> None:
    """Stop a temporary server that ``start_early`` began, once Prefect's log and event workers have
    sent what they hold. Their open connections would otherwise hold the server's graceful shutdown
    until Prefect, at exit, gives up waiting and kills it."""
    if _thread is None:
        return
    _thread.join()
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    APILogWorker.drain_all()
    EventsWorker.drain_all()
    SubprocessASGIServer().stop()
