"""Lesion marks (points with a diameter) in and out: DICOM SR TID 1500 (highdicom) and LUNA16-style CSV.

A mark is a lesion's centre in patient coordinates (LPS, mm) and its diameter in mm. At
ingest each mark is placed on its series' voxel grid (the inverse of the series' affine: exact,
no rounding) and stored with the series in the catalog; a mark outside its series raises
``MarksError`` for that mark and ingest quarantines it with the reason.

Read from an SR: every image region of a TID 1500 measurement report given in 3D (SCOORD3D:
a point, or the centre of an ellipsoid, ellipse, polyline or polygon) with the report's
``Diameter`` measurement when it has one (else the region's largest extent, else 0). Regions
in 2D pixel coordinates (SCOORD) are not read: the report is quarantined with that reason.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from storage.errors import IngestError

logger = logging.getLogger(__name__)

# SR classes that can hold a TID 1500 measurement report with image regions
SR_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
}
# LUNA16's annotations.csv columns
CSV_COLUMNS = {"key": "seriesuid", "x": "coordX", "y": "coordY", "z": "coordZ", "diameter": "diameter_mm"}


class MarksError(IngestError):
    """Marks that cannot be read or placed on their series."""


def to_voxel(point_xyz, spacing, origin, direction) -> np.ndarray:
    """Array index ``(z, y, x)`` (floats) of a patient-space point on a stored volume's grid.

    >>> to_voxel([10.0, 20.0, 30.0], [2.0, 0.5, 0.5], [0.0, 0.0, 0.0], np.eye(3)[::-1]).tolist()
    [15.0, 40.0, 20.0]
    """
    from storage.masks import series_affine

    affine = series_affine(spacing, origin, direction)
    return np.linalg.solve(affine[:3, :3], np.asarray(point_xyz, dtype=float) - affine[:3, 3])


def to_patient(index_zyx, spacing, origin, direction) -> np.ndarray:
    """Patient-space point (LPS mm) of an array index ``(z, y, x)`` of a stored volume: ``to_voxel``'s inverse."""
    from storage.masks import series_affine

    affine = series_affine(spacing, origin, direction)
    return affine[:3, :3] @ np.asarray(index_zyx, dtype=float) + affine[:3, 3]


def place_marks(marks: list[dict], *, shape, spacing, origin, direction) -> tuple[list[dict], list[str]]:
    """Marks on a stored volume's grid: ``(placed, reasons)``.

    Each placed mark has ``zyx`` (array index, floats), ``diameter_mm`` and the source's
    ``score`` if any. A mark whose centre lies outside the volume (beyond half a voxel of the
    first or last index) is not placed; its reason is returned instead.
    """
    placed, reasons = [], []
    for i, mark in enumerate(marks):
        zyx = to_voxel((mark["x"], mark["y"], mark["z"]), spacing, origin, direction)
        if not np.isfinite(zyx).all() or np.any(zyx < -0.5) or np.any(zyx > np.asarray(shape) - 0.5):
            reasons.append(f"lesion mark {i + 1} (diameter {mark.get('diameter_mm', 0):.1f} mm) lies outside its "
                           f"series: voxel index (z, y, x) {np.round(zyx, 1).tolist()} of a {list(shape)} volume")
            continue
        out = {"zyx": [float(v) for v in zyx], "diameter_mm": float(mark.get("diameter_mm") or 0.0)}
        if mark.get("score") is not None:
            out["score"] = float(mark["score"])
        placed.append(out)
    return placed, reasons


# ------------------------------------------------------------------ SR in
def _region_mark(points: np.ndarray, graphic_type: str) -> tuple[np.ndarray, float]:
    """Centre and largest extent (mm) of a 3D region's graphic data."""
    points = np.asarray(points, dtype=float).reshape(-1, 3)
    if graphic_type == "POINT":
        return points[0], 0.0
    if graphic_type in ("ELLIPSOID", "ELLIPSE"):  # pairs of axis end points: the centre is their mean
        extent = max(float(np.linalg.norm(points[i] - points[i + 1])) for i in range(0, len(points) - 1, 2))
        return points.mean(axis=0), extent
    extent = float(max(np.linalg.norm(a - b) for a in points for b in points)) if len(points) > 1 else 0.0
    return points.mean(axis=0), extent


def read_sr(path: str | Path) -> dict:
    """The lesion marks of a TID 1500 SR: ``{"series": [referenced SeriesInstanceUIDs], "frame_of_reference",
    "marks": [{"x", "y", "z", "diameter_mm", "score"?}]}``.

    Raises:
        MarksError: not a measurement report, no 3D image region, or regions in 2D pixel coordinates only.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    ds = pydicom.dcmread(path)
    series = sorted({str(s.SeriesInstanceUID) for item in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
                     for s in item.get("ReferencedSeriesSequence", [])}
                    | {str(s.SeriesInstanceUID) for item in ds.get("PertinentOtherEvidenceSequence", [])
                       for s in item.get("ReferencedSeriesSequence", [])})
    try:
        sr = hd.sr.srread(path) if hasattr(hd.sr, "srread") else hd.sr.Comprehensive3DSR.from_dataset(ds)
        groups = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    except Exception as exc:  # highdicom raises many types on reports that are not TID 1500
        raise MarksError(f"DICOM SR is not a TID 1500 measurement report: {type(exc).__name__}: {exc}") from exc
    marks, frames, two_d = [], set(), 0
    for group in groups:
        regions = group.roi if hasattr(group, "roi") and group.roi is not None else None
        regions = regions if isinstance(regions, list) else [regions] if regions is not None else []
        if not regions and hasattr(group, "roi"):
            regions = []
        for region in regions:
            if isinstance(region, hd.sr.Scoord3DContentItem):
                frames.add(str(region.ReferencedFrameOfReferenceUID))
                centre, extent = _region_mark(region.value, str(region.graphic_type.value))
            else:
                two_d += 1
                continue
            mark = {"x": float(centre[0]), "y": float(centre[1]), "z": float(centre[2]), "diameter_mm": extent}
            for m in group.get_measurements(name=codes.SCT.Diameter):
                mark["diameter_mm"] = float(m.value)
            for m in group.get_measurements(name=codes.DCM.Probability):
                mark["score"] = float(m.value)
            marks.append(mark)
    if not marks:
        why = (f"its {two_d} image region(s) are in 2D pixel coordinates (SCOORD), which are not read; "
               "give 3D coordinates (SCOORD3D) or a CSV of marks") if two_d else "no image region in 3D (SCOORD3D)"
        raise MarksError(f"DICOM SR measurement report with no usable lesion mark: {why}")
    return {"series": series, "frame_of_reference": sorted(frames), "marks": marks}


# ----------------------------------------------------------------- CSV in
def read_marks_csv(table: str | Path, *, columns: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """SeriesInstanceUID -> marks, from a CSV with one row per lesion (LUNA16's ``annotations.csv`` layout:
    ``seriesuid, coordX, coordY, coordZ, diameter_mm``, patient coordinates in mm).

    Raises:
        ValueError: a column is missing or a value is not a finite number (with its row).
    """
    cols = {**CSV_COLUMNS, **(columns or {})}
    out: dict[str, list[dict]] = {}
    with open(table, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in cols.values() if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"marks table {Path(table).name!r} has no column(s) {missing}; its columns are "
                             f"{reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                values = {k: float(row[cols[k]]) for k in ("x", "y", "z", "diameter")}
            except (TypeError, ValueError):
                raise ValueError(f"marks table {Path(table).name!r} line {line}: x, y, z and diameter must be "
                                 "numbers") from None
            if not all(np.isfinite(v) for v in values.values()) or values["diameter"] < 0:
                raise ValueError(f"marks table {Path(table).name!r} line {line}: coordinates must be finite and "
                                 "the diameter at least 0")
            out.setdefault(row[cols["key"]].strip(), []).append(
                {"x": values["x"], "y": values["y"], "z": values["z"], "diameter_mm": values["diameter"]})
    return out


# ----------------------------------------------------------------- SR out
def write_sr(source_images: list, marks: list[dict], out: str | Path, *, series_uid: str, sop_uid: str,
             algorithm: dict | None = None, description: str = "lesion marks",
             manufacturer: str = "medflow") -> Path:
    """A Comprehensive 3D SR (TID 1500) with one planar ROI group per mark: a 3D point at its centre (LPS mm),
    its diameter and, when the mark has a ``score``, the probability. ``source_images`` (pydicom datasets of
    the series) become the SR's evidence; ``algorithm`` (``name``, ``version``, optional ``parameters``) marks
    the report as a detector's output (TID 4019 algorithm identification, a device observer)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    first = source_images[0]
    frame = str(first.FrameOfReferenceUID)
    algo = hd.sr.AlgorithmIdentification(**algorithm) if algorithm else None
    if algo is not None:
        observer = hd.sr.ObserverContext(observer_type=codes.DCM.Device,
                                         observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                                             uid=series_uid, name=algorithm["name"], manufacturer_name=manufacturer))
    else:
        observer = hd.sr.ObserverContext(observer_type=codes.DCM.Person,
                                         observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                                             name="Reader^Unknown"))
    groups = []
    for i, mark in enumerate(marks, start=1):
        measurements = [hd.sr.Measurement(name=codes.SCT.Diameter, value=float(mark.get("diameter_mm") or 0.0),
                                          unit=codes.UCUM.Millimeter, algorithm_id=algo)]
        if mark.get("score") is not None:
            measurements.append(hd.sr.Measurement(name=codes.DCM.Probability, value=float(mark["score"]),
                                                  unit=codes.UCUM.NoUnits, algorithm_id=algo))
        region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                     graphic_data=np.array([[mark["x"], mark["y"], mark["z"]]], dtype=float),
                                     frame_of_reference_uid=frame)
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {i}"),
            referenced_region=region, finding_type=codes.SCT.Nodule, algorithm_id=algo,
            measurements=measurements))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None if algo else observer, observer_device_context=observer if algo else None),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=source_images, content=report, series_instance_uid=series_uid, series_number=99,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=manufacturer, series_description=description)
    out = Path(out)
    sr.save_as(out)
    return out
