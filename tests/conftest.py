"""Shared fixtures. Settings are applied before Prefect is imported anywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="medflow-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SCRATCH / "prefect"))
os.environ.setdefault("MEDFLOW_CACHE", str(_SCRATCH / "cache"))  # never the user's own cache

from medflow import settings  # noqa: E402

settings.configure(_SCRATCH)

import pytest  # noqa: E402

from medflow.synth import synthesize  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory):
    """6 patients of 32x32 slices, with broken files and canary PHI (read-only: copy before changing)."""
    return synthesize(tmp_path_factory.mktemp("cohort"), patients=6, seed=3, matrix=32)


@pytest.fixture(scope="session")
def pydicom_test_files() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, timeout: float = 30) -> None:
    """Terminate a subprocess, and kill it if it does not exit in time."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def server_env(api_url: str, home) -> dict:
    """Environment for a subprocess that talks to a standing server."""
    # not the credential and CORS that settings.configure gave this session's own temporary servers
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_SERVER_API_AUTH",
                                                                     "PREFECT_SERVER_API_CORS"))}
    env.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
                "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore"})
    return env


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A standing `prefect server start` on a free loopback port; yields its base URL."""
    import subprocess
    import sys
    import time

    import httpx

    port = _free_port()
    home = tmp_path_factory.mktemp("prefect-server")
    url = f"http://127.0.0.1:{port}"
    env = server_env(f"{url}/api", home)
    env.pop("PREFECT_API_URL")
    env["PREFECT_SERVER_UI_API_URL"] = f"{url}/api"
    log = (home / "server.log").open("w")
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("prefect server did not become healthy in 90 s")
    yield url
    stop_process(proc)
    log.close()


@pytest.fixture(scope="session")
def quick_spec(tmp_path_factory):
    """A spec on an 8-patient 32x32 cohort that runs the whole pipeline in seconds."""
    import yaml

    from medflow.cli import DEMO_SPEC

    root = tmp_path_factory.mktemp("quick")
    synthesize(root / "cohort", patients=10, seed=4, matrix=32)
    spec = yaml.safe_load(DEMO_SPEC.format(seed=4, epochs=1))
    spec["name"] = "quick-nodules"
    spec["preprocess"][0] = {"resample": {"spacing": [8.0, 8.0, 8.0]}}
    spec["preprocess"][-1] = {"crop_pad": {"shape": [16, 24, 24], "value": 0}}
    spec["model"]["params"] = {"filters": [4, 8]}
    spec["evaluate"]["bootstrap"] = 20
    spec["train"]["batch_size"] = 4
    path = root / "quick.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path
