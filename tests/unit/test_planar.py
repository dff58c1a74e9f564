"""Single-frame 2D images (CR/DX/MG/US/SC): one-slice volumes, MONOCHROME1, colour."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
from pydicom.uid import generate_uid
from skimage.color import rgb2gray

from storage.ingest import IngestOptions
from tests.helpers import ingest_serial, new_instance, quarantine

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def _write_cr(path, pixels, *, series_uid, photometric="MONOCHROME1"):
    ds = new_instance(CR_STORAGE)
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "P1", generate_uid(), series_uid
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.ImagerPixelSpacing = [0.15, 0.2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_monochrome1_radiographs_are_inverted_one_slice_volumes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    series = generate_uid()
    a = np.arange(12, dtype=np.uint16).reshape(3, 4) * 100
    _write_cr(src / "pa", a, series_uid=series)
    _write_cr(src / "lat", a[::-1].copy(), series_uid=series)  # two views, one series
    out = ingest_serial(src, tmp_path / "store.zarr")
    catalog = out["store"].catalog()
    assert len(catalog) == 2 and all(e["kind"] == "image" for e in catalog.values())
    volumes = {k: out["store"].read_image(k) for k in catalog}
    for key, entry in catalog.items():
        assert entry["shape"] == [1, 3, 4] and entry["spacing"] == [1.0, 0.15, 0.2]
        assert entry["spacing_source"] == "ImagerPixelSpacing"
    inverted = sorted((v[0] for v in volumes.values()), key=lambda v: v[0, 0], reverse=True)
    np.testing.assert_array_equal(inverted[0], 4095 - a)  # brightest stored value -> darkest
    np.testing.assert_array_equal(inverted[1], 4095 - a[::-1])


def test_planar_images_of_pydicom_are_ingested(pydicom_test_files, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pydicom_test_files / "JPEG2000.dcm", src / "nm.dcm")  # NM secondary capture, JPEG 2000
    out = ingest_serial(src, tmp_path / "store.zarr")
    (key, entry), = out["store"].catalog().items()
    ds = pydicom.dcmread(src / "nm.dcm")
    assert entry["kind"] == "image" and entry["spacing_source"] == "PixelSpacing"
    np.testing.assert_array_equal(out["store"].read_image(key)[0], ds.pixel_array)


def test_colour_is_quarantined_unless_the_spec_asks_for_grayscale(pydicom_test_files, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pydicom_test_files / "SC_rgb_small_odd.dcm", src / "rgb.dcm")
    kept = ingest_serial(src, tmp_path / "a.zarr")
    (row,) = quarantine(kept)
    assert "colour image (RGB); set ingest.color: grayscale" in row["reason"]

    out = ingest_serial(src, tmp_path / "b.zarr", IngestOptions(color="grayscale"))
    (key, entry), = out["store"].catalog().items()
    rgb = pydicom.dcmread(src / "rgb.dcm").pixel_array
    np.testing.assert_allclose(out["store"].read_image(key)[0], rgb2gray(rgb) * 255, rtol=1e-6)
    assert entry["dtype"] == "float32"


def test_palette_colour_is_never_stored_as_indices(pydicom_test_files, tmp_path):
    from pydicom.pixels import apply_color_lut

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(pydicom_test_files / "examples_palette.dcm", src)
    out = ingest_serial(src, tmp_path / "q.zarr")  # colour, by default: quarantined with the reason
    assert out["store"].catalog() == {}
    (row,) = quarantine(out)
    assert row["reason"] == "colour image (PALETTE COLOR); set ingest.color: grayscale to convert it"
    out = ingest_serial(src, tmp_path / "g.zarr", IngestOptions(color="grayscale"))
    (key,) = out["store"].catalog()
    stored = out["store"].read_image(key)[0]
    ds = pydicom.dcmread(src / "examples_palette.dcm")
    rgb = apply_color_lut(ds.pixel_array, ds)
    expected = rgb2gray(rgb) * np.iinfo(rgb.dtype).max
    np.testing.assert_allclose(stored, expected, rtol=1e-5, atol=1e-3)  # the palette's luminance
    assert not np.allclose(stored, ds.pixel_array)  # not the indices
