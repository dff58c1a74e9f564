"""Compressed transfer syntaxes decode through pydicom's pylibjpeg plugins, to the same voxels."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError

from storage.dicom import list_source
from storage.ingest import source_index
from tests.helpers import ingest_serial, quarantine

# MR_small.dcm in other transfer syntaxes (all lossless)
VARIANTS = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
            "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm", "MR_small_padded.dcm"]


def _ingest_one(src_file, tmp_path, name):
    folder = tmp_path / name / "src"
    folder.mkdir(parents=True)
    shutil.copy(src_file, folder / "image")
    out = ingest_serial(folder, tmp_path / name / "store.zarr")
    (key, entry), = out["store"].catalog().items()
    return out["store"].read_image(key), entry


@pytest.mark.parametrize("variant", VARIANTS)
def test_lossless_transfer_syntaxes_ingest_to_identical_voxels(pydicom_test_files, tmp_path, variant):
    reference, ref_entry = _ingest_one(pydicom_test_files / "MR_small.dcm", tmp_path, "reference")
    volume, entry = _ingest_one(pydicom_test_files / variant, tmp_path, "variant")
    np.testing.assert_array_equal(volume, reference)
    assert entry["spacing"] == ref_entry["spacing"] and entry["origin"] == ref_entry["origin"]


def test_jpeg2000_ct_is_ingested(pydicom_test_files, tmp_path):
    volume, entry = _ingest_one(pydicom_test_files / "J2K_pixelrep_mismatch.dcm", tmp_path, "j2k")
    ds = pydicom.dcmread(pydicom_test_files / "J2K_pixelrep_mismatch.dcm")
    assert ds.file_meta.TransferSyntaxUID.is_compressed
    assert volume.shape == (1, *ds.pixel_array.shape)


def test_undecodable_files_are_quarantined_with_the_decoders_reason(pydicom_test_files, tmp_path):
    out = ingest_serial(pydicom_test_files, tmp_path / "store.zarr")
    # files that reached the ingest stage (scan-stage rejects never get to decoding)
    reasons = {row["path"]: row["reason"] for row in quarantine(out) if row["stage"] == "ingest"}
    index = source_index(out["store"], out["source"])
    checked = 0
    for path, _, _ in list_source(pydicom_test_files):
        try:
            ds = pydicom.dcmread(pydicom_test_files / path)
        except InvalidDicomError:
            continue
        if "PixelData" not in ds or "series_key" not in index[path]:
            continue
        try:
            ds.pixel_array
            decodes = True
        except Exception:
            decodes = False
        reason = reasons.get(path, "")
        if decodes:
            assert not reason.startswith("cannot decode"), (path, reason)
        else:
            checked += 1
            assert reason.startswith("cannot decode pixel data: "), (path, reason)
            assert "\n" not in reason
    assert checked >= 2  # pydicom ships a few damaged files (truncated, bad JPEG data)
