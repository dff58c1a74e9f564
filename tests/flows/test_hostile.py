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
from tests.helpers import ingested_files, new_instance, quarantine_reasons, unaccounted

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


def _image_unaccounted(store: Store, source: Path) -> set[str]:
    """Entries of an image-folder source neither stored (their content's key in the catalog) nor quarantined."""
    import stat

    from storage.dicom import list_source
    from storage.images import content_digest, image_key

    problems: list = []
    listed = {p for p, _, _ in list_source(source, problems)} | {p for p, _ in problems}
    catalog, pseudo = store.catalog(), store.pseudonymizer()
    regular = {p for p in listed if (source / p).exists() and stat.S_ISREG(os.stat(source / p).st_mode)}
    stored = {p for p in regular if image_key(pseudo, content_digest(source / p)) in catalog}
    quarantined = {r["path"] for r in with_paths(store.quarantine(), store, str(source))}
    return listed - stored - quarantined


def test_a_thousand_fuzzed_inputs_of_every_kind_each_leave_a_record(tmp_path, pydicom_test_files, prefect_harness):
    """DICOM images, ECG waveforms and SR lesion marks (mutated), a boxes table with bad rows, and PNG/JPEG class
    folders (mutated, with special entries), each through the ingest flow: 0 entries unaccounted."""
    from tests.fuzz import fuzz_boxes, fuzz_images

    # DICOM of every kind, SR marks read
    made = fuzz_source(tmp_path / "dicom", pydicom_test_files, n=600, seed=1, every_kind=True)
    unlock(tmp_path / "dicom")  # as root the locked folder is read anyway: keep the count exact
    spec = yaml.safe_load(_ingest_spec(tmp_path, tmp_path / "dicom").read_text())
    spec["data"]["marks"] = {"source": "sr"}
    (tmp_path / "dicom.yaml").write_text(yaml.safe_dump(spec))
    dicom = load_spec(tmp_path / "dicom.yaml")
    ingest_flow(dicom)
    store = Store(dicom.data.store)
    assert unaccounted(store, tmp_path / "dicom") == set()
    catalog = store.catalog()
    assert any(e.get("kind") == "waveform" for e in catalog.values())  # the ECG seed and its intact copies
    from storage.ingest import source_index

    srs = [p for p, rec in source_index(store, str(tmp_path / "dicom")).items() if rec.get("marks_for")]
    assert len(srs) >= 10  # SR copies that still parse: each used for its stored series or quarantined
    n_dicom = len(list((tmp_path / "dicom").rglob("*.dcm")))

    # a boxes table: every row stored as a box or quarantined with its line
    dx = pydicom.dcmread(tmp_path / "dicom" / "seeds" / "dx" / "dx.dcm")
    (tmp_path / "boxsrc").mkdir()
    dx.save_as(tmp_path / "boxsrc" / "dx.dcm")
    boxes = fuzz_boxes(tmp_path / "boxes.csv", str(dx.SOPInstanceUID), n=150, seed=2)
    spec["data"].update({"source": str(tmp_path / "boxsrc"), "store": str(tmp_path / "boxes.zarr"),
                         "marks": {"source": "csv", "table": str(tmp_path / "boxes.csv")}})
    (tmp_path / "boxes.yaml").write_text(yaml.safe_dump(spec))
    ingest_flow(load_spec(tmp_path / "boxes.yaml"))
    box_store = Store(tmp_path / "boxes.zarr")
    (entry,) = box_store.catalog().values()
    rows = [r["file"] for r in box_store.quarantine() if r["file"].startswith("marks table#")]
    assert len(entry["marks"]) == boxes["kinds"]["good"]
    assert len(rows) == len(set(rows)) == boxes["rows"] - boxes["kinds"]["good"]

    # PNG/JPEG class folders
    images = fuzz_images(tmp_path / "images", n=300, seed=3)
    xray = yaml.safe_load((Path(__file__).parents[2] / "examples" / "xray_seed.yaml").read_text())
    xray["data"].update({"source": str(tmp_path / "images"), "store": str(tmp_path / "images.zarr"),
                         "split": {"val": 0.15, "test": 0.2}})
    del xray["data"]["layout"]  # one folder per class
    (tmp_path / "images.yaml").write_text(yaml.safe_dump(xray))
    ingest_flow(load_spec(tmp_path / "images.yaml"))
    image_store = Store(tmp_path / "images.zarr")
    assert _image_unaccounted(image_store, tmp_path / "images") == set()
    why = {r["path"]: r["reason"] for r in with_paths(image_store.quarantine(), image_store, str(tmp_path / "images"))}
    assert why["normal/special/pipe.png"] == "not a regular file (FIFO)"
    assert why["normal/special/loop"].startswith("symbolic link to a folder already listed")
    assert len(image_store.catalog()) >= 10  # the readable mutations land (copies of one image are one image)

    total = n_dicom + boxes["rows"] + images["files"]
    print(f"\nfuzz of every kind: {n_dicom} DICOM files ({made['kinds']}), {boxes['rows']} box rows "
          f"({boxes['kinds']}), {images['files']} images ({images['kinds']}): {total} inputs, 0 unaccounted")
    assert total >= 1000


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
