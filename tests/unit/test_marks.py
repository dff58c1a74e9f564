"""Lesion marks in (DICOM SR TID 1500, LUNA16-style CSV) and out (SR written by predict, read back)."""

from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from storage.ingest import IngestOptions
from storage.marks import read_marks_csv, read_sr, to_patient, to_voxel, write_sr
from tests.helpers import ingest_serial, quarantine, write_ct_series

# a series whose geometry is exact in float32 (SR coordinates are 32-bit floats)
ORIGIN = (-100.0, -50.0, 10.0)
PIXEL = (0.75, 0.5)  # rows (y), columns (x)
DZ = 2.5
KNOWN = (3, 5, 7)  # (z, y, x): the voxel the mark is put on


def _series(folder, *, descending: bool = True):
    rng = np.random.default_rng(0)
    positions = [(ORIGIN[0], ORIGIN[1], ORIGIN[2] + DZ * k) for k in range(8)]
    volume = rng.integers(0, 2000, size=(8, 16, 16)).astype(np.uint16)
    names = [f"{(7 - k if descending else k):04d}.dcm" for k in range(8)]  # file order opposite to space
    uid = generate_uid()
    paths = write_ct_series(folder, volume, positions=positions, pixel_spacing=PIXEL, names=names, series_uid=uid)
    return uid, paths


def _known_point():
    z, y, x = KNOWN
    return {"x": ORIGIN[0] + x * PIXEL[1], "y": ORIGIN[1] + y * PIXEL[0], "z": ORIGIN[2] + z * DZ}


def test_to_voxel_and_back_are_inverse():
    direction = [[0.0, 0.0, 1.0], [0.0, 0.8, 0.6], [1.0, 0.0, 0.0]]
    point = to_patient([3.25, 5.5, 7.0], [2.5, 0.75, 0.5], [-100.0, -50.0, 10.0], direction)
    assert np.allclose(to_voxel(point, [2.5, 0.75, 0.5], [-100.0, -50.0, 10.0], direction), [3.25, 5.5, 7.0])


def test_sr_point_lands_on_its_voxel_exactly_and_csv_gives_the_same(tmp_path):
    uid, paths = _series(tmp_path / "src" / "series")
    point = {**_known_point(), "diameter_mm": 6.0}
    outside = {"x": 500.0, "y": 0.0, "z": 20.0, "diameter_mm": 4.0}
    sources = [pydicom.dcmread(p) for p in paths]
    sr = write_sr(sources, [point, outside], tmp_path / "src" / "marks.dcm", series_uid=generate_uid(),
                  sop_uid=generate_uid())
    report = read_sr(sr)
    assert report["series"] == [uid]
    assert [m["diameter_mm"] for m in report["marks"]] == [6.0, 4.0]

    out = ingest_serial(tmp_path / "src", tmp_path / "sr.zarr", IngestOptions(marks="sr"))
    (entry,) = out["store"].catalog().values()
    assert entry["marks"] == [{"zyx": [float(v) for v in KNOWN], "diameter_mm": 6.0}]
    rows = [r for r in quarantine(out) if r.get("stage") == "ingest-marks"]
    assert len(rows) == 1 and "outside its series" in rows[0]["reason"] and rows[0]["path"] == "marks.dcm#2"

    table = tmp_path / "marks.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        writer.writerow([uid, point["x"], point["y"], point["z"], 6.0])
    (sr).unlink()
    out_csv = ingest_serial(tmp_path / "src", tmp_path / "csv.zarr", IngestOptions(marks="csv", marks_table=str(table)))
    (entry_csv,) = out_csv["store"].catalog().values()
    assert entry_csv["marks"] == entry["marks"]


def test_refused_marks_keep_a_row_each_and_another_frame_of_reference_is_refused(tmp_path):
    _, paths = _series(tmp_path / "src" / "series")
    sources = [pydicom.dcmread(p) for p in paths]
    outside = [{"x": 500.0 + k, "y": 0.0, "z": 20.0, "diameter_mm": 4.0} for k in range(2)]
    for name, marks in (("a.dcm", outside), ("b.dcm", outside[:1])):
        write_sr(sources, marks, tmp_path / "src" / name, series_uid=generate_uid(), sop_uid=generate_uid())
    elsewhere = [s.copy() for s in sources]  # the same point, but in another frame of reference
    for s in elsewhere:
        s.FrameOfReferenceUID = generate_uid()
    write_sr(elsewhere, [{**_known_point(), "diameter_mm": 6.0}], tmp_path / "src" / "c.dcm",
             series_uid=generate_uid(), sop_uid=generate_uid())
    out = ingest_serial(tmp_path / "src", tmp_path / "s.zarr", IngestOptions(marks="sr"))
    rows = {r["path"]: r["reason"] for r in quarantine(out) if r.get("stage") == "ingest-marks"}
    assert sorted(rows) == ["a.dcm#1", "a.dcm#2", "b.dcm#1", "c.dcm#1"]  # one row per refused mark
    assert "outside its series" in rows["a.dcm#2"] and "frame of reference" in rows["c.dcm#1"]
    (entry,) = out["store"].catalog().values()
    assert entry["marks"] == []


def test_sr_is_quarantined_with_its_reason_when_marks_are_not_read(tmp_path):
    _, paths = _series(tmp_path / "src" / "series")
    write_sr([pydicom.dcmread(p) for p in paths], [{**_known_point(), "diameter_mm": 6.0}],
             tmp_path / "src" / "marks.dcm", series_uid=generate_uid(), sop_uid=generate_uid())
    out = ingest_serial(tmp_path / "src", tmp_path / "s.zarr", IngestOptions())
    reasons = {r["path"]: r["reason"] for r in quarantine(out)}
    assert "data.marks.source: sr" in reasons["marks.dcm"]
    (entry,) = out["store"].catalog().values()
    assert "marks" not in entry


def test_marks_csv_names_a_missing_column_and_every_bad_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("seriesuid,coordX,coordY,coordZ\n1.2.3,0,0,0\n")
    with pytest.raises(ValueError, match="diameter_mm"):
        read_marks_csv(bad)
    bad.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,zero,0,5\n1.2.3,1,2,3,4\n"
                   "1.2.3,nan,0,0,5\n,1,2,3,4\n1.2.3,0,0,0,-1\n")
    marks, problems = read_marks_csv(bad)
    assert [m["at"] for m in marks["1.2.3"]] == [[None, 3]]  # the good row goes on
    assert [line for line, _ in problems] == [2, 4, 5, 6]  # every bad row named, in one read
    assert "numbers" in problems[0][1] and "finite" in problems[1][1] and "seriesuid" in problems[2][1]


def _sr_on_images(sources, regions, out):
    """A TID 1500 SR with 2D image regions (SCOORD): ``(dataset, graphic type, (column, row) points, diameter)``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    groups = []
    for i, (ds, graphic_type, points, diameter) in enumerate(regions):
        region = hd.sr.ImageRegion(graphic_type=graphic_type, graphic_data=np.asarray(points, dtype=float),
                                   source_image=hd.sr.SourceImageForRegion(ds.SOPClassUID, ds.SOPInstanceUID))
        measurements = ([hd.sr.Measurement(name=codes.SCT.Diameter, value=diameter, unit=codes.UCUM.Millimeter)]
                        if diameter else None)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {i}"),
            referenced_region=region, finding_type=codes.SCT.Nodule, measurements=measurements))
    observer = hd.sr.ObserverContext(observer_type=codes.DCM.Person,
                                     observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                                         name="Reader^A"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_person_context=observer),
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=groups)
    hd.sr.Comprehensive3DSR(evidence=sources, content=report, series_instance_uid=generate_uid(), series_number=5,
                            sop_instance_uid=generate_uid(), instance_number=1).save_as(out)


def test_sr_regions_on_an_image_land_on_that_slice_and_pixel(tmp_path):
    """SCOORD coordinates start at the top left corner of the top left pixel: (7.5, 5.5) is the centre of
    row 5, column 7. The slice is found by its instance, whatever the file order."""
    _, paths = _series(tmp_path / "src" / "series")
    sources = [pydicom.dcmread(p) for p in paths]
    third = sources[KNOWN[0]]  # paths follow the positions: index 3 is the fourth slice in space
    missing = sources[0].copy()  # an instance of the series that the export lacks
    missing.SOPInstanceUID = generate_uid()
    _sr_on_images([*sources, missing], [
        (third, "POINT", [[7.5, 5.5]], 6.0),
        (third, "POLYLINE", [[2.5, 2.5], [6.5, 2.5]], None),  # 4 pixels of 0.5 mm: 2 mm, centre (row 2, col 2.5)
        (missing, "POINT", [[1.5, 1.5]], 3.0),
        (sources[1], "CIRCLE", [[8.5, 9.5], [8.5, 13.5]], None),  # centre row 9, col 8; radius 4 rows of 0.75 mm
    ], tmp_path / "src" / "marks.dcm")
    out = ingest_serial(tmp_path / "src", tmp_path / "s.zarr", IngestOptions(marks="sr"))
    (entry,) = out["store"].catalog().values()
    point, line, circle = entry["marks"]
    assert point["zyx"] == pytest.approx([3.0, 5.0, 7.0], abs=1e-9) and point["diameter_mm"] == 6.0
    assert line["zyx"] == pytest.approx([3.0, 2.0, 4.0], abs=1e-9) and line["diameter_mm"] == pytest.approx(2.0)
    assert circle["zyx"] == pytest.approx([1.0, 9.0, 8.0], abs=1e-9) and circle["diameter_mm"] == pytest.approx(6.0)
    rows = [r for r in quarantine(out) if r.get("stage") == "ingest-marks"]
    assert len(rows) == 1 and "not in this series" in rows[0]["reason"]


def test_a_real_sr_that_is_not_a_measurement_report_is_quarantined_with_the_reason(tmp_path):
    import shutil

    from pydicom.data import get_testdata_file

    _series(tmp_path / "src" / "series")
    shutil.copy(get_testdata_file("test-SR.dcm"), tmp_path / "src" / "report.dcm")  # a Comprehensive SR, not TID 1500
    out = ingest_serial(tmp_path / "src", tmp_path / "s.zarr", IngestOptions(marks="sr"))
    reason = {r["path"]: r["reason"] for r in quarantine(out)}["report.dcm"]
    assert "not a TID 1500 measurement report" in reason
    # one short line, without the dataset's dump or any of its UIDs
    import pydicom

    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    assert len(reason) < 120 and "\n" not in reason
    assert not any(str(uid) in reason for uid in (sr.SOPInstanceUID, sr.StudyInstanceUID, sr.SeriesInstanceUID))
    (entry,) = out["store"].catalog().values()
    assert entry["marks"] == []  # the series is in, without lesions
