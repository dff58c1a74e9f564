"""Which folders and URLs a run triggered through the Prefect API may read, write and reach.

``medflow serve`` runs flows for whoever can reach the API, with parameters of the caller's
choice: a spec path, and the source, store and run folders that spec names. It sets
``MEDFLOW_ALLOWED_ROOTS`` (folders, separated by ``os.pathsep``) and ``MEDFLOW_ALLOWED_URLS``
(URL prefixes, separated by spaces) for the runs it starts. Every path a run opens must then
resolve (links and ``..`` followed) inside an allowed folder, and every URL it reaches must lie
under an allowed URL prefix (same scheme, host and port; its path below the prefix's path).
Unset (``medflow run`` from a shell), nothing is restricted: the user's own command may use any
path and URL the user can.

The checks are made where a path is opened (``check_allowed``), not only where the spec is
loaded, so a symbolic link put in a source folder, a path inside a table (image lists, mask
tables) or a URL form of a store cannot lead outside. Each path field of a spec and how it is
confined (README, "Security"):

========================  ==============================================================
field                     checked
========================  ==============================================================
spec file                 ``load_spec``
data.source               ``load_spec``; every symbolic link met while listing it
data.store                ``load_spec`` and ``Store()``: a folder, ``file://``, or a URL
                          under an allowed prefix (``s3://``, ``gs://`` ... ``--allow-url``)
data.runs                 ``load_spec`` and when the run folder is made
data.labels.path          ``load_spec``; an image list's entries: inside data.source
data.masks.table          ``load_spec``; each mask file it names, when opened
data.marks.table          ``load_spec``
dicomweb:// source        ``load_spec`` and before the first request: host in ``--allow-url``
predict model, input,     ``flows.predict``
output
========================  ==============================================================
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from medflow.errors import MedflowError

ENV = "MEDFLOW_ALLOWED_ROOTS"
URLS_ENV = "MEDFLOW_ALLOWED_URLS"


class AccessRefused(MedflowError, PermissionError):
    """A path or URL outside what runs started through the API may use."""


_scratch: list[Path] = []  # private folders this process made for its own work (never named by a caller)


def allowed_roots() -> list[Path] | None:
    """The allowed roots, resolved (with this process's scratch folders); None when runs are not restricted."""
    value = os.environ.get(ENV)
    if not value:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p] + list(_scratch)


@contextmanager
def scratch_dir(prefix: str) -> Iterator[str]:
    """A private temporary folder (``tempfile``: mode 0700, removed afterwards) that this process's own work may
    use under ``medflow serve``: predict's scratch store, DICOMweb staging. A spec cannot name it."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        real = Path(folder).resolve()
        _scratch.append(real)
        try:
            yield folder
        finally:
            _scratch.remove(real)


def allowed_urls() -> list[str]:
    """The allowed URL prefixes (only meaningful when runs are restricted)."""
    return os.environ.get(URLS_ENV, "").split()


def restricted() -> bool:
    """Whether this process runs for the API (``medflow serve``)."""
    return allowed_roots() is not None


def is_inside(path: str | Path, roots: list[Path] | None = None) -> bool:
    """Whether ``path`` resolves (links and ``..`` followed) inside one of ``roots`` (default: the allowed
    roots; True when unrestricted)."""
    roots = allowed_roots() if roots is None else roots
    if roots is None:
        return True
    real = Path(path).expanduser().resolve()
    return any(real == root or root in real.parents for root in roots)


def url_allowed(url: str, prefixes: list[str]) -> bool:
    """Whether ``url`` lies under one of ``prefixes``: the same scheme, host and port, and a path at or below the
    prefix's path (component by component: ``/dicom-web`` does not allow ``/dicom-web-evil``).

    >>> url_allowed("dicomweb://pacs:8042/dicom-web/studies", ["dicomweb://pacs:8042/dicom-web"])
    True
    >>> url_allowed("dicomweb://pacs.evil:8042/dicom-web", ["dicomweb://pacs:8042/dicom-web"])
    False
    >>> url_allowed("s3://bucket-other/x", ["s3://bucket"])
    False
    """
    u = urlsplit(url)
    for prefix in prefixes:
        p = urlsplit(prefix)
        if (u.scheme.lower(), u.netloc.lower()) != (p.scheme.lower(), p.netloc.lower()):
            continue
        want = [c for c in p.path.split("/") if c]
        have = [c for c in u.path.split("/") if c]
        if ".." not in have and have[:len(want)] == want:
            return True
    return False


def check_allowed(path: str | Path, what: str) -> None:
    """Raise AccessRefused if ``path`` (a path, ``file://`` URL or other URL) lies outside what runs started
    through the API may use; a no-op when unrestricted."""
    roots = allowed_roots()
    if roots is None:
        return
    text = str(path)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme != "file":
            if not url_allowed(text, allowed_urls()):
                allowed = ", ".join(allowed_urls()) or "none"
                raise AccessRefused(f"refused: {what} {text!r} is not under a URL allowed for runs started through "
                                    f"the API (allowed: {allowed}; add with medflow serve --allow-url)")
            return
        text = text[len("file://"):]
    if not is_inside(text, roots):
        real = Path(text).expanduser().resolve()
        raise AccessRefused(f"refused: {what} {str(real)!r} is outside the folders allowed for runs started "
                            f"through the API ({', '.join(map(str, roots))}; set with medflow serve --allow)")
