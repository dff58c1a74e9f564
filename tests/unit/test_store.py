"""The store: one writer at a time, and retries only for transient errors."""

from __future__ import annotations

import errno
import multiprocessing as mp
import time

import pytest
from prefect import task

from medflow.errors import SpecError
from filelock import FileLock, Timeout

from storage.errors import InvalidSeriesError, StoreLockedError, UnreadableFileError
from storage.store import Store
from medflow.retry import retry_transient


def _hold_lock(root, ready, release):
    with Store(root).writer_lock(purpose="ingest"):
        ready.set()
        release.wait(30)


def _hold_lock_with_workers(root, ready, release):
    from medflow.dask_runtime import dask_client

    with Store(root).writer_lock(purpose="ingest"), dask_client(n_workers=1) as client:
        client.submit(time.sleep, 0, pure=False).result()
        ready.set()
        release.wait(60)


def _start_holder(root, target=_hold_lock):
    """Another process that takes the store's writer lock and holds it until released."""
    Store(root)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=target, args=(str(root), ready, release))
    proc.start()
    assert ready.wait(60)
    return proc, release


def test_second_writer_is_refused_with_a_clear_message(tmp_path):
    root = tmp_path / "store.zarr"
    proc, release = _start_holder(root)
    try:
        with pytest.raises(StoreLockedError, match=rf"being written by another run \(pid {proc.pid} .*ingest"):
            with Store(root).writer_lock():
                pass
    finally:
        release.set()
        proc.join(30)
    with Store(root).writer_lock():  # free again once the other writer is done
        pass


def test_lock_is_released_when_the_holder_is_killed(tmp_path):
    root = tmp_path / "store.zarr"
    proc, _ = _start_holder(root)
    proc.kill()
    proc.join(30)
    with Store(root).writer_lock():
        pass


def test_lock_is_released_when_a_holder_with_dask_workers_is_killed(tmp_path):
    # the run's local workers must not keep the store locked after the run is gone
    root = tmp_path / "store.zarr"
    proc, _ = _start_holder(root, _hold_lock_with_workers)
    proc.kill()
    proc.join(30)
    with Store(root).writer_lock():
        pass


@pytest.mark.parametrize(
    "error, expected_calls",
    [(ConnectionResetError("peer reset"), 3), (TimeoutError("slow disk"), 3),
     (InvalidSeriesError("gap in slices"), 1), (SpecError("bad spec"), 1), (StoreLockedError("busy"), 1),
     # file-content and path errors are permanent, whatever OSError they are
     (UnreadableFileError("cannot decode pixel data"), 1), (OSError(errno.ELOOP, "Too many levels of symbolic links"), 1),
     (PermissionError(errno.EACCES, "Permission denied"), 1), (NotImplementedError("Unknown VR"), 1)],
)
def test_transient_errors_are_retried_and_permanent_ones_are_not(error, expected_calls, prefect_harness):
    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def flaky():
        calls.append(time.monotonic())
        raise error

    with pytest.raises(type(error)):
        flaky()
    assert len(calls) == expected_calls


def test_transient_error_then_success(prefect_harness):
    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_transient)
    def recovers():
        calls.append(1)
        if len(calls) < 2:
            raise ConnectionResetError("once")
        return "ok"

    assert recovers() == "ok" and len(calls) == 2


def test_a_pipeline_holds_the_lock_across_its_stages(tmp_path):
    # the stages take the lock again inside the pipeline's: that nests, and leaving a stage
    # must not open a gap for another writer before the next one
    root = tmp_path / "store.zarr"
    store = Store(root)
    other = FileLock(str(root / ".medflow" / "writer.lock"), thread_local=False)
    with store.writer_lock(purpose="pipeline"):
        with Store(root).writer_lock(purpose="ingest"):
            pass
        with pytest.raises(Timeout):  # still held between the stages
            other.acquire(timeout=0)
        with Store(root).writer_lock(purpose="preprocess"):
            pass
    other.acquire(timeout=0)  # and free after the pipeline's block
    other.release()


def test_taking_the_lock_removes_what_killed_writers_left(tmp_path):
    root = tmp_path / "store.zarr"
    store = Store(root)
    half = root / ".tmp" / "0123abcd"
    (half / "image").mkdir(parents=True)
    (half / "image" / "c0").write_bytes(b"partial")
    (root / ".tmp" / "stray.tmp").write_bytes(b"x")
    with store.writer_lock():
        assert list((root / ".tmp").iterdir()) == []


def test_a_store_secret_is_never_left_short(tmp_path, monkeypatch):
    # a kill between creating the secret and writing it used to leave a 0-byte secret for ever
    root = tmp_path / "store.zarr"
    store = Store(root)
    import os as _os

    def killed(*args):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(_os, "link", killed)
    with pytest.raises(KeyboardInterrupt):
        store.secret
    monkeypatch.undo()
    assert not (root / ".medflow" / "secret").exists()
    assert len(Store(root).secret) == 32 and Store(root).secret == store.secret


def test_a_resumed_run_folder_loses_the_partial_files_of_the_killed_attempt(tmp_path):
    from medflow.runs import open_run

    with open_run(tmp_path / "runs", "abcdef123456") as first:
        (first / "checkpoints").mkdir()
        (first / "checkpoints" / "last.keras").write_bytes(b"whole")
        partial = [first / "checkpoints" / ".last.keras.1a2b3c4d.tmp.keras", first / ".metrics.json.9f8e7d6c.tmp",
                   first / "explain" / "result.pkl.tmp"]
        (first / "explain").mkdir()
        for path in partial:
            path.write_bytes(b"half")
        (first / "notes.tmp").write_text("a user's own file")  # not one of medflow's temporary names
    with open_run(tmp_path / "runs", "abcdef123456") as again:
        assert again == first
        assert not any(p.exists() for p in partial)
        assert (first / "checkpoints" / "last.keras").read_bytes() == b"whole" and (first / "notes.tmp").exists()
