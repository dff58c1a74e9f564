"""A real PACS as the source: Orthanc with its DICOMweb plugin, started on loopback ports."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml

from flows.ingest import ingest_flow
from medflow.cli import DEMO_SPEC
from medflow.synth import synthesize
from storage.dicomweb import make_client
from tests.conftest import _free_port, stop_process

pytestmark = pytest.mark.slow
PLUGINS = Path("/usr/share/orthanc/plugins")


@pytest.fixture
def orthanc(tmp_path):
    exe = shutil.which("Orthanc")
    if exe is None or not (PLUGINS / "libOrthancDicomWeb.so").exists():
        pytest.fail("Orthanc with its DICOMweb plugin is needed: apt-get install orthanc orthanc-dicomweb "
                    "(make test does this)")
    http_port, dicom_port = _free_port(), _free_port()
    storage = tmp_path / "orthanc"
    storage.mkdir()
    config = {
        "Name": "medflow-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": http_port, "DicomPort": dicom_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(PLUGINS / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen([exe, str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/dicom-web/studies", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((tmp_path / "orthanc.log").read_text()[-3000:])
            time.sleep(0.3)
        yield f"dicomweb://127.0.0.1:{http_port}/dicom-web"
    finally:
        stop_process(proc)
        log.close()


def _upload(source: str, files: list[Path]) -> None:
    """STOW-RS: the way a modality or another PACS would send studies."""
    make_client(source).store_instances([pydicom.dcmread(f) for f in files])


def test_pulls_new_studies_incrementally(orthanc, tmp_path, prefect_harness):
    cohort = synthesize(tmp_path / "cohort", patients=2, seed=8, matrix=32, broken=False)
    by_study: dict[str, list[Path]] = {}
    for path in cohort.dicom_dir.rglob("*"):
        if path.is_file():
            by_study.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID), []).append(path)
    (first, files_a), (second, files_b) = sorted(by_study.items())

    spec = yaml.safe_load(DEMO_SPEC.format(seed=8, epochs=1))
    spec["data"]["source"] = orthanc
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))

    _upload(orthanc, files_a)
    one = ingest_flow(str(path))
    assert one["dicomweb"] == {"listed": 1, "fetched": 1, "files": len(files_a)}
    assert one["ingested"] == 1

    _upload(orthanc, files_b)
    two = ingest_flow(str(path))
    assert two["dicomweb"]["listed"] == 2 and two["dicomweb"]["fetched"] == 1  # only the new study
    assert two["ingested"] == 1 and two["dicomweb"]["files"] == len(files_b)

    three = ingest_flow(str(path))
    assert three["dicomweb"]["fetched"] == 0 and three["ingested"] == 0

    store_files = [p for p in (tmp_path / "store.zarr").rglob("*") if p.is_file() and p.name != "secret"]
    assert all(b"ZQXCANARY" not in p.read_bytes() for p in store_files if not p.name.endswith(".gz"))
    assert len(json.loads(Path(tmp_path / "store.zarr" / "quarantine.json").read_text())) == 0


def test_connection_faults_are_retried_then_reported(tmp_path):
    from medflow.retry import is_transient

    port = _free_port()  # nothing listens here
    client = make_client(f"dicomweb://127.0.0.1:{port}/dicom-web", retries=2)
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        client.search_for_series()
    assert time.monotonic() - t0 >= 0.5  # backoff between the attempts
    assert is_transient(info.value)  # and the Prefect task retries it once more
