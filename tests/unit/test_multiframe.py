"""Enhanced multi-frame images: geometry from the per-frame functional groups."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.uid import generate_uid

from storage.ingest import IngestOptions
from tests.helpers import ingest_serial, quarantine, write_ct_series


def test_enhanced_ct_ingests_like_its_single_frame_source(tmp_path):
    rng = np.random.default_rng(0)
    z = [10.0, 12.5, 5.0, 7.5, 15.0, 2.5]  # scrambled on purpose
    stored = rng.integers(0, 2000, size=(6, 12, 10)).astype(np.uint16)
    paths = write_ct_series(tmp_path / "single", stored, positions=[(-5.0, 3.0, v) for v in z],
                            pixel_spacing=(0.7, 0.8), intercept=-1000.0)
    legacy = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.update({"StudyDate": "20240101", "StudyTime": "120000", "ReferringPhysicianName": "", "StudyID": "1",
                   "AccessionNumber": "A1", "SeriesNumber": 1, "PatientSex": "F", "PatientBirthDate": ""})
        legacy.append(ds)
    enhanced = LegacyConvertedEnhancedCTImage(legacy_datasets=legacy, series_instance_uid=generate_uid(),
                                              series_number=2, sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "multi").mkdir()
    enhanced.save_as(tmp_path / "multi" / "enhanced.dcm")
    assert "ImagePositionPatient" not in pydicom.dcmread(tmp_path / "multi" / "enhanced.dcm")

    single = ingest_serial(tmp_path / "single", tmp_path / "a.zarr", IngestOptions(min_slices=2))
    multi = ingest_serial(tmp_path / "multi", tmp_path / "b.zarr", IngestOptions(min_slices=2))
    (ka, ea), = single["store"].catalog().items()
    (kb, eb), = multi["store"].catalog().items()
    np.testing.assert_array_equal(multi["store"].read_image(kb), single["store"].read_image(ka))
    for field in ("spacing", "origin", "direction", "shape"):
        assert eb[field] == ea[field], field
    assert eb["n_files"] == 1 and eb["n_frames"] == 6
    np.testing.assert_array_equal(multi["store"].read_image(kb)[:, 0, 0],
                                  stored[np.argsort(z)][:, 0, 0].astype(int) - 1000)


def test_multiframe_without_functional_groups_is_quarantined(pydicom_test_files, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pydicom_test_files / "SC_rgb_rle_2frame.dcm", src / "cine.dcm")
    out = ingest_serial(src, tmp_path / "store.zarr", IngestOptions(color="grayscale"))
    (row,) = quarantine(out)
    assert "multi-frame image (2 frames) without per-frame functional groups" in row["reason"]
