"""Hostile input through the real ingest flow (Prefect, a local Dask cluster, a real store):
mutated files, special entries, and copies of one image racing on two workers."""

from __future__ import annotations

import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from flows.ingest import ingest_flow
from medflow.cli import DEMO_SPEC
from medflow.spec import load_spec
from storage.ingest import with_paths
from storage.store import Store
from tests.fuzz import DX_STORAGE, fuzz_source, unlock
from tests.helpers import ingested_files, new_instance, quarantine, quarantine_reasons, unaccounted

pytestmark = pytest.mark.slow


def _ingest_spec(root: Path, source: Path, *, n_workers: int = 2) -> Path:
    spec = yaml.safe_load(DEMO_SPEC.format(seed=1, epochs=1))
    spec["data"] = {"source": str(source), "store": str(root / "store.zarr"),
                    "labels": {"path": str(root / "labels.csv"), "key": "StudyInstanceUID", "label_column": "y"}}
    spec["ingest"] = {"deidentify": True}
    spec["run"] = {"retries": 2, "dask": {"n_workers": n_workers, "threads_per_worker": 1}}
    (root / "labels.csv").write_text("StudyInstanceUID,y\n1.2.3,0\n")
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_fuzzed_files_never_stop_an_ingest(tmp_path, pydicom_test_files, prefect_harness, monkeypatch):
    made = fuzz_source(tmp_path / "src", pydicom_test_files, n=300, seed=0)
    if made["root_can_read"]:  # as root, chmod does not stop reading: simulate the refusal
        real_scandir = os.scandir

        def scandir(path):
            if isinstance(path, (str, os.PathLike)) and Path(path) == made["locked"]:
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        spec = load_spec(_ingest_spec(tmp_path, tmp_path / "src"))
        first = ingest_flow(spec)  # completes: no file and no series raises out of it
        store = Store(spec.data.store)
        why = {row["path"]: row["reason"] for row in with_paths(store.quarantine(), store, str(tmp_path / "src"))}
        stored = ingested_files(store, tmp_path / "src")
        assert unaccounted(store, tmp_path / "src") == set()  # every entry: in the store or quarantined
        assert all(why.values())
        assert "src" not in " ".join(why.values())  # reasons name files relative to the source
        assert why["special/loop"].startswith("symbolic link to a folder already listed")
        assert why["special/pipe.dcm"] == "not a regular file (FIFO)"
        assert why["special/dangling.dcm"] == "symbolic link to nothing (dangling)"
        assert why["special/locked"].startswith("folder not readable: PermissionError")
        assert "special/folder.dcm/" not in why  # an empty folder with a file's name holds nothing
        bad_name = os.fsdecode(b"special/bad\xffname.dcm")  # not UTF-8: keyed by its bytes, stored or quarantined
        assert bad_name in stored or bad_name in why
        # the causes the issue found, each a row now instead of a failed batch
        text = "\n".join(why.values())
        assert "NotImplementedError: Unknown Value Representation" in text
        assert "Use force=True" not in text
        assert len(stored) >= 6 and first["ingested"] >= 2  # the untouched seeds and exact copies still land
        quarantine_before = sorted(map(str, store.quarantine()))
        catalog_before = store.catalog()

        again = ingest_flow(spec)  # and a second ingest of the same folder changes nothing
        assert again["ingested"] == 0 and again["quarantined_series"] == 0
        assert sorted(map(str, store.quarantine())) == quarantine_before
        assert store.catalog() == catalog_before
        print("fuzz:", made["kinds"], "files", len(list((tmp_path / "src").rglob("*.dcm"))), "stored", len(stored),
              "quarantined", len(why), Counter(r.split(":")[0][:40] for r in why.values()).most_common(8))
    finally:
        unlock(tmp_path / "src")


def _write_dx(path: Path, pixels: np.ndarray, *, sop: str, series: str) -> None:
    ds = new_instance(DX_STORAGE)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "P1", "1.2.3.4", series, "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_copies_of_one_image_on_two_workers_are_one_image(tmp_path, prefect_harness):
    src = tmp_path / "src"
    src.mkdir()
    pixels = np.arange(30 * 40).reshape(30, 40) % 4000
    for i in range(8):  # the same instance exported 8 times, some under other series UIDs
        _write_dx(src / f"copy{i}.dcm", pixels, sop="1.2.3.4.5.6", series="1.2.3.4.7" if i < 5 else "1.2.3.4.8")
    spec = load_spec(_ingest_spec(tmp_path, src))
    store = Store(spec.data.store)
    seen = []
    for attempt in range(5):
        if attempt:
            shutil.rmtree(spec.data.store)  # from an empty store each time: the race is in the first ingest
        result = ingest_flow(spec)
        catalog = store.catalog()
        assert result["ingested"] == 1 and result["quarantined_files"] == 0
        assert len(catalog) == 1
        (key, entry), = catalog.items()
        assert entry["duplicate_files_dropped"] == 7
        np.testing.assert_array_equal(store.read_image(key)[0], pixels)
        seen.append(entry["shape"])
    assert seen == [[1, 30, 40]] * 5


def test_copies_of_one_instance_with_different_pixels_are_all_quarantined(tmp_path):
    from tests.helpers import ingest_serial

    src = tmp_path / "src"
    src.mkdir()
    pixels = np.arange(12).reshape(3, 4) * 10
    _write_dx(src / "a.dcm", pixels, sop="1.2.3.9", series="1.2.3.10")
    _write_dx(src / "b.dcm", pixels + 1, sop="1.2.3.9", series="1.2.3.10")
    out = ingest_serial(src, tmp_path / "store.zarr")
    why = quarantine_reasons(out)
    assert out["store"].catalog() == {}
    assert set(why) == {"a.dcm", "b.dcm"}
    assert all("same SOP instance with different pixels" in r for r in why.values())
    assert pydicom.dcmread(src / "a.dcm").SOPInstanceUID == pydicom.dcmread(src / "b.dcm").SOPInstanceUID
