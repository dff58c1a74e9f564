"""Dask for medflow's tasks: an existing scheduler, or a local cluster for a task or a whole flow."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import dask
from distributed import Client, LocalCluster, as_completed

logger = logging.getLogger(__name__)

# Worker processes allocate and free many slice-sized arrays (0.5 MiB for a 512x512 CT slice).
# Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, and setting it also freezes
# glibc's mmap threshold at 128 KiB: every such array is then mmapped and unmapped again,
# and its pages are faulted in afresh each time. Raising both lets freed memory be reused
# (make bench, 8 x 200 slices of 512x512 on 2 workers: the ingest phase went from 2.6-2.8 s
# to 1.7-2.0 s). Freed memory up to the trim threshold stays with the worker. Spawned workers
# get these from the nanny; forkserver workers from the fork server's environment.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": 64 * 2**20, "MALLOC_TRIM_THRESHOLD_": 256 * 2**20}

# How local workers start. A spawned worker is a fresh interpreter: about 0.6 s for a cluster
# of two, and each worker imports pydicom, zarr and numpy again. With a fork server, one
# process started once (about 1 s, in the background) imports them, and every worker after is
# forked from it: a cluster of two starts in about 0.15 s and closes in 0.05 s. Forking the
# running process itself would be quicker still, but it copies the Dask scheduler's event loop
# and sockets into the workers: a second cluster in one process then hung (reproduced with
# two ingest scans in a row), so medflow never forks the running process.
FORKSERVER_PRELOAD = ["distributed", "numpy", "pydicom", "zarr", "storage.ingest", "storage.store",
                      "medflow.preprocessing"]


def default_start_method() -> str:
    """``forkserver`` on Linux, ``spawn`` elsewhere (macOS forbids forking after its frameworks load)."""
    return "forkserver" if sys.platform.startswith("linux") else "spawn"


def start_forkserver() -> None:
    """Start multiprocessing's fork server for this process (once; later calls return at once),
    with the modules workers need imported and ``WORKER_ENV`` in its environment.

    Returns as soon as the server process exists; it imports in the background, and the first
    worker forked from it waits for that.
    """
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    saved = {name: os.environ.get(name) for name in WORKER_ENV}
    os.environ.update({name: str(value) for name, value in WORKER_ENV.items()})
    try:
        forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def prepare_local_workers(dask: dict, store_url: str) -> None:
    """Start the fork server now if this run's stages will fork local workers from it, so that
    its imports (about 1 s) overlap with whatever comes first (Prefect starting up)."""
    if dask.get("address") or store_url.startswith("memory://"):  # remote workers, or threads
        return
    if (dask.get("start_method") or default_start_method()) == "forkserver":
        start_forkserver()


@contextmanager
def dask_client(address: str | None = None, *, n_workers: int = 2, threads_per_worker: int = 1,
                processes: bool = True, start_method: str | None = None) -> Iterator[Client]:
    """Connect to ``address`` or start a ``LocalCluster`` (worker processes, or threads when
    ``processes`` is False; no dashboard)."""
    quiet_dask_logs()
    if address:
        with Client(address, timeout="30s") as client:
            logger.debug("using Dask scheduler at %s (%d workers)", address, len(client.scheduler_info()["workers"]))
            yield client
        return
    with _local_cluster(n_workers, threads_per_worker, processes, start_method) as cluster, Client(cluster) as client:
        yield client


@contextmanager
def flow_cluster(dask: dict, store) -> Iterator[dict]:
    """One Dask cluster for every task of a flow: yields the ``dask_client`` options its tasks use.

    With ``run.dask.address`` that scheduler; else a local cluster started here and shut down
    when the flow's work is done (tasks connect to it instead of starting their own).
    """
    options = cluster_options(dask, store)
    if options.get("address"):
        yield options
        return
    quiet_dask_logs()
    with _local_cluster(options.get("n_workers", 2), options.get("threads_per_worker", 1),
                        options.get("processes", True), options.get("start_method")) as cluster:
        yield {**options, "address": cluster.scheduler_address}


def quiet_dask_logs() -> None:
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _local_cluster(n_workers: int, threads_per_worker: int, processes: bool,
                   start_method: str | None = None) -> LocalCluster:
    local_dir = os.environ.get("DASK_TEMPORARY_DIRECTORY") or tempfile.gettempdir()
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_ENV}
    method = start_method or default_start_method()
    if processes and method == "forkserver":
        start_forkserver()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env,
                          "distributed.worker.multiprocessing-method": method,
                          "distributed.worker.preload": ["medflow.dask_preload"]}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=processes,
            dashboard_address=None,
            local_directory=local_dir,
            silence_logs=logging.WARNING,
        )
    logger.info("started a local Dask cluster: %d workers x %d threads (%s)", n_workers, threads_per_worker,
                f"processes started by {method}" if processes else "threads in this process")
    return cluster


def map_on(client: Client) -> Callable[[Callable, list[tuple]], list]:
    """``map_fn(func, list_of_args) -> results`` (in order) running on ``client``'s workers."""

    def map_fn(func: Callable, args: list[tuple]) -> list:
        return client.gather([client.submit(func, *a, pure=False) for a in args])

    return map_fn


def total_threads(client: Client) -> int:
    """Worker threads of the cluster (at least 1)."""
    return max(1, sum(client.nthreads().values()))


def worker_memory(client: Client) -> list[int]:
    """Memory limit (bytes) of each worker; 0 where a worker has none."""
    return [int(w.get("memory_limit") or 0) for w in client.scheduler_info()["workers"].values()]


def run_all(client: Client, func: Callable, args: list[tuple], *, on_result: Callable | None = None,
            weights: list[int] | None = None, budget: int | None = None, on_error: Callable | None = None) -> list:
    """Submit ``func(*a)`` for every ``a`` and gather results as they complete (order of completion).

    With ``weights`` (e.g. estimated bytes) and a ``budget``, work is submitted only while the
    weights in flight fit the budget (one item is always allowed), so that large series do
    not run side by side and exhaust the workers' memory. ``on_result(done, total, result)``
    is called after each one, e.g. to report progress. ``on_error(i, exc)``, if given, turns an
    item's failure into its result (or re-raises): e.g. ``KilledWorker`` after a decoder crashed
    the worker on one series.
    """
    weights = weights or [0] * len(args)
    budget = budget if budget else None
    pending = list(range(len(args)))
    in_flight: dict = {}
    results = []
    queue = as_completed()

    def fill():
        while pending:
            i = pending[0]
            used = sum(weights[j] for j in in_flight.values())
            if in_flight and budget is not None and used + weights[i] > budget:
                return
            pending.pop(0)
            fut = client.submit(func, *args[i], pure=False)
            in_flight[fut] = i
            queue.add(fut)

    fill()
    for fut in queue:
        try:
            results.append(fut.result())
        except Exception as exc:
            if on_error is None:
                raise
            results.append(on_error(in_flight[fut], exc))
        del in_flight[fut]
        if on_result:
            on_result(len(results), len(args), results[-1])
        fill()
    return results


def cluster_options(dask: dict, store) -> dict:
    """``dask_client`` keyword arguments for a store: threads only for a process-local store.

    Raises:
        ValueError: a process-local store (``memory://``) with an external scheduler.
    """
    if store.process_local:
        address = dask.get("address")
        if address and not str(address).startswith("inproc://"):  # inproc: a cluster of this process
            raise ValueError(f"store {store.url!r} lives in this process only; it cannot be used with "
                             "run.dask.address (use a folder or an object-store URL)")
        return {**dask, "processes": False}
    return dict(dask)
