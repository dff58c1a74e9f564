"""A native crash in a stage (a signal, not an exception) through `medflow run`, as a user meets it: one
line naming the signal and the stage, the flow run Crashed in Prefect, and a run folder the same command
resumes to completion."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import server_env

pytestmark = pytest.mark.slow
MEDFLOW = Path(sys.executable).parent / "medflow"


def test_a_native_crash_in_evaluate_is_one_line_a_crashed_flow_run_and_a_resumable_run(
        prefect_server, quick_spec, tmp_path):
    work = tmp_path / "quick"
    shutil.copytree(quick_spec.parent, work, ignore=shutil.ignore_patterns("runs", "store.zarr", "identifying"))
    spec = work / quick_spec.name
    env = server_env(f"{prefect_server}/api", tmp_path / "home")
    crashed = subprocess.run([str(MEDFLOW), "run", str(spec)], env={**env, "MEDFLOW_FAULT_IN_STAGE": "evaluate=SIGSEGV"},
                             capture_output=True, text=True, timeout=900)
    assert crashed.returncode == 128 + 11, crashed.stderr[-3000:]
    lines = [line for line in crashed.stderr.splitlines() if line.strip()]
    assert "died of SIGSEGV in stage evaluate" in " ".join(lines[-3:]), crashed.stderr[-2000:]
    assert "Fatal Python error" not in crashed.stderr and "most recent call first" not in crashed.stderr
    runs = [p for p in (work / "runs").iterdir() if (p / "run.json").exists()]
    assert len(runs) == 1 and json.loads((runs[0] / "run.json").read_text())["state"] == "running"
    assert (runs[0] / "model.keras").exists() and not (runs[0] / "metrics.json").exists()

    flow_runs = httpx.post(f"{prefect_server}/api/flow_runs/filter", json={
        "flow_runs": {"tags": {"all_": [f"medflow-run:{runs[0].name}"]}}}).json()
    pipeline = [r for r in flow_runs if r["parent_task_run_id"] is None]
    assert len(pipeline) == 1 and pipeline[0]["state"]["type"] == "CRASHED"
    assert "SIGSEGV in stage evaluate" in pipeline[0]["state"]["message"]

    resumed = subprocess.run([str(MEDFLOW), "run", str(spec)], env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((runs[0] / "run.json").read_text())["state"] == "completed"
    assert (runs[0] / "metrics.json").exists() and (runs[0] / "report.html").exists()
