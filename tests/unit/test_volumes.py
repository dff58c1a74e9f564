"""Volume files as sources (NIfTI, NRRD, MetaImage): the same voxels at the same LPS positions as the DICOM
series they were converted from (dcm2niix, SimpleITK), the header fields that stay out of the store, and
the files that are quarantined with their reason."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from storage.images import ImageItem
from storage.masks import series_affine
from storage.store import Store
from storage.volumes import ingest_volumes, read_volume
from tests.helpers import ingest_serial, write_ct_series

SHAPE = (7, 10, 12)  # slices, rows, columns
PIXEL_SPACING = (0.8, 0.7)  # row spacing (between rows), column spacing
SLICE_GAP = 1.5
ORIGIN = np.array([-40.0, 25.0, 110.0])


def _frames() -> dict[str, np.ndarray]:
    """Row and column directions (as the columns 0 and 1 of a rotation) of three acquisitions."""
    return {
        "axial": np.eye(3),
        "sagittal": np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]),  # rows A->P, columns S->I
        "oblique": Rotation.from_euler("zx", [20, 25], degrees=True).as_matrix(),
    }


def _dicom_series(folder: Path, frame: np.ndarray) -> np.ndarray:
    row, col = frame[:, 0], frame[:, 1]
    normal = np.cross(row, col)
    stored = np.random.default_rng(7).integers(0, 3000, SHAPE).astype(np.uint16)
    positions = [ORIGIN + k * SLICE_GAP * normal for k in range(SHAPE[0])]
    write_ct_series(folder, stored, positions=positions, orientation=(*row, *col), pixel_spacing=PIXEL_SPACING,
                    slice_thickness=SLICE_GAP)
    return stored


def _only(store: Store) -> tuple[np.ndarray, dict]:
    (key, entry), = store.catalog().items()
    return store.read_image(key), entry


def _assert_same_voxels_in_space(dicom: tuple[np.ndarray, dict], other: tuple[np.ndarray, dict]) -> None:
    """``other`` holds ``dicom``'s voxels at the same LPS positions (within 1e-4 mm), its axes perhaps in
    another order or direction (dcm2niix flips the rows, as NIfTI tools expect)."""
    (a, ea), (b, eb) = dicom, other
    affine_a = series_affine(ea["spacing"], ea["origin"], ea["direction"])
    affine_b = series_affine(eb["spacing"], eb["origin"], eb["direction"])
    index_map = np.linalg.inv(affine_a) @ affine_b  # b's indices -> a's
    perm, shift = np.round(index_map[:3, :3]), np.round(index_map[:3, 3])
    assert np.all(np.abs(perm).sum(axis=0) == 1) and np.all(np.abs(perm).sum(axis=1) == 1), index_map.round(4)
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in b.shape], indexing="ij")).reshape(3, -1)
    at_b = affine_b[:3, :3] @ corners + affine_b[:3, 3:4]
    at_a = affine_a[:3, :3] @ (perm @ corners + shift[:, None]) + affine_a[:3, 3:4]
    assert np.abs(at_b - at_a).max() < 1e-4  # mm
    idx = np.indices(b.shape).reshape(3, -1)
    target = (perm @ idx + shift[:, None]).astype(int)
    assert sorted(np.abs(perm) @ np.array(b.shape)) == sorted(a.shape)
    np.testing.assert_array_equal(a[tuple(target)], b[tuple(idx)].reshape(-1).astype(a.dtype))


def _dcm2niix() -> str:
    found = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(found).exists():
        pytest.fail("dcm2niix is not installed: `pip install dcm2niix` (in the dev extras)")
    return found


@pytest.mark.parametrize("acquisition", ["axial", "sagittal", "oblique"])
def test_a_dicom_series_through_dcm2niix_nrrd_and_mha_gives_the_same_voxels_and_positions(tmp_path, acquisition):
    import SimpleITK as sitk

    dicom_dir = tmp_path / "dicom"
    _dicom_series(dicom_dir, _frames()[acquisition])
    ingest_serial(dicom_dir, tmp_path / "dicom.zarr")
    direct = _only(Store(tmp_path / "dicom.zarr"))
    assert direct[0].shape == SHAPE

    files = tmp_path / "files"
    files.mkdir()
    subprocess.run([_dcm2niix(), "-z", "y", "-b", "n", "-f", "series", "-o", str(files), str(dicom_dir)],
                   check=True, capture_output=True)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(dicom_dir)))
    itk_image = reader.Execute()
    sitk.WriteImage(itk_image, str(files / "series.nrrd"), useCompression=True)
    sitk.WriteImage(itk_image, str(files / "series.mha"))
    for name in ("series.nii.gz", "series.nrrd", "series.mha"):
        out = ingest_volumes(str(tmp_path / f"{name}.zarr"), str(files), [ImageItem(name, "a")])
        assert out["ingested"] == 1, out["quarantine"]
        _assert_same_voxels_in_space(direct, _only(Store(tmp_path / f"{name}.zarr")))


def test_nifti_scaling_is_applied_and_header_text_never_reaches_the_store(tmp_path):
    raw = np.random.default_rng(1).integers(0, 2000, (12, 10, 6)).astype(np.int16)  # (x, y, z)
    img = nib.Nifti1Image(raw, np.diag([0.7, 0.8, 2.0, 1.0]))
    img.header.set_slope_inter(2.0, -1024.0)
    img.header["descrip"] = b"DOE^JOHN 1961"
    img.header["aux_file"] = b"MRN-778899"
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"Patient John Doe, MRN 778899"))
    folder = tmp_path / "Doe_John_778899"
    folder.mkdir()
    nib.save(img, folder / "DOE_JOHN_778899.nii.gz")
    out = ingest_volumes(str(tmp_path / "s.zarr"), str(folder), [ImageItem("DOE_JOHN_778899.nii.gz", "a")])
    assert out["ingested"] == 1
    stored, entry = _only(Store(tmp_path / "s.zarr"))
    np.testing.assert_allclose(stored, np.transpose(raw * 2.0 - 1024.0, (2, 1, 0)))  # (z, y, x)
    assert entry["spacing"] == pytest.approx([2.0, 0.8, 0.7]) and entry["source_format"] == "nifti"
    for path in (tmp_path / "s.zarr").rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            for needle in (b"DOE", b"John", b"778899", str(folder).encode()):
                assert needle not in blob, (path, needle)


def test_broken_and_impossible_volume_files_are_quarantined_with_the_reason(tmp_path):
    import SimpleITK as sitk

    src = tmp_path / "src"
    src.mkdir()
    good = np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4)
    nib.save(nib.Nifti1Image(good, np.diag([0.8, 0.7, 1.5, 1.0])), src / "good.nii.gz")
    whole = (src / "good.nii.gz").read_bytes()
    (src / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    nib.save(nib.Nifti1Image(good, np.diag([0.8, 0.7, 1.5, 1.0])), src / "short.nii")
    (src / "short.nii").write_bytes((src / "short.nii").read_bytes()[:400])  # header whole, voxels cut
    nan = good.astype(np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), src / "nan.nii.gz")
    sheared = np.diag([0.8, 0.7, 1.5, 1.0])
    sheared[0, 1] = 0.4
    nib.save(nib.Nifti1Image(good, sheared), src / "sheared.nii.gz")
    zero = nib.Nifti1Image(good, None)  # no sform or qform: the spacing is pixdim, here 0
    zero.header["pixdim"][1:4] = [0.0, 0.7, 1.5]
    nib.save(zero, src / "zero.nii")
    huge = bytearray((src / "short.nii").read_bytes()[:352])
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(huge)))
    hdr.set_data_shape((4000, 4000, 4000))
    (src / "huge.nii").write_bytes(hdr.binaryblock + b"\0" * 4)
    nib.save(nib.Nifti1Image(np.stack([good, good + 1], axis=-1), np.eye(4)), src / "four_d.nii.gz")
    itk = sitk.GetImageFromArray(good.astype(np.float32))
    sitk.WriteImage(itk, str(src / "cut.nrrd"))
    (src / "cut.nrrd").write_bytes((src / "cut.nrrd").read_bytes()[:-100])
    (src / "junk.mha").write_bytes(b"not a volume" * 10)
    names = sorted(p.name for p in src.iterdir())
    out = ingest_volumes(str(tmp_path / "s.zarr"), str(src), [ImageItem(n, "a") for n in names])
    reasons = {r["path"]: r["reason"] for r in out["quarantine"]}
    assert out["ingested"] == 1 and set(reasons) == set(names) - {"good.nii.gz"}, reasons
    assert "truncated" in reasons["short.nii"] and "cannot be read whole" in reasons["cut.nrrd"]
    assert "unreadable" in reasons["truncated.nii.gz"] and "unreadable" in reasons["junk.mha"]
    assert "non-finite" in reasons["nan.nii.gz"]
    assert "right angles" in reasons["sheared.nii.gz"]
    assert "impossible voxel spacing" in reasons["zero.nii"]
    assert "more than 1,000,000,000" in reasons["huge.nii"]
    assert "ingest.time_point" in reasons["four_d.nii.gz"]
    assert not any(str(src) in r for r in reasons.values())
    # a 4D file with a time point: that volume
    taken = ingest_volumes(str(tmp_path / "t.zarr"), str(src), [ImageItem("four_d.nii.gz", "a")], time_point=1)
    assert taken["ingested"] == 1
    np.testing.assert_array_equal(_only(Store(tmp_path / "t.zarr"))[0], np.transpose(good + 1, (2, 1, 0)))
    array, geometry = read_volume(src / "good.nii.gz")
    assert array.shape == (4, 5, 6) and geometry["spacing"] == pytest.approx([1.5, 0.7, 0.8])
