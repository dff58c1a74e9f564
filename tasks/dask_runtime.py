"""A Dask client for the length of a task: an existing scheduler or a local cluster."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster, as_completed

logger = logging.getLogger(__name__)


@contextmanager
def dask_client(address: str | None = None, *, n_workers: int = 2, threads_per_worker: int = 1) -> Iterator[Client]:
    """Connect to ``address`` or start a ``LocalCluster`` of worker processes (no dashboard)."""
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if address:
        with Client(address, timeout="30s") as client:
            logger.info("using Dask scheduler at %s (%d workers)", address, len(client.scheduler_info()["workers"]))
            yield client
        return
    local_dir = os.environ.get("DASK_TEMPORARY_DIRECTORY") or tempfile.gettempdir()
    with LocalCluster(
        n_workers=n_workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        dashboard_address=None,
        local_directory=local_dir,
        silence_logs=logging.WARNING,
    ) as cluster, Client(cluster) as client:
        logger.info("started a local Dask cluster: %d workers x %d threads", n_workers, threads_per_worker)
        yield client


def run_all(client: Client, func: Callable, args: list[tuple], *, on_result: Callable | None = None) -> list:
    """Submit ``func(*a)`` for every ``a`` and gather results as they complete (order of completion).

    ``on_result(done, total, result)`` is called after each one, e.g. to report progress.
    """
    futures = [client.submit(func, *a, pure=False) for a in args]
    results = []
    for done, fut in enumerate(as_completed(futures), start=1):
        result = fut.result()
        results.append(result)
        if on_result:
            on_result(done, len(futures), result)
    return results
