"""Real exports are stranger than generated ones: Siemens mosaics, and what is missing from them.

The mosaic is a real Siemens DWI file that nibabel ships with its tests (installed with it).
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel
import numpy as np
import pydicom

from tests.helpers import ingest_serial, quarantine, quarantine_reasons

NIBABEL_DATA = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
# The centre of the unpacked volume in DICOM patient coordinates (LPS, mm), from dcm2niix
# v1.0.20260724 on this file: `dcm2niix -z n -b n -o out in`, then the NIfTI affine applied to
# the central voxel index ((shape - 1) / 2) and its RAS turned to LPS (x and y negated).
DCM2NIIX_CENTRE_LPS = (-0.8984, -20.5594, -8.8089)


def _mosaic(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dwi.dcm"
    path.write_bytes(gzip.decompress((NIBABEL_DATA / "siemens_dwi_0.dcm.gz").read_bytes()))
    return path


def test_a_siemens_mosaic_is_unpacked_to_its_slices_where_dcm2niix_puts_them(tmp_path):
    path = _mosaic(tmp_path / "src")
    ds = pydicom.dcmread(path)
    assert "MOSAIC" in ds.ImageType and (ds.Rows, ds.Columns) == (896, 896)  # one frame of 7 x 7 tiles
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    (key, entry), = out["store"].catalog().items()
    assert entry["shape"] == [48, 128, 128]  # 48 slices, never one 896 x 896 slice
    shape, spacing = np.array(entry["shape"]), np.array(entry["spacing"])
    axes = np.array(entry["direction"]).T  # columns: the slice normal, the column and row directions
    centre = np.array(entry["origin"]) + axes @ ((shape - 1) / 2 * spacing)
    np.testing.assert_allclose(centre, DCM2NIIX_CENTRE_LPS, atol=1e-3)
    assert abs(np.array(entry["origin"]) - [float(v) for v in ds.ImagePositionPatient]).max() > 600  # not the corner
    np.testing.assert_allclose(spacing, [3.0, 1.796875, 1.796875], atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom.dicomwrappers import wrapper_from_data

        tiles = wrapper_from_data(ds).get_data()  # (rows, columns, slices)
    stored = out["store"].read_image(key)
    np.testing.assert_array_equal(stored, np.moveaxis(tiles, 2, 0))


def test_a_mosaic_whose_slices_cannot_be_placed_is_quarantined_not_stored_as_one_slice(tmp_path):
    path = _mosaic(tmp_path / "src")
    ds = pydicom.dcmread(path)
    for tag in [t for t in ds.keys() if t.group in (0x0019, 0x0029)]:  # the CSA headers and the tile count
        del ds[tag]
    ds.save_as(path)
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    assert out["store"].catalog() == {}
    (row,) = quarantine(out)
    assert row["path"] == "dwi.dcm" and row["reason"].startswith("Siemens mosaic without the CSA header and "
                                                                 "NumberOfImagesInMosaic that place its slices")


def test_a_deflated_file_is_ingested_not_taken_for_one_without_pixels(tmp_path, pydicom_test_files):
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pydicom_test_files / "image_dfl.dcm", src)
    ds = pydicom.dcmread(src / "image_dfl.dcm")
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    out = ingest_serial(src, tmp_path / "store.zarr")
    assert out["store"].quarantine() == []
    (key,) = out["store"].catalog()
    np.testing.assert_array_equal(out["store"].read_image(key)[0], ds.pixel_array)


def test_quarantine_reasons_carry_no_advice_meant_for_pydicom_users(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.dcm").write_bytes(b"not a dicom file at all" * 10)
    (row,) = quarantine(ingest_serial(src, tmp_path / "store.zarr"))
    assert row["reason"].startswith("not a DICOM file") and "force" not in row["reason"]


def _series_with_repeats(src: Path) -> list[Path]:
    import shutil

    from tests.helpers import write_ct_series

    rng = np.random.default_rng(0)
    paths = write_ct_series(src / "ct", rng.integers(0, 2000, (6, 8, 8)), positions=[(0, 0, 2.0 * k) for k in range(6)])
    shutil.copy(paths[2], src / "ct" / "again_0002.dcm")  # the same slice exported twice
    (src / "broken.dcm").write_bytes(paths[0].read_bytes()[:300])  # and a broken file
    return paths


def test_an_exact_copy_of_an_instance_is_dropped_and_its_series_ingested(tmp_path):
    _series_with_repeats(tmp_path / "src")
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    (entry,) = out["store"].catalog().values()
    assert entry["shape"] == [6, 8, 8] and entry["duplicate_files_dropped"] == 1 and entry["n_files"] == 6
    assert set(quarantine_reasons(out)) == {"broken.dcm"}


def test_a_copy_with_other_pixels_quarantines_both_files(tmp_path):
    paths = _series_with_repeats(tmp_path / "src")
    ds = pydicom.dcmread(tmp_path / "src" / "ct" / "again_0002.dcm")
    ds.PixelData = (ds.pixel_array + 1).astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "src" / "ct" / "again_0002.dcm")
    why = quarantine_reasons(ingest_serial(tmp_path / "src", tmp_path / "store.zarr"))
    conflict = "2 files hold the same SOP instance with different pixels or positions"
    assert why[f"ct/{paths[2].name}"].startswith(conflict) and why["ct/again_0002.dcm"].startswith(conflict)


def test_three_ingests_of_one_folder_give_the_same_store(tmp_path):
    _series_with_repeats(tmp_path / "src")
    root = tmp_path / "store.zarr"
    snapshots = []
    for attempt in range(3):
        out = ingest_serial(tmp_path / "src", root)
        assert len(out["results"]) == (1 if attempt == 0 else 0)  # nothing re-ingested after the first
        files = sorted([*root.glob("catalog/*.json"), root / "quarantine.json"])
        snapshots.append({f.name: f.read_bytes() for f in files})
    assert snapshots[0] == snapshots[1] == snapshots[2]
    assert len(snapshots[0]) == 2 and b"broken" not in snapshots[0]["quarantine.json"]
