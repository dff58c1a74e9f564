"""Lesion marks (points with a diameter) in and out: DICOM SR TID 1500 (highdicom) and LUNA16-style CSV.

A mark is a lesion's centre in patient coordinates (LPS, mm) and its diameter in mm. At
ingest each mark is placed on its series' voxel grid (the inverse of the series' affine: exact,
no rounding) and stored with the series in the catalog; a mark outside its series raises
``MarksError`` for that mark and ingest quarantines it with the reason.

Read from an SR: every image region of a TID 1500 measurement report, with the group's
``Diameter`` measurement when it has one (else the region's largest extent, else 0): in 3D
(SCOORD3D: a point, or the centre of an ellipsoid, ellipse, polyline or polygon) or in 2D
pixel coordinates on a referenced image (SCOORD: the same shapes). A 2D mark is kept as the
referenced instance and the pixel position (row, column of the pixel centre: DICOM's SCOORD
origin is the top left corner of the top left pixel); ingest finds that instance among the
series' slices and places the mark through the slice's own position and orientation.

Boxes on planar images (X-rays): a CSV with one row per box (``SOPInstanceUID, x0, y0, x1, y1``
in pixels, the top left corner of the top left pixel at 0, 0: DICOM's SCOORD and COCO's
convention), or an SR's 2D regions (a circle, ellipse, polyline or polygon gives its bounding
box). A stored box is ``[r0, c0, r1, c1]`` on the image's array grid, in the index convention of
the marks (pixel centres at whole numbers, so its edges sit at half-integers).
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
# a table of boxes on planar images (pixels)
BOX_COLUMNS = ("SOPInstanceUID", "x0", "y0", "x1", "y1")


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


def place_marks(marks: list[dict], *, shape, spacing, origin, direction
                ) -> tuple[list[dict], list[tuple[list | None, str]]]:
    """Marks on a stored volume's grid: ``(placed, refused)``.

    Each placed mark has ``zyx`` (array index, floats), ``diameter_mm`` and the source's
    ``score`` if any. A mark whose centre lies outside the volume (beyond half a voxel of the
    first or last index), or that carries a ``reason``, is not placed: it is in ``refused`` as
    ``(its "at": where it came from, or None; the reason)``, one entry per mark.
    """
    placed, refused = [], []
    for i, mark in enumerate(marks):
        at = mark.get("at")
        if mark.get("reason"):
            refused.append((at, f"lesion mark {i + 1}: {mark['reason']}"))
            continue
        zyx = (np.asarray(mark["zyx"], dtype=float) if "zyx" in mark
               else to_voxel((mark["x"], mark["y"], mark["z"]), spacing, origin, direction))
        if not np.isfinite(zyx).all() or np.any(zyx < -0.5) or np.any(zyx > np.asarray(shape) - 0.5):
            refused.append((at, f"lesion mark {i + 1} (diameter {mark.get('diameter_mm', 0):.1f} mm) lies outside "
                            f"its series: voxel index (z, y, x) {np.round(zyx, 1).tolist()} of a {list(shape)} volume"))
            continue
        out = {"zyx": [float(v) for v in zyx], "diameter_mm": float(mark.get("diameter_mm") or 0.0)}
        if mark.get("box") is not None:  # clipped to the image (a box may reach past its edge)
            hi = np.asarray(shape[1:], dtype=float) - 0.5
            r0, c0 = np.clip(mark["box"][:2], -0.5, hi)
            r1, c1 = np.clip(mark["box"][2:], -0.5, hi)
            out["box"] = [float(r0), float(c0), float(r1), float(c1)]
        if mark.get("score") is not None:
            out["score"] = float(mark["score"])
        placed.append(out)
    return placed, refused


def resolve_image_marks(marks: list[dict], slices: dict[str, object | None], *, planar: bool = False) -> list[dict]:
    """Marks given on an image (``file``: the file holding the referenced instance, ``row``, ``col``,
    ``points`` of the region) in patient coordinates, through that slice's ImagePositionPatient, ImageOrientationPatient
    and PixelSpacing (``slices``: file -> header; None for a multi-frame file); on a planar image (no patient
    position) directly as the index ``(0, row, col)``. A mark whose image is not among ``slices``, or is a
    frame of a multi-frame file, gets a ``reason``. Marks in patient coordinates pass unchanged."""
    out = []
    for mark in marks:
        if "sop_key" not in mark:
            out.append(mark)
            continue
        at = {"at": mark["at"]} if "at" in mark else {}
        ds = slices.get(mark.get("file"))
        if ds is None:
            why = ("its image region is on a frame of a multi-frame image, which is not read; give 3D coordinates"
                   if mark.get("file") in slices else
                   "its image region references an instance that is not in this series (or part)")
            out.append({"reason": why, "diameter_mm": mark.get("diameter_mm") or 0.0} | at)
            continue
        spacing = [float(v) for v in ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)]
        diameter = mark["diameter_mm"]
        if diameter is None:  # the region's largest extent, in mm
            _, diameter = _region_mark(np.asarray(mark["points"], dtype=float) * spacing, mark["shape"], dims=2)
        if planar or "ImagePositionPatient" not in ds:
            out.append({"zyx": [0.0, mark["row"], mark["col"]], "diameter_mm": diameter}
                       | ({"box": mark["box"]} if mark.get("box") else {}) | at)
            continue
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        point = (np.asarray(ds.ImagePositionPatient, dtype=float) + mark["col"] * spacing[1] * iop[:3]
                 + mark["row"] * spacing[0] * iop[3:])
        out.append({"x": float(point[0]), "y": float(point[1]), "z": float(point[2]), "diameter_mm": diameter} | at)
    return out


# ------------------------------------------------------------------ SR in
def _region_mark(points: np.ndarray, graphic_type: str, dims: int = 3) -> tuple[np.ndarray, float]:
    """Centre and largest extent of a region's graphic data (in its own units)."""
    points = np.asarray(points, dtype=float).reshape(-1, dims)
    if len(points) > 2 and np.array_equal(points[0], points[-1]):  # a closed polyline repeats its first vertex
        points = points[:-1]
    if graphic_type == "POINT":
        return points[0], 0.0
    if graphic_type == "CIRCLE":  # the centre, then a point on the circle
        return points[0], 2.0 * float(np.linalg.norm(points[1] - points[0]))
    if graphic_type in ("ELLIPSOID", "ELLIPSE"):  # pairs of axis end points: the centre is their mean
        extent = max(float(np.linalg.norm(points[i] - points[i + 1])) for i in range(0, len(points) - 1, 2))
        return points.mean(axis=0), extent
    extent = float(max(np.linalg.norm(a - b) for a in points for b in points)) if len(points) > 1 else 0.0
    return points.mean(axis=0), extent


def region_box(points_rc, graphic_type: str) -> list[float] | None:
    """The bounding box ``[r0, c0, r1, c1]`` of a 2D region's points (row, column): a circle's is its centre
    plus and minus its radius; an ellipse's the box of its axis end points (exact for an axis-aligned one);
    a polyline's or polygon's the box of its vertices; a point has none.

    >>> region_box([[10, 20], [10, 25]], "CIRCLE")
    [5.0, 15.0, 15.0, 25.0]
    """
    points = np.asarray(points_rc, dtype=float).reshape(-1, 2)
    if graphic_type in ("POINT", "MULTIPOINT") or len(points) < 2:
        return None
    if graphic_type == "CIRCLE":
        r = float(np.linalg.norm(points[1] - points[0]))
        return [float(points[0, 0] - r), float(points[0, 1] - r), float(points[0, 0] + r), float(points[0, 1] + r)]
    lo, hi = points.min(axis=0), points.max(axis=0)
    return [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])]


def read_sr(path: str | Path) -> dict:
    """The lesion marks of a TID 1500 SR: ``{"series": [referenced SeriesInstanceUIDs], "marks": [...]}``, each
    mark ``{"x", "y", "z", "diameter_mm", "score"?}`` (3D) or on an image (``sop_uid``, ``row``, ``col``, ...).

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
        sr = hd.sr.srread(path)
        groups = sr.content.get_planar_roi_measurement_groups() + sr.content.get_volumetric_roi_measurement_groups()
    except Exception as exc:  # highdicom raises many types on reports that are not TID 1500
        # the error's text may quote the dataset (highdicom prints it, UIDs and all): only its type is kept
        raise MarksError(f"DICOM SR is not a TID 1500 measurement report (highdicom: {type(exc).__name__})") from exc
    marks = []
    for group in groups:
        roi = getattr(group, "roi", None)
        regions = roi if isinstance(roi, list) else [roi] if roi is not None else []
        for region in regions:
            if isinstance(region, hd.sr.Scoord3DContentItem):
                centre, extent = _region_mark(region.value, str(region.graphic_type.value))
                mark = {"x": float(centre[0]), "y": float(centre[1]), "z": float(centre[2]), "diameter_mm": extent,
                        "frame_of_reference": str(region.get("ReferencedFrameOfReferenceUID", "") or "")}
            elif isinstance(region, hd.sr.ScoordContentItem):
                refs = [r for item in region.get("ContentSequence", [])
                        for r in item.get("ReferencedSOPSequence", [])]
                if len(refs) != 1:
                    raise MarksError(f"DICOM SR image region references {len(refs)} images; expected 1")
                (col, row), _ = _region_mark(region.value, str(region.graphic_type.value), dims=2)
                points = np.asarray(region.value, dtype=float).reshape(-1, 2)[:, ::-1] - 0.5  # (row, col)
                mark = {"sop_uid": str(refs[0].ReferencedSOPInstanceUID), "row": float(row) - 0.5,
                        "col": float(col) - 0.5, "points": points.tolist(), "shape": str(region.graphic_type.value),
                        "diameter_mm": None}
                box = region_box(points, mark["shape"])
                if box is not None:
                    mark["box"] = box
            else:
                continue
            for m in group.get_measurements(name=codes.SCT.Diameter):
                mark["diameter_mm"] = float(m.value)
            for m in group.get_measurements(name=codes.DCM.Probability):
                mark["score"] = float(m.value)
            marks.append(mark)
    if not marks:
        raise MarksError("DICOM SR measurement report with no lesion mark: no image region (SCOORD or SCOORD3D)")
    return {"series": series, "marks": marks}


# ----------------------------------------------------------------- CSV in
def read_marks_csv(table: str | Path, *, columns: dict[str, str] | None = None
                   ) -> tuple[dict[str, list[dict]], list[tuple[int, str]]]:
    """SeriesInstanceUID -> marks, from a CSV with one row per lesion (LUNA16's ``annotations.csv`` layout:
    ``seriesuid, coordX, coordY, coordZ, diameter_mm``, patient coordinates in mm), and the rows that cannot be
    used as ``(line, reason)``: every bad row is named, the good rows go on. Each mark's ``at`` is
    ``[None, line]``.

    Raises:
        ValueError: a column is missing (the table as a whole cannot be read).
    """
    cols = {**CSV_COLUMNS, **(columns or {})}
    out: dict[str, list[dict]] = {}
    bad: list[tuple[int, str]] = []
    with open(table, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in cols.values() if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"marks table {Path(table).name!r} has no column(s) {missing}; its columns are "
                             f"{reader.fieldnames}")
        for line, row in _rows(reader):
            try:
                values = {k: float(row[cols[k]]) for k in ("x", "y", "z", "diameter")}
            except (TypeError, ValueError):
                bad.append((line, "x, y, z and diameter must be numbers"))
                continue
            key = (row[cols["key"]] or "").strip()
            if not all(np.isfinite(v) for v in values.values()) or values["diameter"] < 0:
                bad.append((line, "coordinates must be finite and the diameter at least 0"))
            elif not key:
                bad.append((line, f"no {cols['key']}"))
            else:
                out.setdefault(key, []).append({"x": values["x"], "y": values["y"], "z": values["z"],
                                                "diameter_mm": values["diameter"], "at": [None, line]})
    return out, bad


def _rows(reader: csv.DictReader):
    """``(line number, row)`` of a CSV's data rows (the header is line 1; a quoted newline counts once)."""
    for row in reader:
        yield reader.line_num, row


def is_box_table(table: str | Path) -> bool:
    """Whether a marks CSV holds boxes on images (``BOX_COLUMNS``) rather than LUNA16-style centres."""
    with open(table, newline="", encoding="utf-8-sig", errors="replace") as fh:
        header = next(csv.reader(fh), [])
    return all(c in header for c in BOX_COLUMNS)


def read_boxes_csv(table: str | Path) -> tuple[dict[str, list[dict]], list[tuple[int, str]]]:
    """SOPInstanceUID -> box marks, from a CSV with one row per box (``SOPInstanceUID, x0, y0, x1, y1`` in
    pixels, the top left corner of the top left pixel at 0, 0; an image with no row has no lesion), and the rows
    that cannot be used as ``(line, reason)``. Each mark is an image mark (``row``, ``col`` of its centre,
    ``box`` ``[r0, c0, r1, c1]`` in the index convention of the marks, ``line`` and ``at`` ``[None, line]``).

    Raises:
        ValueError: a column is missing (the table as a whole cannot be read).
    """
    name = Path(table).name
    out: dict[str, list[dict]] = {}
    bad: list[tuple[int, str]] = []
    with open(table, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"boxes table {name!r} has no column(s) {missing}; its columns are {reader.fieldnames}")
        for line, row in _rows(reader):
            try:
                x0, y0, x1, y1 = (float(row[c]) for c in BOX_COLUMNS[1:])
            except (TypeError, ValueError):
                bad.append((line, "x0, y0, x1 and y1 must be numbers"))
                continue
            uid = (row["SOPInstanceUID"] or "").strip()
            if not all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
                bad.append((line, f"a box needs finite corners with x1 > x0 and y1 > y0 (received {x0:g}, {y0:g}, "
                            f"{x1:g}, {y1:g})"))
                continue
            if not uid:
                bad.append((line, "no SOPInstanceUID"))
                continue
            box = [y0 - 0.5, x0 - 0.5, y1 - 0.5, x1 - 0.5]
            out.setdefault(uid, []).append(
                {"row": (box[0] + box[2]) / 2, "col": (box[1] + box[3]) / 2, "box": box, "shape": "POLYGON",
                 "points": [box[:2], [box[0], box[3]], box[2:], [box[2], box[1]]], "diameter_mm": None,
                 "line": line, "at": [None, line]})
    return out, bad


# ----------------------------------------------------------------- SR out
def write_sr(source_images: list, marks: list[dict], out: str | Path, *, series_uid: str, sop_uid: str,
             algorithm: dict | None = None, description: str = "lesion marks",
             manufacturer: str = "medflow") -> Path:
    """A Comprehensive 3D SR (TID 1500) with one planar ROI group per mark: a 3D point at its centre (LPS mm)
    with its diameter, or, for a mark with ``box_px`` (``x0, y0, x1, y1`` in pixels, the image's top left
    corner at 0, 0), that box as a closed 2D polyline on the first source image; and, when the mark has a
    ``score``, the probability. ``source_images`` (pydicom datasets of the series) become the SR's evidence;
    ``algorithm`` (``name``, ``version``, optional ``parameters``) marks the report as a detector's output
    (TID 4019 algorithm identification, a device observer)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    first = source_images[0]
    frame = str(first.get("FrameOfReferenceUID", "") or "")
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
    planar = False
    for i, mark in enumerate(marks, start=1):
        measurements = []
        if "box_px" in mark:
            planar = True
            x0, y0, x1, y1 = (float(v) for v in mark["box_px"])
            region = hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float),
                source_image=hd.sr.SourceImageForRegion(str(first.SOPClassUID), str(first.SOPInstanceUID)))
        else:
            measurements.append(hd.sr.Measurement(name=codes.SCT.Diameter, value=float(mark.get("diameter_mm") or 0.0),
                                                  unit=codes.UCUM.Millimeter, algorithm_id=algo))
            region = hd.sr.ImageRegion3D(graphic_type=hd.sr.GraphicTypeValues3D.POINT,
                                         graphic_data=np.array([[mark["x"], mark["y"], mark["z"]]], dtype=float),
                                         frame_of_reference_uid=frame)
        if mark.get("score") is not None:
            measurements.append(hd.sr.Measurement(name=codes.DCM.Probability, value=float(mark["score"]),
                                                  unit=codes.UCUM.NoUnits, algorithm_id=algo))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"lesion {i}"),
            referenced_region=region, finding_type=codes.SCT.Lesion if planar else codes.SCT.Nodule,
            algorithm_id=algo, measurements=measurements or None))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_person_context=None if algo else observer, observer_device_context=observer if algo else None),
        procedure_reported=codes.LN.XRUnspecifiedBodyRegion if planar else codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=source_images, content=report, series_instance_uid=series_uid, series_number=99,
        sop_instance_uid=sop_uid, instance_number=1, manufacturer=manufacturer, series_description=description)
    out = Path(out)
    sr.save_as(out)
    return out
