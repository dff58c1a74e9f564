"""`train.deterministic: true` as a user meets it: `medflow run` twice, each in a fresh process (Prefect's
threads, Dask workers, augmentation and all), writes the same predictions.csv byte for byte."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import server_env

pytestmark = pytest.mark.slow
MEDFLOW = Path(sys.executable).parent / "medflow"


def test_two_runs_in_fresh_processes_write_identical_predictions(prefect_server, quick_spec, tmp_path):
    work = tmp_path / "quick"
    shutil.copytree(quick_spec.parent, work, ignore=shutil.ignore_patterns("runs", "store.zarr", "identifying"))
    spec = yaml.safe_load((work / quick_spec.name).read_text())
    assert spec["train"]["deterministic"] and spec["augment"]["flip"] and spec["augment"]["shift"]
    spec["train"]["epochs"] = 3
    (work / "det.yaml").write_text(yaml.safe_dump(spec))
    env = server_env(f"{prefect_server}/api", tmp_path / "home")
    outputs = []
    for _ in range(2):
        done = subprocess.run([str(MEDFLOW), "run", str(work / "det.yaml")], env=env, cwd=work, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        outputs.append(done.stdout)
    runs = sorted(p for p in (work / "runs").iterdir() if (p / "predictions.csv").exists())
    assert len(runs) == 2
    first, second = ((r / "predictions.csv").read_bytes() for r in runs)
    assert first == second
    history = [(r / "history.csv").read_text() for r in runs]
    assert history[0] == history[1] and len(history[0].splitlines()) == 4  # three epochs, the same losses
