"""Loaded in the workers of medflow's local Dask clusters (``distributed.worker.preload``).

A task that raises is logged by its worker ("Compute Failed" with the task's arguments and a
traceback) and then raised again, with its traceback, in the Prefect task that waits for it.
The worker's copy only repeats it, a screenful per task and per retry (a full disk during
ingest printed 16 of them), so it is dropped here; the Prefect log and the run's log file keep
the failure.
"""

from __future__ import annotations

import logging


class DropComputeFailed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Compute Failed")


def dask_setup(worker) -> None:  # noqa: ARG001 - Dask's preload hook
    logging.getLogger("distributed.worker").addFilter(DropComputeFailed())
