"""Run reports over HTTP on loopback, read-only, so the Prefect UI can open them with one click.

Browsers refuse ``file://`` links from an ``http://`` page, so a report's link artifact
pointing at the file opened nothing from the UI. ``medflow server`` (and ``medflow
reports``) also serve the reports here; the report stage's link artifact points at this
server when it answers, else at the file (with a note saying how to serve it).

Only a run folder's ``report.html``, ``summary.json`` and ``metrics.json`` are served, and only
inside the configured run roots (``medflow server --reports-root``, default the folder it was
started in). The file is opened once, from a descriptor of the root, one path component at
a time with ``O_NOFOLLOW``: a symbolic link anywhere below the root is refused, so a local
user who swaps a report for a link between a check and a read gets nothing (there is no
second lookup to race). What was opened is then checked with ``fstat``: a regular file,
owned by the server's user, in a folder owned by that user that holds a medflow run
(``run.json`` and ``spec.yaml``). Nothing is listed and nothing can be written. The reports
carry pseudonymous keys only (the pipeline's de-identification applies).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
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
MAX_BYTES = 256 << 20  # a report with its figures is a few MiB
ROOTS_ENV = "MEDFLOW_REPORT_ROOTS"
_NOFOLLOW_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC


def base_url() -> str:
    """Where the reports are served: ``MEDFLOW_REPORTS_URL``, else loopback on the default port."""
    return os.environ.get("MEDFLOW_REPORTS_URL", f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")


def report_roots() -> list[Path]:
    """The folders whose run reports are served: ``MEDFLOW_REPORT_ROOTS`` (``os.pathsep``-separated),
    else the current folder; resolved once, when the server starts."""
    value = os.environ.get(ROOTS_ENV)
    roots = [p for p in value.split(os.pathsep) if p] if value else [os.getcwd()]
    return [Path(p).expanduser().resolve() for p in roots]


def read_servable(path: str | Path, roots: list[Path] | None = None, *, owner: int | None = None
                  ) -> tuple[str, bytes] | None:
    """The name and bytes of ``path`` if it is a run file this server may send, else None.

    The file is reached from a root's descriptor one component at a time without following
    links, and what was opened is what is checked (``fstat``), so nothing can be swapped
    between the check and the read. ``owner``: the uid files and folders must belong to (the
    server's own user by default).

    >>> read_servable("/etc/passwd", [Path("/")]) is None
    True
    """
    text = str(path)
    if "\x00" in text or not text.startswith("/"):
        return None
    owner = os.geteuid() if owner is None else owner
    parts = [p for p in text.split("/") if p]
    if not parts or parts[-1] not in SERVED or any(p in (".", "..") for p in parts):
        return None
    for root in roots if roots is not None else report_roots():
        below = _below(parts, root)
        if below is None or len(below) < 2:
            continue
        try:
            return parts[-1], _read(root, below, owner)
        except OSError:
            return None
    return None


def _below(parts: list[str], root: Path) -> list[str] | None:
    root_parts = [p for p in str(root).split("/") if p]
    return parts[len(root_parts):] if parts[:len(root_parts)] == root_parts else None


def _read(root: Path, below: list[str], owner: int) -> bytes:
    fds = []
    try:
        fds.append(os.open(root, _NOFOLLOW_DIR))
        for name in below[:-1]:
            fds.append(os.open(name, _NOFOLLOW_DIR, dir_fd=fds[-1]))
        folder = fds[-1]
        if os.fstat(folder).st_uid != owner:
            raise PermissionError(errno.EACCES, "another user's folder")
        for marker in ("run.json", "spec.yaml"):
            if not stat.S_ISREG(os.stat(marker, dir_fd=folder, follow_symlinks=False).st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a run folder")
        # O_NONBLOCK: a FIFO put in the report's place must not hold the handler
        fd = os.open(below[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
        fds.append(fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != owner or st.st_size > MAX_BYTES:
            raise PermissionError(errno.EACCES, "not a regular file of the server's user")
        chunks, left = [], st.st_size
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        for fd in fds:
            os.close(fd)


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
            try:
                wanted = unquote(path[len("/runs"):], errors="strict")
            except UnicodeDecodeError:  # not a path medflow ever links to
                wanted = ""
            found = read_servable(wanted, self.server.roots) if wanted else None
            if found is not None:
                return self._send(HTTPStatus.OK, found[1], SERVED[found[0]])
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


def start(port: int = DEFAULT_PORT, host: str = "127.0.0.1", roots: list[str | Path] | None = None
          ) -> ThreadingHTTPServer:
    """Serve the run reports under ``roots`` (default ``report_roots()``) on ``host:port`` from a daemon
    thread; ``.shutdown()`` stops it."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.roots = [Path(r).expanduser().resolve() for r in roots] if roots else report_roots()
    threading.Thread(target=server.serve_forever, name="medflow-reports", daemon=True).start()
    return server
