"""The synthetic cohort: deterministic, real DICOM, with PHI canaries and broken files."""

from __future__ import annotations

import csv

import pydicom

from medflow.synth import synthesize


def test_same_seed_same_files(tmp_path):
    a = synthesize(tmp_path / "a", patients=3, seed=5, matrix=32, broken=False)
    b = synthesize(tmp_path / "b", patients=3, seed=5, matrix=32, broken=False)
    files_a = sorted(p.relative_to(a.dicom_dir) for p in a.dicom_dir.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.dicom_dir) for p in b.dicom_dir.rglob("*") if p.is_file())
    assert files_a == files_b
    assert (a.dicom_dir / files_a[0]).read_bytes() == (b.dicom_dir / files_a[0]).read_bytes()


def test_headers_are_realistic_and_carry_canaries(small_cohort):
    paths = [p for p in small_cohort.dicom_dir.rglob("*") if p.is_file() and p.parent.name != "misc"]
    ds = pydicom.dcmread(paths[0])
    assert ds.Modality == "CT" and ds.RescaleIntercept in (-1024, -1000)
    assert "ZQXCANARY" in str(ds.PatientName) and "ZQXCANARY" in ds.InstitutionName
    assert ds.pixel_array.shape == (32, 32)
    with small_cohort.labels_csv.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == small_cohort.n_patients
    assert sum(int(r["nodule"]) for r in rows) == small_cohort.n_positive == len(small_cohort.nodules)
