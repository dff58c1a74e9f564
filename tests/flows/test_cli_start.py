"""`medflow ingest` as a user runs it: a process of its own, no Prefect server configured.

The command starts Prefect's temporary server early (``medflow.api_server``) and keeps the
migrated empty database as a template; a second work folder's Prefect home starts from a copy.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "MEDFLOW_CACHE": str(cache), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _spec(folder: Path, source: Path, labels: Path) -> Path:
    folder.mkdir()
    spec = {"name": "ingest-only", "data": {"source": str(source), "store": "store.zarr",
                                            "labels": {"path": str(labels), "label_column": "nodule"}},
            "model": {"task": "classification", "arch": "cnn3d"}}
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _block_type_ids(db: Path) -> set[str]:
    """Made with new UUIDs by each server that registers Prefect's block types in a new database."""
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT id FROM block_type")}


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


@pytest.mark.slow
def test_ingest_command_starts_prefect_and_keeps_a_template_for_new_homes(tmp_path, small_cohort):
    cache = tmp_path / "cache"
    source = tmp_path / "dicom"
    shutil.copytree(small_cohort.dicom_dir, source)
    for name in ("one", "two"):
        spec = _spec(tmp_path / name, source, small_cohort.labels_csv)
        out = subprocess.run([str(BIN / "medflow"), "ingest", str(spec)], env=_env(cache), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "series ingested" in out.stdout, out.stdout[-2000:]
        home_db = tmp_path / name / ".prefect" / "prefect.db"
        assert "flow_run" in _tables(home_db)  # the flow ran against this folder's own Prefect home
        with sqlite3.connect(home_db) as con:
            assert con.execute("SELECT count(*) FROM flow_run WHERE name IS NOT NULL").fetchone()[0] >= 1
    templates = list(cache.glob("prefect-*.db"))
    assert len(templates) == 1 and "flow_run" in _tables(templates[0])
    with sqlite3.connect(templates[0]) as con:  # kept before any run: no runs in it
        assert con.execute("SELECT count(*) FROM flow_run").fetchone()[0] == 0
    ids = _block_type_ids(templates[0])
    assert ids and _block_type_ids(tmp_path / "two" / ".prefect" / "prefect.db") == ids  # a copy, not migrated anew
