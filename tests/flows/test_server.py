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

        # a spec outside the folders medflow serve allows is refused, whatever it would do
        outside = tmp_path / "elsewhere" / "spec.yaml"
        outside.parent.mkdir()
        outside.write_text(quick_spec.read_text())
        refused = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "pipeline/adhoc", "--param", f"spec={outside}",
             "--watch", "--watch-timeout", "120"], env=env, capture_output=True, text=True, timeout=180)
        assert refused.returncode != 0
        runs = httpx.post(f"{api}/flow_runs/filter", timeout=10, json={
            "deployments": {"id": {"any_": [deployment["id"]]}}, "sort": "EXPECTED_START_TIME_DESC"}).json()
        assert runs[0]["parameters"]["spec"] == str(outside) and runs[0]["state_type"] == "FAILED"
        assert "AccessRefused: refused: spec" in runs[0]["state"]["message"]
        assert not (outside.parent / "store.zarr").exists() and not (outside.parent / "runs").exists()
    finally:
        stop_process(serve)
        log.close()


def test_medflow_server_refuses_foreign_origins_and_requests_without_credentials(tmp_path):
    from tests.conftest import _free_port

    port, reports_port = _free_port(), _free_port()
    home = tmp_path / "server-home"
    env = server_env("", tmp_path)
    env.pop("PREFECT_API_URL")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(BIN / "medflow"), "server", "--port", str(port), "--home", str(home),
                               "--reports-port", str(reports_port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            try:
                return httpx.get(f"{url}/api/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return server.poll() is not None  # exited: fail below rather than wait
        _wait_for(healthy, 120, "medflow server to answer")
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
        auth = (home / "api-auth").read_text().strip()
        assert oct((home / "api-auth").stat().st_mode & 0o777) == "0o600"
        assert f"PREFECT_API_AUTH_STRING='{auth}'" in (home / "client.env").read_text()
        # the read-only report server beside it, and the clients told where it is
        assert f"MEDFLOW_REPORTS_URL=http://127.0.0.1:{reports_port}" in (home / "client.env").read_text()
        assert httpx.get(f"http://127.0.0.1:{reports_port}/health", timeout=5).text == "medflow reports"
        body = {"limit": 1}
        # what a web page on another origin can send: refused without the credentials it cannot know
        evil = httpx.post(f"{url}/api/flow_runs/filter", json=body, headers={"Origin": "http://evil.example"},
                          timeout=10)
        assert evil.status_code == 401
        assert evil.headers.get("access-control-allow-origin") in (None, url)
        preflight = httpx.options(f"{url}/api/deployments/filter", timeout=10, headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.headers.get("access-control-allow-origin") != "http://evil.example"
        assert httpx.post(f"{url}/api/flow_runs/filter", json=body, timeout=10).status_code == 401
        assert httpx.post(f"{url}/api/flow_runs/filter", json=body, timeout=10,
                          auth=tuple(auth.split(":", 1))).status_code == 200
        # the UI's own origin is allowed
        own = httpx.options(f"{url}/api/deployments/filter", timeout=10, headers={
            "Origin": url, "Access-Control-Request-Method": "POST"})
        assert own.headers.get("access-control-allow-origin") == url
    finally:
        stop_process(server)
        log.close()
    # stopping `medflow server` stops Prefect's server too (no orphan keeps the port)
    _wait_for(lambda: not _answers(f"{url}/api/health"), 30, "the Prefect server to stop with medflow server")


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True
