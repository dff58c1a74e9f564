"""Every path and URL a spec names, tried one by one through the API of `medflow serve`: what leads outside
the allowed folders, or to a URL not allowed, is refused (the run fails naming the field) or quarantined (an
entry of the source), and nothing is read or written outside."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from medflow.cli import DEMO_SPEC
from medflow.synth import synthesize
from storage.store import Store
from tests.conftest import server_env, stop_process

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
ROOT = Path(__file__).parents[2]


class _Recorder(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        _Recorder.hits.append(self.path)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


def _dicom_spec(allowed: Path, name: str, **data) -> Path:
    spec = yaml.safe_load(DEMO_SPEC.format(seed=1, epochs=1))
    spec["name"] = name
    spec["data"].update({"source": str(allowed / "cohort" / "dicom"), "store": str(allowed / f"{name}.zarr"),
                         "labels": {"path": str(allowed / "cohort" / "labels.csv"), "key": "StudyInstanceUID",
                                    "label_column": "nodule"}})
    spec["data"].update(data)
    spec["run"] = {"retries": 0, "dask": {"n_workers": 1, "threads_per_worker": 1}}
    path = allowed / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _image_spec(allowed: Path, name: str) -> Path:
    spec = yaml.safe_load((ROOT / "examples" / "xray_seed.yaml").read_text())
    spec["name"] = name
    del spec["data"]["layout"]  # images listed in a CSV here, split by the run
    spec["data"]["split"] = {"val": 0.15, "test": 0.2, "seed": 0}
    spec["data"].update({"source": str(allowed / "images"), "store": str(allowed / f"{name}.zarr"),
                         "labels": {"path": str(allowed / "images.csv"), "key": "path", "label_column": "finding"}})
    spec["run"] = {"retries": 0, "dask": {"n_workers": 1, "threads_per_worker": 1}}
    path = allowed / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_every_path_field_and_url_is_confined_through_the_api(prefect_server, quick_spec, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    synthesize(allowed / "cohort", patients=2, seed=3, matrix=32, broken=False)
    synthesize(outside / "cohort", patients=2, seed=4, matrix=32, broken=False)
    (outside / "marks.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,0,0,5\n")
    (outside / "masks.csv").write_text("StudyInstanceUID,path\n1.2.3,m.nii.gz\n")
    # a link inside the allowed source to a series outside
    os.symlink(outside / "cohort" / "dicom", allowed / "cohort" / "dicom" / "linked")
    # an image list inside the allowed folder naming files outside
    (allowed / "images" / "normal").mkdir(parents=True)
    Image.fromarray(np.full((40, 40), 90, np.uint8)).save(allowed / "images" / "normal" / "a.png")
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(outside / "b.png")
    (allowed / "images.csv").write_text(f"path,finding\nnormal/a.png,normal\n{outside / 'b.png'},normal\n"
                                        "../../outside/b.png,normal\n/etc/passwd,normal\n/proc/self/environ,normal\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        trap_port = s.getsockname()[1]
    trap = ThreadingHTTPServer(("127.0.0.1", trap_port), _Recorder)
    threading.Thread(target=trap.serve_forever, daemon=True).start()

    refused = {  # field -> (spec, what the failed run's message must name)
        "data.store (file://)": (_dicom_spec(allowed, "store-url", store=f"file://{outside}/store.zarr"), "data.store"),
        "data.store (folder)": (_dicom_spec(allowed, "store-dir", store=str(outside / "store.zarr")), "data.store"),
        "data.store (s3://)": (_dicom_spec(allowed, "store-s3", store="s3://someone-elses-bucket/store.zarr"),
                               "data.store"),
        "data.source": (_dicom_spec(allowed, "source", source=str(outside / "cohort" / "dicom")), "data.source"),
        "data.source (dicomweb)": (_dicom_spec(allowed, "dicomweb", source=f"dicomweb://127.0.0.1:{trap_port}/x"),
                                   "data.source"),
        "data.runs": (_dicom_spec(allowed, "runs", runs=str(outside / "runs")), "data.runs"),
        "data.labels.path": (_dicom_spec(allowed, "labels", labels={
            "path": str(outside / "cohort" / "labels.csv"), "key": "StudyInstanceUID", "label_column": "nodule"}),
            "data.labels.path"),
        "data.marks.table": (_dicom_spec(allowed, "marks", marks={"source": "csv", "table": str(outside / "marks.csv")}),
                             "data.marks.table"),
        "data.masks.table": (_dicom_spec(allowed, "masks", masks={
            "source": "nifti", "table": str(outside / "masks.csv"), "key": "StudyInstanceUID"}), "data.masks.table"),
    }
    linked = _dicom_spec(allowed, "linked")
    listed = _image_spec(allowed, "listed")

    api = f"{prefect_server}/api"
    env = server_env(api, tmp_path / "client-home")
    log = (tmp_path / "serve.log").open("w")
    serve = subprocess.Popen([str(BIN / "medflow"), "serve", "--spec", str(quick_spec), "--allow", str(allowed)],
                             env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while httpx.get(f"{api}/deployments/name/ingest/hourly", timeout=5).status_code != 200:
            assert time.monotonic() < deadline and serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        ids = {}
        for what, spec in [*((k, v[0]) for k, v in refused.items()), ("linked", linked), ("listed", listed)]:
            out = subprocess.run([str(BIN / "prefect"), "deployment", "run", "ingest/hourly", "--param",
                                  f"spec={spec}"], env=env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stdout + out.stderr
            ids[what] = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)

        def final(run_id):
            state = httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json()["state"]
            return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

        states = {}
        deadline = time.monotonic() + 400
        while len(states) < len(ids):
            assert time.monotonic() < deadline, f"runs not finished: {set(ids) - set(states)}"
            for what, run_id in ids.items():
                if what not in states and (state := final(run_id)):
                    states[what] = state
            time.sleep(1)
    finally:
        stop_process(serve)
        log.close()
        trap.shutdown()

    table = []
    for what, (_, field) in refused.items():
        state = states[what]
        table.append((what, state["type"], state["message"][:100]))
        assert state["type"] == "FAILED" and f"AccessRefused: refused: {field}" in state["message"], (what, state)
    assert _Recorder.hits == []  # no request reached the host the caller chose
    assert sorted(p.name for p in outside.iterdir()) == ["b.png", "cohort", "marks.csv", "masks.csv"]  # nothing new

    # a link met while listing the source: quarantined, not followed; the allowed series are stored
    assert states["linked"]["type"] == "COMPLETED", states["linked"]
    store = Store(allowed / "linked.zarr")
    why = {r["file"]: r["reason"] for r in store.quarantine()}  # by key: this process would follow the link
    linked_reason = why[store.path_key("linked")]
    assert linked_reason.startswith("symbolic link to outside the folders allowed")
    assert len(store.catalog()) == 2  # the two allowed patients, none of the linked ones
    # an image list's entries outside data.source: quarantined without being opened
    assert states["listed"]["type"] == "COMPLETED", states["listed"]["message"]
    store = Store(allowed / "listed.zarr")
    rows = store.quarantine()
    assert len(rows) == 4 and all("outside data.source" in r["reason"] for r in rows)
    assert len(store.catalog()) == 1
    print("\n" + "\n".join(f"{w:26s} {t:10s} {m}" for w, t, m in table))
    print(json.dumps({"linked": linked_reason, "listed": sorted({r["reason"] for r in rows})}, indent=1))
