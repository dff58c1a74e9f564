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


def write_text_atomic(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    """``write_bytes_atomic`` for UTF-8 text (``mode``: the new file's permissions, e.g. 0o600)."""
    return write_bytes_atomic(path, text.encode(), mode=mode)


def finite_or_none(obj):
    """``obj`` with every NaN or infinite float as None and numpy scalars and arrays as Python values
    (what strict JSON can hold; RFC 8259 has no NaN).

    >>> finite_or_none({"auc": float("nan"), "ci": [0.5, float("inf")], "n": 3})
    {'auc': None, 'ci': [0.5, None], 'n': 3}
    """
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_or_none(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json_atomic(path: str | Path, obj) -> Path:
    """Strict JSON (undefined numbers as ``null``), written atomically."""
    return write_text_atomic(path, json.dumps(finite_or_none(obj), indent=1, allow_nan=False))


_NOT_NUMBERS = frozenset({"map", "best_epoch", "warnings", "classes", "dice_ci", "note"})


def read_metrics(path: str | Path) -> dict:
    """A run's ``metrics.json`` with ``null`` numbers back as NaN (how the code computes with them).

    An interval that was undefined reads as NaN too: test intervals with ``is_interval``. Fields
    that are absent rather than undefined numbers (``map``: no calibration map) stay None.

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "m.json"
    >>> _ = write_json_atomic(p, {"auc": float("nan"), "ci": [float("nan"), 1.0], "calibration": {"map": None}})
    >>> read_metrics(p)
    {'auc': nan, 'ci': [nan, 1.0], 'calibration': {'map': None}}
    """
    def undefined_as_nan(d: dict) -> dict:
        return {k: v if k in _NOT_NUMBERS else float("nan") if v is None
                else [float("nan") if x is None else x for x in v] if isinstance(v, list) else v
                for k, v in d.items()}

    return json.loads(Path(path).read_text(), object_hook=undefined_as_nan)


def is_interval(value) -> bool:
    """Whether ``value`` is a (low, high) pair of numbers (not None, NaN or a NaN pair).

    >>> is_interval([0.8, 1.0]), is_interval(float("nan")), is_interval(None), is_interval([None, None])
    (True, False, False, False)
    """
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and v == v for v in value))


def save_npz_atomic(path: str | Path, **arrays) -> Path:
    """``numpy.savez_compressed`` through ``write_bytes_atomic``."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes_atomic(path, buf.getvalue())


PROGRESS_ENV = "MEDFLOW_PROGRESS_FILE"


def note_progress(**fields) -> None:
    """Tell a supervising ``medflow run`` where the pipeline is (run folder, flow run, stage), in the JSON
    file ``$MEDFLOW_PROGRESS_FILE``; nothing when no supervisor asked. Should the process die of a
    native crash, the supervisor names the stage and marks the flow run Crashed from this."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    target = Path(path)
    known = json.loads(target.read_text()) if target.exists() else {}
    if fields.get("work") == "" and known.get("work"):
        fields["last_work"] = known["work"]  # the counts a stage ended with, for a display that polled too late
    write_text_atomic(target, json.dumps({**known, **{k: str(v) for k, v in fields.items()}}))


def note_work(label: str, done: int, total: int | None, unit: str) -> None:
    """Counts of the work under way (``ingest``: 40 of 120 series) for a supervising ``medflow run``'s
    progress display on a terminal; nothing when unsupervised."""
    note_progress(work=json.dumps({"label": label, "done": done, "total": total, "unit": unit}))


def current_progress() -> dict:
    """What ``note_progress`` has recorded in this supervised run (empty when unsupervised)."""
    path = os.environ.get(PROGRESS_ENV)
    try:
        return json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def write_status(run_dir: Path, **fields) -> None:
    status = {**_status(run_dir), **fields}
    write_text_atomic(run_dir / "run.json", json.dumps(status, indent=1))


def remove_partial_files(run_dir: Path) -> int:
    """Delete what a killed attempt left half-written in ``run_dir``: the temporary files of
    ``write_bytes_atomic`` (``.<name>.<random>.tmp``), of checkpoints (``.<name>.<random>.tmp.keras``) and of
    explanation children (``result.pkl.tmp``).
    Called with the run folder's lock held, so no live writer owns them."""
    n = 0
    for path in run_dir.rglob("*.tmp*"):
        partial = (path.name.startswith(".") and path.name.endswith((".tmp", ".tmp.keras"))) or \
            path.name == "result.pkl.tmp"
        if partial and path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            n += 1
    return n


@contextmanager
def open_run(runs_dir: str | Path, spec_digest: str, *, resume: bool = True) -> Iterator[Path]:
    """A locked run folder for a spec.

    The newest unfinished run of the same spec (same digest) that no process holds is
    resumed: its stored checkpoints let training pick up from the last finished epoch.
    Otherwise a new folder ``<time>-<spec digest>-<random>`` is made.
    """
    from medflow.access import check_allowed

    check_allowed(runs_dir, "data.runs")
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
        removed = remove_partial_files(run_dir)
        if removed:
            logger.info("removed %d partial file(s) a killed attempt left (whole files are written beside their "
                        "place and renamed)", removed)
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
