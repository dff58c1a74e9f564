"""Which folders a run triggered through the Prefect API may read and write.

``medflow serve`` runs flows for whoever can reach the API, with parameters of the caller's
choice: a spec path, and the source, store and run folders that spec names. It sets
``MEDFLOW_ALLOWED_ROOTS`` (folders, separated by ``os.pathsep``) for the runs it starts; every
spec loaded, every path a spec names and every predict input and output must then resolve
(links and ``..`` followed) inside one of them. Unset (``medflow run`` from a shell), nothing
is restricted: the user's own command may use any path the user can.
"""

from __future__ import annotations

import os
from pathlib import Path

from medflow.errors import MedflowError

ENV = "MEDFLOW_ALLOWED_ROOTS"


class AccessRefused(MedflowError, PermissionError):
    """A path outside the roots allowed for runs started through the API."""


def allowed_roots() -> list[Path] | None:
    """The allowed roots, resolved; None when runs are not restricted."""
    value = os.environ.get(ENV)
    if not value:
        return None
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p]


def check_allowed(path: str | Path, what: str) -> None:
    """Raise AccessRefused if ``path`` lies outside every allowed root (no-op when unrestricted).
    URLs (object stores, DICOMweb) are not folders of this machine and are not restricted here."""
    roots = allowed_roots()
    if roots is None or "://" in str(path):
        return
    real = Path(path).expanduser().resolve()
    if not any(real == root or root in real.parents for root in roots):
        raise AccessRefused(f"refused: {what} {str(real)!r} is outside the folders allowed for runs started "
                            f"through the API ({', '.join(map(str, roots))}; set with medflow serve --allow)")
