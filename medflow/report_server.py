"""Run reports over HTTP on loopback, read-only, so the Prefect UI can open them with one click.

Browsers refuse ``file://`` links from an ``http://`` page, so a report's link artifact
pointing at the file opened nothing from the UI. ``medflow server`` (and ``medflow
reports``) also serve the reports here; the report stage's link artifact points at this
server when it answers, else at the file (with a note saying how to serve it).

Only a run folder's ``report.html``, ``summary.json`` and ``metrics.json`` are served: the
path must resolve (symbolic links followed) to one of those names in a folder that holds
a medflow run (``run.json`` and ``spec.yaml``). Nothing is listed and nothing can be written.
The reports carry pseudonymous keys only (the pipeline's de-identification applies).
"""

from __future__ import annotations

import logging
import os
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

logger = logging.getLogger(__name__)

DEFAULT_PORT = 4201
SERVED = {"report.html": "text/html; charset=utf-8", "summary.json": "application/json",
          "metrics.json": "application/json"}
HEALTH = b"medflow reports"


def base_url() -> str:
    """Where the reports are served: ``MEDFLOW_REPORTS_URL``, else loopback on the default port."""
    return os.environ.get("MEDFLOW_REPORTS_URL", f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")


def servable(path: Path) -> Path | None:
    """The resolved file if ``path`` is a file this server may send, else None.

    >>> servable(Path("/etc/passwd")) is None
    True
    """
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if real.name not in SERVED or not real.is_file():
        return None
    folder = real.parent
    if not ((folder / "run.json").is_file() and (folder / "spec.yaml").is_file()):
        return None
    return real


def url_for(report: str | Path, base: str | None = None) -> str:
    """The served URL of a run file (``/runs`` + its absolute path).

    >>> url_for("/data/runs/20261202-ab12/report.html", "http://127.0.0.1:4201")
    'http://127.0.0.1:4201/runs/data/runs/20261202-ab12/report.html'
    """
    return f"{base or base_url()}/runs{quote(str(Path(report).resolve()))}"


def answering(base: str | None = None, timeout: float = 0.5) -> bool:
    """Whether a medflow report server answers at ``base``."""
    import httpx

    try:
        r = httpx.get(f"{base or base_url()}/health", timeout=timeout)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.content == HEALTH


def report_link(report: str | Path) -> tuple[str, str]:
    """The report's link for the UI and a description: served over HTTP when the server answers."""
    if answering():
        return url_for(report), "the full HTML report (served read-only by medflow on loopback)"
    return (Path(report).resolve().as_uri(),
            "the full HTML report as a file (browsers do not open file links from the UI: start `medflow server` or "
            "`medflow reports` to serve it, then re-run)")


class _Handler(BaseHTTPRequestHandler):
    server_version = "medflow-reports"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = urlsplit(self.path).path
        if path == "/health":
            return self._send(HTTPStatus.OK, HEALTH, "text/plain")
        if path.startswith("/runs/"):
            real = servable(Path(unquote(path[len("/runs"):])))
            if real is not None:
                return self._send(HTTPStatus.OK, real.read_bytes(), SERVED[real.name])
        return self._send(HTTPStatus.NOT_FOUND, b"not a medflow report", "text/plain")

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def _refuse(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only", "text/plain")

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("reports: " + format, *args)


def start(port: int = DEFAULT_PORT, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Serve reports on ``host:port`` from a daemon thread; ``.shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="medflow-reports", daemon=True).start()
    return server
