"""Against a standing Prefect server: deployments served by `medflow serve` and triggered ad hoc."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import server_env, stop_process

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_serve_deployments_and_trigger_adhoc_run(prefect_server, quick_spec, tmp_path):
    api = f"{prefect_server}/api"
    env = server_env(api, tmp_path / "client-home")
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(BIN / "medflow"), "serve", "--spec", str(quick_spec)], env=env,
                             cwd=Path(__file__).parents[2], stdout=log, stderr=subprocess.STDOUT)
    try:
        def registered(name):
            r = httpx.get(f"{api}/deployments/name/{name}", timeout=5)
            return r.json() if r.status_code == 200 else None

        # serve registers the deployments one after the other: wait for each
        deployment = _wait_for(lambda: registered("pipeline/adhoc"), 120, "pipeline/adhoc to be served")
        nightly = _wait_for(lambda: registered("pipeline/nightly"), 60, "pipeline/nightly to be served")
        hourly = _wait_for(lambda: registered("ingest/hourly"), 60, "ingest/hourly to be served")
        assert deployment["enforce_parameter_schema"] is True
        assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert hourly["schedules"][0]["schedule"]["cron"] == "0 * * * *"

        # a parameter that is not a string is refused by the parameter schema
        bad = subprocess.run([str(BIN / "prefect"), "deployment", "run", "pipeline/adhoc", "--param", "spec=[1, 2]"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0

        t0 = time.monotonic()
        run = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "pipeline/adhoc", "--param", f"spec={quick_spec}",
             "--watch", "--watch-timeout", "240"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        seconds = time.monotonic() - t0
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Completed" in run.stdout + run.stderr
        print(f"\ntrigger-to-done for pipeline/adhoc: {seconds:.1f} s")
        runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment["id"]]}}},
                          timeout=10).json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
        assert runs[0]["parameters"]["spec"] == str(quick_spec)
    finally:
        stop_process(serve)
        log.close()
