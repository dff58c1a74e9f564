"""Run folders: a new one per run, or the unfinished one of the same spec, to resume."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from storage.files import write_bytes_atomic

logger = logging.getLogger(__name__)


def _status(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``write_bytes_atomic`` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode())


def save_npz_atomic(path: str | Path, **arrays) -> Path:
    """``numpy.savez_compressed`` through ``write_bytes_atomic``."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes_atomic(path, buf.getvalue())


def write_status(run_dir: Path, **fields) -> None:
    status = {**_status(run_dir), **fields}
    write_text_atomic(run_dir / "run.json", json.dumps(status, indent=1))


@contextmanager
def open_run(runs_dir: str | Path, spec_digest: str, *, resume: bool = True) -> Iterator[Path]:
    """A locked run folder for a spec.

    The newest unfinished run of the same spec (same digest) that no process holds is
    resumed: its stored checkpoints let training pick up from the last finished epoch.
    Otherwise a new folder ``<time>-<spec digest>-<random>`` is made.
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    candidates = []
    if resume:
        candidates = sorted((p for p in runs_dir.glob(f"*-{spec_digest[:6]}-*") if p.is_dir()), reverse=True)
    for run_dir in candidates:
        status = _status(run_dir)
        if status.get("spec_digest") != spec_digest or status.get("state") == "completed":
            continue
        lock = FileLock(str(run_dir / ".lock"), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # another process is running it
        logger.info("resuming unfinished run %s", run_dir.name)
        write_status(run_dir, state="running", resumed_at=time.strftime("%Y-%m-%d %H:%M:%S"),
                     attempts=int(status.get("attempts", 1)) + 1)
        try:
            yield run_dir
        finally:
            lock.release()
        return
    run_dir = runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{spec_digest[:6]}-{uuid.uuid4().hex[:4]}"
    run_dir.mkdir()
    lock = FileLock(str(run_dir / ".lock"), thread_local=False)
    lock.acquire(timeout=0)
    write_status(run_dir, spec_digest=spec_digest, state="running", attempts=1,
                 started_at=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        yield run_dir
    finally:
        lock.release()
