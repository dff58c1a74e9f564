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
    assert "ingest_series" in prefixes and "preprocess_series" in prefixes
