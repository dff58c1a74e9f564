"""Ingest on real files: the synthetic cohort, pydicom's test files and its DICOMDIR tree."""

from __future__ import annotations

import gzip
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from storage.dicom import list_source
from storage.ingest import IngestOptions, source_index
from storage.store import Store
from tests.helpers import ingest_serial, ingested_files, quarantine_reasons


def _all_bytes(root: Path):
    """Every file's bytes under ``root``; gzip files decompressed so that nothing hides in them."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            data = path.read_bytes()
            yield path, gzip.decompress(data) if name.endswith(".gz") else data


def test_synthetic_cohort_ingests_and_quarantines(small_cohort, tmp_path):
    out = ingest_serial(small_cohort.dicom_dir, tmp_path / "store.zarr", IngestOptions(min_slices=8))
    store = out["store"]
    catalog = store.catalog()
    assert len(catalog) == small_cohort.n_patients
    reasons = quarantine_reasons(out)
    assert "not a DICOM file" in reasons["misc/README.txt"]
    assert "no pixel data (Basic Text SR Storage)" == reasons["misc/sr_0001.dcm"]
    assert "cannot decode pixel data" in reasons["misc/7f3e91aa02c4"]
    assert any("< ingest.min_slices=8" in r for r in reasons.values())  # the localizer
    # every file is either in a series or in quarantine
    listed = len(list_source(small_cohort.dicom_dir))
    assert sum(e["n_files"] for e in catalog.values()) + len(reasons) == listed
    for key, entry in catalog.items():
        vendor = entry["acquisition"]["Manufacturer"]
        assert vendor in ("MEDFLOW-SYNTH", "OTHER-SYNTH", "THIRD-SYNTH")
        assert entry["acquisition"] == {"Modality": "CT", "Manufacturer": vendor,
                                        "ManufacturerModelName": entry["acquisition"]["ManufacturerModelName"],
                                        "KVP": 120.0,
                                        "SliceThickness": entry["spacing"][0], "BodyPartExamined": "CHEST",
                                        "PhotometricInterpretation": "MONOCHROME2", "BitsStored": 12}
        # sex and a ten-year age band only (the synthetic birth dates are 1930-1989, studies in 2024)
        assert set(entry["demographics"]) == {"sex", "age_band"} and entry["demographics"]["sex"] in ("M", "F")
        assert entry["demographics"]["age_band"] in {"30-39", "40-49", "50-59", "60-69", "70-79", "80-89", "90+"}
        assert "identifiers" not in entry
        vol = store.read_image(key)
        assert vol.shape == tuple(entry["shape"]) and vol.dtype == np.int16
        assert -1100 < np.median(vol[:, 0, :]) < -900  # air above the body, in HU


def test_no_phi_reaches_the_store(small_cohort, tmp_path, caplog):
    caplog.set_level("DEBUG")
    root = tmp_path / "store.zarr"
    ingest_serial(small_cohort.dicom_dir, root, IngestOptions(min_slices=8))
    needles = [c.encode() for c in small_cohort.canaries] + [u.encode() for u in small_cohort.uids]
    # the birth dates and every UID of the source, read back from the files themselves
    for path in list(small_cohort.dicom_dir.rglob("*.dcm"))[:50]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        needles += [str(ds.PatientBirthDate).encode(), str(ds.SOPInstanceUID).encode()]
    checked = 0
    for path, data in _all_bytes(root):
        if path.name == "secret":
            continue
        checked += 1
        for needle in needles:
            assert needle not in data, f"{needle!r} found in {path}"
    assert checked > 10
    for needle in needles:
        assert needle.decode() not in caplog.text


def _store_bytes(root: Path):
    """``_all_bytes`` with Zarr chunks decompressed too (Blosc), so that nothing hides in them."""
    from numcodecs import Blosc

    for path, data in _all_bytes(root):
        try:
            data = data + Blosc().decode(data).tobytes() if "/c/" in path.as_posix() else data
        except Exception:  # not a Blosc frame: searched as it is
            pass
        yield path, data


def test_file_and_folder_names_never_reach_the_store(small_cohort, tmp_path, caplog):
    # real exports name files after their SOPInstanceUID and folders after the patient
    caplog.set_level("DEBUG")
    src = tmp_path / "export"
    needles = set()
    for path in sorted(small_cohort.dicom_dir.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            sop, name = str(ds.SOPInstanceUID), str(ds.PatientName)
        except Exception:  # the cohort's broken files
            continue
        folder = src / name.replace("^", "_")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{sop}.dcm")
        needles |= {sop, name.replace("^", "_")}
    (src / "Doe_Jane^ZQXFOLDER").mkdir()
    (src / "Doe_Jane^ZQXFOLDER" / "1.2.826.0.1.3680043.99.1234.dcm").write_bytes(b"not dicom at all")
    needles |= {"ZQXFOLDER", "1.2.826.0.1.3680043.99.1234"}
    out = ingest_serial(src, tmp_path / "store.zarr")
    assert len(out["store"].catalog()) >= 1 and len(out["store"].quarantine()) >= 1
    checked = 0
    for path, data in _store_bytes(tmp_path / "store.zarr"):
        checked += 1
        for needle in needles:
            assert needle.encode() not in data, f"{needle!r} found in {path}"
    assert checked > 10
    for needle in needles:
        assert needle not in caplog.text
    # the user still finds the quarantined file: its path comes back from the source, outside the store
    assert quarantine_reasons(out)["Doe_Jane^ZQXFOLDER/1.2.826.0.1.3680043.99.1234.dcm"].startswith("not a DICOM file")


def test_deidentify_off_keeps_identifiers(small_cohort, tmp_path):
    out = ingest_serial(small_cohort.dicom_dir, tmp_path / "s.zarr", IngestOptions(min_slices=8, deidentify=False))
    entry = next(iter(out["store"].catalog().values()))
    assert entry["identifiers"]["PatientID"].startswith("ZQXCANARYPID")


def test_second_ingest_is_incremental(small_cohort, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_cohort.dicom_dir, src)
    root = tmp_path / "store.zarr"
    first = ingest_serial(src, root, IngestOptions(min_slices=8))
    assert len(first["results"]) > 0
    second = ingest_serial(src, root, IngestOptions(min_slices=8))
    assert second["results"] == [] and len(second["plan"].unchanged) == len(first["results"])
    assert set(quarantine_reasons(second)) == set(quarantine_reasons(first)) and len(quarantine_reasons(second)) > 0
    # drop one slice file of one series: only that series is redone (and now fails the spacing check)
    key = next(iter(first["store"].catalog()))
    index = source_index(first["store"], str(src))
    files = [p for p, r in index.items() if r.get("series_key") == key]
    along = {p: float(pydicom.dcmread(src / p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files}
    victim = sorted(files, key=along.get)[len(files) // 2]  # a slice in the middle: its loss leaves a gap
    (src / victim).unlink()
    third = ingest_serial(src, root, IngestOptions(min_slices=8))
    assert [r["series_key"] for r in third["results"]] == [key]
    # the old version is withdrawn, not left visible beside its quarantine rows
    assert third["results"][0]["status"] == "quarantined"
    assert key not in third["store"].catalog()


def test_failed_write_leaves_no_partial_series(small_cohort, tmp_path, monkeypatch):
    store = Store(tmp_path / "store.zarr")
    import zarr

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(zarr.Array, "__setitem__", boom)
    with pytest.raises(OSError):
        store.write_series("sabc", np.zeros((2, 4, 4), np.int16),
                           {"spacing": [1, 1, 1], "origin": [0, 0, 0], "direction": np.eye(3).tolist(), "digest": "x"})
    assert store.catalog() == {}
    assert not (store.root / "series" / "sabc").exists()
    assert list((store.root / ".tmp").iterdir()) == []


def test_every_pydicom_test_file_is_ingested_or_quarantined(pydicom_test_files, tmp_path):
    out = ingest_serial(pydicom_test_files, tmp_path / "store.zarr")
    store = out["store"]
    listed = {p for p, _, _ in list_source(pydicom_test_files)}
    in_series = ingested_files(store, pydicom_test_files)
    quarantined = set(quarantine_reasons(out))
    assert all(row["reason"] for row in store.quarantine())
    assert listed == in_series | quarantined
    # real CT slices among them are ingested, not just quarantined
    assert "CT_small.dcm" in in_series
    assert len(store.catalog()) >= 5
    # MR_small.dcm in eight lossless transfer syntaxes: one SOP instance with the same pixels, so one
    # slice is kept and the 7 copies are dropped; the truncated copy is quarantined on its own
    reasons = quarantine_reasons(out)
    mr_key = source_index(store, str(pydicom_test_files))["MR_small.dcm"]["series_key"]
    entry = store.catalog()[mr_key]
    assert entry["shape"] == [1, 64, 64] and entry["duplicate_files_dropped"] == 7
    assert "MR_small_RLE.dcm" in in_series and "MR_small_jp2klossless.dcm" in in_series
    assert "cannot decode pixel data" in reasons["MR_truncated.dcm"]


def test_dicomdir_tree_groups_series_by_uid(pydicom_test_files, tmp_path):
    src = pydicom_test_files / "dicomdirtests"
    expected, no_pixels = defaultdict(int), set()
    for path in src.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if "PixelData" not in ds:
            no_pixels.add(path.relative_to(src).as_posix())
        elif "SeriesInstanceUID" in ds:
            expected[str(ds.SeriesInstanceUID)] += 1
    out = ingest_serial(src, tmp_path / "store.zarr")
    pseudo = out["store"].pseudonymizer()
    got = defaultdict(int)
    for rec in out["store"].scan_index().values():
        if "series_key" in rec:
            got[rec["series_key"]] += 1
    assert len(expected) > 3
    assert got == {pseudo.series_key(uid): n for uid, n in expected.items()}
    reasons = quarantine_reasons(out)
    assert all(reasons[p].startswith("no pixel data") for p in no_pixels)
    for key, entry in out["store"].catalog().items():
        assert entry["n_files"] == (1 if entry["kind"] == "image" else got[key])


def test_the_listing_skips_hidden_entries_fifos_and_links_out_of_the_tree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "a" / "b" / "x.dcm").write_bytes(b"x" * 10)
    (tmp_path / "top").write_bytes(b"y")
    (tmp_path / ".hidden" / "z").write_bytes(b"z")
    (tmp_path / "a" / ".dot").write_bytes(b"d")
    os.mkfifo(tmp_path / "a" / "pipe")  # opening it would block the scan
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)  # not followed
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    (tmp_path / "alias").symlink_to(tmp_path / "top")  # a link to a file is a file
    listed = list_source(tmp_path)
    assert [(p, s) for p, s, _ in listed] == [("a/b/x.dcm", 10), ("alias", 1), ("top", 1)]
