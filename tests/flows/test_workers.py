"""Work pools as a three-machine layout runs them, on loopback: `medflow worker` processes for a CPU pool
(ingest) and a GPU pool (pipelines, with `--train-slots 1`), deployments that target each pool, and two
pipelines whose training stages never overlap while ingest goes on in the other pool."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from tests.conftest import server_env, stop_process

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MEDFLOW = Path(sys.executable).parent / "medflow"

_DEPLOY = """
import sys
from prefect import flow
from prefect.deployments import run_deployment
root, cpu, gpu, spec_a, spec_b, spec_c = sys.argv[1:]
for entry, name, pool in [("flows/pipeline.py:pipeline", "gpu-test", gpu), ("flows/ingest.py:ingest_flow", "cpu-test", cpu)]:
    flow.from_source(source=root, entrypoint=entry).deploy(name=name, work_pool_name=pool, print_next_steps=False)
for name, spec in [("pipeline/gpu-test", spec_a), ("pipeline/gpu-test", spec_b), ("ingest/cpu-test", spec_c)]:
    print(run_deployment(name, parameters={"spec": spec}, timeout=0).id)
"""


def _copy(quick_spec, to):
    """The quick spec with a training long enough (80 epochs, no early stop) that two would overlap."""
    import yaml

    shutil.copytree(quick_spec.parent, to, ignore=shutil.ignore_patterns("runs", "store.zarr", "identifying"))
    spec = yaml.safe_load((to / quick_spec.name).read_text())
    spec["train"].update({"epochs": 80, "early_stopping": None})
    (to / quick_spec.name).write_text(yaml.safe_dump(spec))
    return to / quick_spec.name


def test_two_pools_two_workers_and_one_training_at_a_time(prefect_server, quick_spec, tmp_path):
    api = f"{prefect_server}/api"
    env = {**server_env(api, tmp_path / "home"), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1"}
    cpu, gpu = f"cpu-{tmp_path.name[-6:]}", f"gpu-{tmp_path.name[-6:]}"
    logs = [(tmp_path / f"{p}.log").open("w") for p in ("cpu", "gpu")]
    workers = [subprocess.Popen([str(MEDFLOW), "worker", "--pool", cpu], env=env, stdout=logs[0],
                                stderr=subprocess.STDOUT),
               subprocess.Popen([str(MEDFLOW), "worker", "--pool", gpu, "--train-slots", "1"], env=env,
                                stdout=logs[1], stderr=subprocess.STDOUT)]
    try:
        specs = [_copy(quick_spec, tmp_path / name) for name in ("a", "b", "c")]
        deadline = time.monotonic() + 120
        while not all(httpx.get(f"{api}/work_pools/{p}").status_code == 200 for p in (cpu, gpu)):
            assert time.monotonic() < deadline, "the workers did not create their pools"
            time.sleep(1)
        started = datetime.now(timezone.utc).isoformat()
        deploy = subprocess.run([sys.executable, "-c", _DEPLOY, str(ROOT), cpu, gpu, *map(str, specs)], env=env,
                                capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert deploy.returncode == 0, deploy.stderr[-3000:]
        ids = deploy.stdout.split()[-3:]
        deadline = time.monotonic() + 900
        while True:
            runs = [httpx.get(f"{api}/flow_runs/{i}").json() for i in ids]
            if all(r["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
                break
            assert time.monotonic() < deadline, [r["state"]["type"] for r in runs]
            time.sleep(2)
        assert [r["state"]["type"] for r in runs] == ["COMPLETED"] * 3, [r["state"] for r in runs]
        assert [r["work_pool_name"] for r in runs] == [gpu, gpu, cpu]
        limit = httpx.get(f"{api}/concurrency_limits/tag/medflow-train").json()
        assert limit["concurrency_limit"] == 1

        # the training task runs of these pipelines (their train subflows are children of the two flow runs)
        trainings = httpx.post(f"{api}/task_runs/filter", json={"task_runs": {
            "name": {"like_": "train_model"}, "start_time": {"after_": started}}}).json()
        spans = sorted((datetime.fromisoformat(t["start_time"]), datetime.fromisoformat(t["end_time"]))
                       for t in trainings if t["state"]["type"] == "COMPLETED")
        assert len(spans) == 2, trainings
        assert spans[0][1] <= spans[1][0], f"two trainings at once under --train-slots 1: {spans}"
        assert (specs[2].parent / "store.zarr").exists() and not (specs[2].parent / "runs").exists()  # ingest only
    finally:
        for proc in workers:
            stop_process(proc)
        for log in logs:
            log.close()
        httpx.delete(f"{api}/concurrency_limits/tag/medflow-train")
