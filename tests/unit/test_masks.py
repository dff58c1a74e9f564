"""Masks onto their series: DICOM SEG and NIfTI land on the right voxels; labels are never invented."""

from __future__ import annotations

import csv

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from storage.ingest import IngestOptions
from storage.masks import map_onto, series_affine
from tests.helpers import ingest_serial, quarantine, write_ct_series

SHAPE = (12, 20, 24)  # z, y, x
SPACING = (2.5, 0.8, 0.7)  # slice gap, row spacing (PixelSpacing[0]), column spacing


def _cube() -> np.ndarray:
    """A box of known voxels in spatial (ascending z) order, off-centre on purpose."""
    cube = np.zeros(SHAPE, dtype=np.uint8)
    cube[3:7, 5:11, 14:20] = 1
    return cube


def _series(folder):
    """A CT series stored head-first (descending z) with shuffled file names; returns (paths in file order, z)."""
    rng = np.random.default_rng(0)
    z = 100.0 - SPACING[0] * np.arange(SHAPE[0])  # file k lies at z[k]: descending
    stored = rng.integers(900, 1100, size=SHAPE).astype(np.uint16)
    names = [f"{int(v):08x}.dcm" for v in rng.permutation(10**6)[: SHAPE[0]]]
    paths = write_ct_series(folder, stored, positions=[(-10.0, -20.0, zk) for zk in z], pixel_spacing=SPACING[1:],
                            slice_thickness=SPACING[0], names=names)
    return paths, z


def _write_seg(paths, z, cube, out):
    # frame k of the SEG goes with source file k (at z[k]); the cube is indexed by ascending z
    ascending = np.argsort(z)
    frames = np.empty_like(cube)
    frames[ascending] = cube
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(p) for p in paths], pixel_array=frames.astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[description],
        series_instance_uid=hd.UID(), series_number=5, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(out)


def test_seg_mask_lands_on_the_right_voxels(tmp_path):
    paths, z = _series(tmp_path / "src" / "ct")
    _write_seg(paths, z, _cube(), tmp_path / "src" / "seg.dcm")
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr", IngestOptions(masks="seg"))
    store = out["store"]
    (key,) = store.catalog()
    entry = store.catalog_entry(key)
    assert entry["mask"]["labels"] == [1] and entry["mask"]["source"] == "seg"
    mask = store.read_mask(key)
    assert mask.shape == SHAPE
    np.testing.assert_array_equal(mask, _cube())  # the stored volume runs along ascending z
    assert entry["mask"]["foreground_voxels"] == int(_cube().sum())
    assert not store.quarantine()


def _nifti_table(tmp_path, uid: str, array_xyz: np.ndarray, affine_lps: np.ndarray) -> dict:
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    nib.save(nib.Nifti1Image(array_xyz, affine_ras), tmp_path / "mask.nii.gz")
    table = tmp_path / "masks.csv"
    with table.open("w", newline="") as fh:
        csv.writer(fh).writerows([["SeriesInstanceUID", "mask"], [uid, "mask.nii.gz"]])
    return {"table": str(table), "key": "SeriesInstanceUID", "key_column": "SeriesInstanceUID", "path_column": "mask"}


def test_nifti_mask_lands_on_the_right_voxels(tmp_path):
    paths, z = _series(tmp_path / "src")
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    # NIfTI convention: array axes (i, j, k) = (x, y, z); its affine maps them to patient space
    cube = _cube()
    affine = np.eye(4)
    affine[:3, :3] = np.diag([SPACING[2], SPACING[1], SPACING[0]])
    affine[:3, 3] = (-10.0, -20.0, z.min())
    nifti = _nifti_table(tmp_path, uid, np.ascontiguousarray(cube.transpose(2, 1, 0)), affine)
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr", IngestOptions(masks="nifti"), nifti=nifti)
    store = out["store"]
    (key,) = store.catalog()
    np.testing.assert_array_equal(store.read_mask(key), cube)
    assert store.catalog_entry(key)["mask"]["source"] == "nifti"


def test_a_mask_outside_its_series_is_quarantined_and_the_series_kept(tmp_path):
    paths, z = _series(tmp_path / "src")
    uid = str(pydicom.dcmread(paths[0]).SeriesInstanceUID)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([SPACING[2], SPACING[1], SPACING[0]])
    affine[:3, 3] = (-10.0, -20.0, z.min() + 500.0)  # half a metre away
    nifti = _nifti_table(tmp_path, uid, np.ascontiguousarray(_cube().transpose(2, 1, 0)), affine)
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr", IngestOptions(masks="nifti"), nifti=nifti)
    store = out["store"]
    (key,) = store.catalog()
    assert "mask" not in store.catalog_entry(key) and store.read_mask(key) is None
    (row,) = store.quarantine()  # the mask is the user's own file: known by the key of its name only
    assert row["file"] == store.path_key("nifti:mask.nii.gz") and "does not fit its series" in row["reason"]


def test_seg_files_are_quarantined_when_masks_are_not_asked_for(tmp_path):
    paths, z = _series(tmp_path / "src" / "ct")
    _write_seg(paths, z, _cube(), tmp_path / "src" / "seg.dcm")
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr", IngestOptions())
    store = out["store"]
    assert len(store.catalog()) == 1  # the CT only: a SEG is not an image series
    (row,) = quarantine(out)
    assert row["path"] == "seg.dcm" and "DICOM SEG" in row["reason"]


@pytest.mark.parametrize("seed", range(5))
def test_mask_resampling_never_invents_labels(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([0, 3, 7], dtype=np.uint8), size=(9, 11, 13), p=[0.6, 0.3, 0.1])
    angle = rng.uniform(-0.4, 0.4)  # another grid: rotated, scaled and shifted
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    mask_affine = series_affine(rng.uniform(0.8, 1.5, 3), rng.uniform(-1, 1, 3), rot)
    target = series_affine(rng.uniform(0.3, 0.7, 3), rng.uniform(-1, 1, 3), np.eye(3))
    out = map_onto(labels, mask_affine, (30, 30, 30), target)
    assert set(np.unique(out)) <= {0, 3, 7}
    assert (out > 0).any()


def test_a_seg_whose_series_is_missing_is_quarantined(tmp_path):
    paths, z = _series(tmp_path / "ct")
    (tmp_path / "src").mkdir()
    _write_seg(paths, z, _cube(), tmp_path / "src" / "seg.dcm")  # the SEG alone in the source
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr", IngestOptions(masks="seg"))
    assert not out["store"].catalog()
    (row,) = quarantine(out)
    assert row["path"] == "seg.dcm" and "references a series that is not in the source" in row["reason"]


def test_predict_cli_refuses_a_bad_model_or_input(tmp_path):
    from typer.testing import CliRunner

    from medflow.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["predict", "--model", str(tmp_path), "--input", str(tmp_path), "--output", "o"])
    assert result.exit_code == 2 and "not a finished medflow run" in " ".join(result.output.split())
    (tmp_path / "model.keras").write_text("")
    result = runner.invoke(app, ["predict", "--model", str(tmp_path), "--input", str(tmp_path / "nope"),
                                 "--output", "o"])
    assert result.exit_code == 2 and "neither a folder of DICOM files or images nor a spec file" in " ".join(
        result.output.split())
