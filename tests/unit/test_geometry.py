"""Slice sorting, spacing and rescale: pure functions and real files written for the test."""

from __future__ import annotations

import numpy as np
import pytest

from storage.dicom import series_geometry, slice_normal, to_physical
from storage.errors import InvalidSeriesError
from storage.ingest import IngestOptions
from tests.helpers import ingest_serial, write_ct_series

AXIAL = (1, 0, 0, 0, 1, 0)


def test_sorts_shuffled_slices_by_position_along_normal():
    z = np.array([10.0, 2.5, 7.5, 0.0, 5.0])
    pos = [(-100, -120, v) for v in z]
    geo = series_geometry(pos, [AXIAL] * 5, (0.7, 0.8))
    assert [z[i] for i in geo.order] == sorted(z)
    assert geo.spacing == (2.5, 0.7, 0.8)
    assert geo.origin == (-100.0, -120.0, 0.0)


def test_sagittal_series_sorts_along_x_not_z():
    # rows along +y, columns along -z: the slice normal is -x
    iop = (0, 1, 0, 0, 0, -1)
    np.testing.assert_allclose(slice_normal(iop), [-1, 0, 0])
    xs = [30.0, 10.0, 20.0]
    geo = series_geometry([(x, 0, 0) for x in xs], [iop] * 3, (1.0, 1.0))
    assert [xs[i] for i in geo.order] == [30.0, 20.0, 10.0]  # ascending along the normal (-x)
    assert geo.spacing[0] == pytest.approx(10.0)


def test_spacing_is_measured_between_positions_not_taken_from_thickness():
    geo = series_geometry([(0, 0, 1.25 * k) for k in range(6)], [AXIAL] * 6, (1, 1), slice_thickness=5.0)
    assert geo.spacing[0] == pytest.approx(1.25)


def test_single_slice_uses_thickness():
    assert series_geometry([(0, 0, 0)], [AXIAL], (1, 1), slice_thickness=3.0).spacing[0] == 3.0


@pytest.mark.parametrize(
    "positions, message",
    [
        ([(0, 0, 0), (0, 0, 0), (0, 0, 2)], "duplicate"),
        ([(0, 0, 0), (0, 0, 2), (0, 0, 6), (0, 0, 8)], "non-uniform"),
    ],
)
def test_bad_stacks_are_invalid(positions, message):
    with pytest.raises(InvalidSeriesError, match=message):
        series_geometry(positions, [AXIAL] * len(positions), (1, 1))


def test_mixed_orientation_is_invalid():
    with pytest.raises(InvalidSeriesError, match="mixed ImageOrientationPatient"):
        series_geometry([(0, 0, 0), (0, 0, 1)], [AXIAL, (1, 0, 0, 0, 0, -1)], (1, 1))


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
