"""Slice sorting, spacing and rescale: pure functions and real files written for the test."""

from __future__ import annotations

import numpy as np
import pytest

from storage.dicom import slice_normal, to_physical
from storage.ingest import IngestOptions
from tests.helpers import ingest_serial, quarantine, write_ct_series

AXIAL = (1, 0, 0, 0, 1, 0)


def _ramp(n, size=4):
    return np.stack([np.full((size, size), 1024 + 10 * k, dtype=np.uint16) for k in range(n)])  # HU = 10 * k


def test_slice_normal_is_row_cross_column():
    np.testing.assert_allclose(slice_normal(AXIAL), [0, 0, 1])
    np.testing.assert_allclose(slice_normal((0, 1, 0, 0, 0, -1)), [-1, 0, 0])  # sagittal


def test_sagittal_series_sorts_along_its_normal_not_z(tmp_path):
    xs = [30.0, 10.0, 20.0]  # file k holds HU 10 * k
    write_ct_series(tmp_path / "src", _ramp(3), positions=[(x, 0, 0) for x in xs], orientation=(0, 1, 0, 0, 0, -1),
                    pixel_spacing=(1.0, 1.0))
    out = ingest_serial(tmp_path / "src", tmp_path / "s.zarr")
    (key, entry), = out["store"].catalog().items()
    np.testing.assert_array_equal(out["store"].read_image(key)[:, 0, 0], [0, 20, 10])  # x = 30, 20, 10
    assert entry["spacing"][0] == pytest.approx(10.0) and entry["origin"][0] == 30.0
    assert entry["direction"][0] == [-1.0, 0.0, 0.0]


def test_spacing_is_measured_between_positions_not_taken_from_thickness(tmp_path):
    write_ct_series(tmp_path / "src", _ramp(6), positions=[(0, 0, 1.25 * k) for k in range(6)], slice_thickness=5.0)
    (entry,) = ingest_serial(tmp_path / "src", tmp_path / "s.zarr")["store"].catalog().values()
    assert entry["spacing"][0] == pytest.approx(1.25)


def test_single_slice_uses_thickness(tmp_path):
    write_ct_series(tmp_path / "src", _ramp(1), positions=[(0, 0, 0)], slice_thickness=3.0)
    (entry,) = ingest_serial(tmp_path / "src", tmp_path / "s.zarr")["store"].catalog().values()
    assert entry["spacing"][0] == 3.0 and entry["shape"][0] == 1


@pytest.mark.parametrize("slope, intercept", [(1.0, -1024.0), (2.0, -1000.0), (0.5, 0.0)])
def test_rescale_to_hu(tmp_path, slope, intercept):
    stored = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4) * 10
    paths = write_ct_series(tmp_path, stored, positions=[(0, 0, 0), (0, 0, 1)], slope=slope, intercept=intercept)
    import pydicom

    hu = to_physical(pydicom.dcmread(paths[1]))
    np.testing.assert_allclose(hu, stored[1] * slope + intercept)


@pytest.mark.parametrize("order", ["shuffled", "reversed"])
def test_ingest_restores_spatial_order(tmp_path, order):
    rng = np.random.default_rng(0)
    n = 9
    z = -50.0 + 2.5 * np.arange(n)
    stored = np.stack([np.full((8, 8), 1024 + 10 * k, dtype=np.uint16) for k in range(n)])  # HU = 10 * k
    perm = rng.permutation(n) if order == "shuffled" else np.arange(n)[::-1]
    # files written in a scrambled order, with InstanceNumbers that disagree with position
    write_ct_series(tmp_path / "src", stored[perm], positions=[(0, 0, z[i]) for i in perm],
                    names=[f"{rng.integers(1 << 40):x}" for _ in range(n)], instance_numbers=list(range(1, n + 1)),
                    slice_thickness=5.0)
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr", IngestOptions(min_slices=3))
    store = out["store"]
    (key, entry), = store.catalog().items()
    vol = store.read_image(key)
    assert vol.dtype == np.int16
    np.testing.assert_array_equal(vol[:, 0, 0], 10 * np.arange(n))
    assert entry["spacing"] == [2.5, 0.8, 0.7]
    assert entry["origin"][2] == pytest.approx(-50.0)


@pytest.mark.parametrize("pixel_spacing, fragment", [
    ((0.0, 0.0), "impossible PixelSpacing [0.0, 0.0]"),
    ((-0.7, 0.7), "impossible PixelSpacing [-0.7, 0.7]"),
    ((float("nan"), 0.7), "impossible PixelSpacing [nan, 0.7]"),
    ((1e5, 0.7), "impossible PixelSpacing [100000.0, 0.7]"),
])
def test_impossible_pixel_spacing_is_quarantined_with_the_values(tmp_path, pixel_spacing, fragment):
    vol = np.zeros((3, 4, 4), np.uint16)
    write_ct_series(tmp_path / "src", vol, positions=[(0, 0, z) for z in (0, 1, 2)], pixel_spacing=pixel_spacing)
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    assert out["store"].catalog() == {}
    reasons = {row["reason"] for row in out["store"].quarantine()}
    assert len(reasons) == 1 and fragment in reasons.pop()


@pytest.mark.parametrize("orientation", [(1, 0, 0, 1, 0, 0.001), (1, 0, 0, 0.5, 0.5, 0), (2, 0, 0, 0, 1, 0)])
def test_orientations_that_are_not_unit_and_orthogonal_are_quarantined(tmp_path, orientation):
    vol = np.zeros((3, 4, 4), np.uint16)
    write_ct_series(tmp_path / "src", vol, positions=[(0, 0, z) for z in (0, 1, 2)], orientation=orientation)
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    assert out["store"].catalog() == {}
    assert all("impossible ImageOrientationPatient" in row["reason"] for row in out["store"].quarantine())


def test_a_single_slice_takes_spacing_between_slices_before_thickness(tmp_path):
    import pydicom

    paths = write_ct_series(tmp_path / "src", np.zeros((1, 4, 4), np.uint16), positions=[(0, 0, 0)],
                            slice_thickness=5.0)
    ds = pydicom.dcmread(paths[0])
    ds.SpacingBetweenSlices = 2.5
    ds.save_as(paths[0])
    out = ingest_serial(tmp_path / "src", tmp_path / "store.zarr")
    (entry,) = out["store"].catalog().values()
    assert entry["spacing"][0] == 2.5


def test_planar_images_with_impossible_spacing_quarantine_or_take_the_fallback(tmp_path):
    from tests.fuzz import DX_STORAGE
    from tests.helpers import new_instance

    src = tmp_path / "src"
    src.mkdir()
    ds = new_instance(DX_STORAGE)
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = "P", "1.2.3", "1.2.3.4", "DX"
    ds.Rows, ds.Columns, ds.ImagerPixelSpacing = 4, 4, ["0", "0"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    ds.save_as(src / "dx.dcm", enforce_file_format=True)
    out = ingest_serial(src, tmp_path / "a.zarr")
    assert out["store"].catalog() == {}
    (row,) = quarantine(out)
    assert "impossible ImagerPixelSpacing [0.0, 0.0]" in row["reason"] and "ingest.fallback_spacing" in row["reason"]
    out = ingest_serial(src, tmp_path / "b.zarr", IngestOptions(fallback_spacing=0.2))
    (entry,) = out["store"].catalog().values()
    assert entry["spacing"] == [1.0, 0.2, 0.2]
    assert entry["spacing_source"] == "ingest.fallback_spacing (impossible ImagerPixelSpacing ['0', '0'])"
