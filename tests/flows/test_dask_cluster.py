"""Ingest and preprocessing on an existing Dask cluster (`dask scheduler` + `dask worker` processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from distributed import Client

from flows.ingest import ingest_flow
from flows.preprocess import preprocess_flow
from medflow.cli import DEMO_SPEC
from medflow.synth import synthesize
from tests.conftest import _free_port, stop_process

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture
def dask_cluster(tmp_path):
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = (tmp_path / "scheduler.log").open("w"), (tmp_path / "worker.log").open("w")
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                  "--no-dashboard"], stdout=logs[0], stderr=subprocess.STDOUT)
    worker = subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                               "--no-dashboard", "--local-directory", str(tmp_path / "dask")],
                              stdout=logs[1], stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with Client(address, timeout="5s") as client:
                    client.wait_for_workers(2, timeout=5)
                    break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        yield address
    finally:
        stop_process(worker)
        stop_process(scheduler)
        for log in logs:
            log.close()


def test_ingest_and_preprocess_on_an_existing_scheduler(dask_cluster, tmp_path, prefect_harness):
    cohort = synthesize(tmp_path / "cohort", patients=4, seed=6, matrix=32)
    spec = yaml.safe_load(DEMO_SPEC.format(seed=6, epochs=1))
    spec["run"]["dask"] = {"address": dask_cluster}
    spec["preprocess"][-1] = {"crop_pad": {"shape": [16, 24, 24], "value": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))

    with Client(dask_cluster) as client:
        ingested = ingest_flow(str(path))
        prepared = preprocess_flow(str(path))
        # the work ran on the external workers: the scheduler saw our task prefixes
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert ingested["ingested"] == cohort.n_patients
    assert prepared["computed"] == cohort.n_patients
    assert {"scan_files", "ingest_series", "preprocess_series"} <= set(prefixes)


def _worker_process() -> tuple[int, int, bool]:
    import os
    import sys

    return os.getpid(), os.getppid(), "medflow.preprocessing" in sys.modules


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_local_workers_start_the_way_asked(method):
    import os

    from medflow.dask_runtime import dask_client

    with dask_client(n_workers=1, start_method=method) as client:
        pid, parent, preloaded = client.submit(_worker_process, pure=False).result()
    assert pid != os.getpid()
    if method == "forkserver":  # forked from the fork server, which imported medflow's modules once
        assert parent != os.getpid() and preloaded
    else:  # a fresh interpreter started by this process
        assert parent == os.getpid()


def test_the_ingest_flow_starts_one_cluster_for_its_scan_and_its_ingest(tmp_path, prefect_harness, monkeypatch):
    from medflow import dask_runtime

    started = []
    original = dask_runtime._local_cluster

    def counting(*args, **kwargs):
        started.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(dask_runtime, "_local_cluster", counting)
    cohort = synthesize(tmp_path / "cohort", patients=3, seed=4, matrix=32)
    spec = yaml.safe_load(DEMO_SPEC.format(seed=4, epochs=1))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert ingest_flow(str(path))["ingested"] == cohort.n_patients
    assert len(started) == 1


def _timed_sleep(weight, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    return weight, start, time.monotonic()


def _overlap(a, b) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def test_memory_budget_keeps_large_series_apart():
    from distributed import LocalCluster

    from medflow.dask_runtime import run_all

    weights = [60, 60, 60, 10, 10]
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        bounded = run_all(client, _timed_sleep, [(w, 0.3) for w in weights], weights=weights, budget=100)
        unbounded = run_all(client, _timed_sleep, [(w, 0.3) for w in weights])
    heavy = [r for r in bounded if r[0] == 60]
    assert len(bounded) == 5 and len(heavy) == 3
    assert not any(_overlap(a, b) for i, a in enumerate(heavy) for b in heavy[i + 1:])  # never two at once
    assert any(_overlap(h, r) for h in heavy for r in bounded if r[0] == 10)  # small ones still fill the gaps
    free = [r for r in unbounded if r[0] == 60]
    assert any(_overlap(a, b) for i, a in enumerate(free) for b in free[i + 1:])  # without a budget they do


def test_series_larger_than_any_worker_is_quarantined_not_run():
    from storage.ingest import SeriesPlan
    from tasks.ingest import split_by_memory, too_large

    small = SeriesPlan("sa", ["a/1"], "d1", "CT", memory=100 * 2**20)
    huge = SeriesPlan("sb", ["b/1", "b/2"], "d2", "CT", memory=9 * 2**30)
    fits, too_big = split_by_memory([small, huge], [4 * 2**30, 4 * 2**30])
    assert fits == [small] and too_big == [huge]
    result = too_large(huge, 4 * 2**30)
    assert result["status"] == "quarantined" and len(result["quarantine"]) == 2
    assert "about 9.0 GiB to ingest, workers have 4.0 GiB" in result["reason"]
    assert split_by_memory([small, huge], []) == ([small, huge], [])  # no limits known: run everything


def test_flows_with_a_memory_store_use_threads(tmp_path, prefect_harness):
    import uuid

    from storage.store import Store

    cohort = synthesize(tmp_path / "cohort", patients=3, seed=9, matrix=32)
    spec = yaml.safe_load(DEMO_SPEC.format(seed=9, epochs=1))
    url = f"memory://medflow-flow-{uuid.uuid4().hex}/store.zarr"
    spec["data"]["store"] = url
    spec["preprocess"][-1] = {"crop_pad": {"shape": [16, 24, 24], "value": 0}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert ingest_flow(str(path))["ingested"] == cohort.n_patients
    assert preprocess_flow(str(path))["computed"] == cohort.n_patients
    assert len(Store(url).catalog()) == cohort.n_patients
    assert ingest_flow(str(path))["ingested"] == 0  # incremental there too

    spec["run"]["dask"] = {"address": "tcp://127.0.0.1:1"}
    spec["data"]["store"] = f"memory://medflow-flow-{uuid.uuid4().hex}/store.zarr"  # fresh: work to do
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="lives in this process only"):
        ingest_flow(str(path))
