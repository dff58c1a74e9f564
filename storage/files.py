"""Whole-file writes: a kill at any point leaves the old file or the new one, never a part."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_bytes_atomic(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Write a file whole or not at all: a temporary file in the same folder, fsync, rename.
    ``mode``: the file's permissions from its creation on (else the umask's)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left when the write or the rename failed
    return path
