"""A synthetic chest-CT cohort written as real DICOM files (``medflow synth``).

Each patient has one study with an axial CT series: body with a fat layer, two lungs,
spine, noise, and in about half the patients one nodule inside a lung. By default
(``hard=True``) the cohort has what makes nodules hard to find: vessel trees from each
hilum (bright tubes, their extent varying between patients), benign granulomas in any
patient (calcified ones brighter than any nodule, soft ones small and nodule-like), nodules
that are solid, ground-glass (low contrast), juxtapleural or on a vessel, blur along one
axis (breathing, motion) in half the patients and noise from 10 to 40 HU (dose). Intensity
summaries alone (mean, maximum, percentiles) then barely separate the classes; size and
shape do. With ``masks=True`` each nodule's voxels (centres within its radius) are also
written as a DICOM SEG object that references the series' slices. Headers are realistic (UIDs, geometry, rescale with stored values != HU, varied
slice spacing, some series stored head-first) and carry canary PHI values so that
de-identification can be tested. File names are shuffled and folder layouts mixed
(flat, per patient, per series). A few unusable files are added: a truncated image, files
that are not DICOM, and a structured report without pixels. Deterministic for a seed.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

logger = logging.getLogger(__name__)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
CANARY = "ZQXCANARY"  # every canary value contains this marker


@dataclass
class Cohort:
    """What ``synthesize`` wrote."""

    root: Path
    dicom_dir: Path
    labels_csv: Path
    n_patients: int
    n_positive: int
    n_files: int
    canaries: list[str] = field(default_factory=list)
    uids: list[str] = field(default_factory=list)
    nodules: dict[str, dict] = field(default_factory=dict)
    seg_files: list[Path] = field(default_factory=list)
    sr_files: list[Path] = field(default_factory=list)
    marks_csv: Path | None = None


def _uid(seed: int, *parts) -> str:
    return generate_uid(entropy_srcs=["medflow-synth", str(seed), *map(str, parts)])


def phantom(
    rng: np.random.Generator,
    *,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    body: dict,
    nodule: dict | None,
    noise: float,
    anatomy: dict | None = None,
) -> np.ndarray:
    """A chest-like volume in HU, float32 of shape (Z, Y, X), in LPS patient coordinates.

    ``anatomy`` (from ``_hard_anatomy``) adds what makes nodules hard to find: vessel trees,
    benign granulomas (calcified or not) and a blur (breathing or motion) before the noise.
    """
    nz, ny, nx = shape
    dz, dy, dx = spacing
    z = origin[2] + dz * np.arange(nz, dtype=np.float32)[:, None, None]
    y = origin[1] + dy * np.arange(ny, dtype=np.float32)[None, :, None]
    x = origin[0] + dx * np.arange(nx, dtype=np.float32)[None, None, :]
    a, b, yc = body["a"], body["b"], body["yc"]
    vol = np.full(shape, -1000.0, dtype=np.float32)
    r_body = (x / a) ** 2 + ((y - yc) / b) ** 2
    vol = np.where(r_body <= 1.0, -90.0, vol)  # subcutaneous fat
    vol = np.where(r_body <= 0.86**2, 40.0, vol)  # soft tissue
    zc, zh = body["lung_zc"], body["lung_zh"]
    for side in (-1, 1):
        lx, ly = side * 0.45 * a, yc - 0.08 * b
        r_lung = ((x - lx) / (0.32 * a)) ** 2 + ((y - ly) / (0.62 * b)) ** 2 + ((z - zc) / zh) ** 2
        vol = np.where(r_lung <= 1.0, -860.0, vol)
    r_spine = (x**2 + (y - (yc + 0.62 * b)) ** 2) / 17.0**2
    vol = np.where(r_spine <= 1.0, 450.0, vol)
    vol = np.where(r_spine <= 0.35, 20.0, vol)  # spinal canal
    r_aorta = ((x - 18.0) ** 2 + (y - (yc + 0.3 * b)) ** 2) / 13.0**2
    vol = np.where(r_aorta <= 1.0, 45.0, vol)
    lung = vol == -860.0
    if anatomy:
        for seg in anatomy["vessels"]:
            _draw_tube(vol, lung, (z, y, x), spacing, seg)
        for seg in anatomy.get("mimics", []):
            _draw_tube(vol, lung, (z, y, x), spacing, seg)
        for gran in anatomy["granulomas"]:
            _draw_ball(vol, (z, y, x), gran)
    if nodule:
        _draw_ball(vol, (z, y, x), nodule)
    if anatomy and anatomy["blur_mm"] > 0:
        from scipy.ndimage import gaussian_filter

        sigma = [anatomy["blur_mm"] * w / s for w, s in zip(anatomy["blur_axes"], spacing)]
        vol = gaussian_filter(vol, sigma=sigma, mode="nearest").astype(np.float32)
    vol += rng.normal(0.0, noise, size=shape).astype(np.float32)
    return vol


def _draw_ball(vol: np.ndarray, grid, ball: dict) -> None:
    """Blend a sphere (``center`` in mm, ``radius``, ``hu``) into ``vol`` with a ~1 mm partial-volume edge."""
    z, y, x = grid
    cx, cy, cz = ball["center"]
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
    frac = np.clip(ball["radius"] - d + 0.5, 0.0, 1.0)
    vol += frac * (ball["hu"] - vol)


def _draw_tube(vol: np.ndarray, lung: np.ndarray, grid, spacing, seg: dict) -> None:
    """Blend a tapering tube (a vessel segment from ``p0`` to ``p1`` in mm, radius ``r0`` to ``r1``) into the
    lung voxels of ``vol``, computed in the segment's bounding box only."""
    z, y, x = (g.reshape(-1) for g in grid)
    p0, p1 = np.asarray(seg["p0"], dtype=np.float32), np.asarray(seg["p1"], dtype=np.float32)
    pad = max(seg["r0"], seg["r1"]) + 1.5
    box = []
    for axis, coords in ((2, z), (1, y), (0, x)):
        lo, hi = min(p0[axis], p1[axis]) - pad, max(p0[axis], p1[axis]) + pad
        idx = np.nonzero((coords >= lo) & (coords <= hi))[0]
        if len(idx) == 0:
            return
        box.append(slice(idx[0], idx[-1] + 1))
    zz, yy, xx = z[box[0]][:, None, None], y[box[1]][None, :, None], x[box[2]][None, None, :]
    d = p1 - p0
    length2 = float(d @ d) or 1.0
    t = np.clip(((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1] + (zz - p0[2]) * d[2]) / length2, 0.0, 1.0)
    dist = np.sqrt((xx - p0[0] - t * d[0]) ** 2 + (yy - p0[1] - t * d[1]) ** 2 + (zz - p0[2] - t * d[2]) ** 2)
    frac = np.clip(seg["r0"] + t * (seg["r1"] - seg["r0"]) - dist + 0.5, 0.0, 1.0) * lung[tuple(box)]
    sub = vol[tuple(box)]
    sub += frac * (seg["hu"] - sub)


def _point_in_lung(rng: np.random.Generator, body: dict, side: int, shrink: float, *, surface: bool = False):
    """A point inside one lung's ellipsoid (uniform in it shrunk by ``shrink``; on that shell if ``surface``)."""
    a, b = body["a"], body["b"]
    while True:
        u = rng.uniform(-1, 1, size=3)
        if 0 < (u**2).sum() <= 1:
            break
    if surface:
        u = u / np.sqrt((u**2).sum())
    return (float(side * 0.45 * a + u[0] * 0.32 * a * shrink), float(body["yc"] - 0.08 * b + u[1] * 0.62 * b * shrink),
            float(body["lung_zc"] + u[2] * body["lung_zh"] * shrink))


def _hard_anatomy(rng: np.random.Generator, body: dict, *, mimics: bool = False) -> dict:
    """Vessel trees from each hilum (their size varies between patients), benign granulomas in any
    patient (calcified: brighter than any nodule; soft: small and nodule-like), and a blur. With
    ``mimics``, thick tubular opacities too (mucus-filled bronchi, scars): soft tissue as dense and
    as wide as a small nodule, but long; a blob detector that only smooths intensity takes them for
    nodules, one that sees shape does not."""
    a, b = body["a"], body["b"]
    vessels = []
    for side in (-1, 1):
        hilum = np.array([side * 0.22 * a, body["yc"] - 0.05 * b, body["lung_zc"]])
        for _ in range(int(rng.integers(2, 6))):
            target = np.array(_point_in_lung(rng, body, side, 0.85))
            stack = [(hilum, target - hilum, float(rng.uniform(1.2, 2.2)), 0)]
            while stack:
                start, direction, radius, depth = stack.pop()
                length = float(np.linalg.norm(direction)) or 1.0
                end = start + direction * float(rng.uniform(0.45, 0.7))
                vessels.append({"p0": tuple(start), "p1": tuple(end), "r0": radius, "r1": radius * 0.8,
                                "hu": float(rng.uniform(20, 60))})
                if depth < 2 and radius > 0.6:
                    for _ in range(2):
                        turn = rng.normal(0, 0.6, size=3)
                        new = direction / length + turn
                        new = new / np.linalg.norm(new) * length * 0.6
                        stack.append((end, new, radius * 0.7, depth + 1))
    granulomas = []
    for _ in range(int(rng.poisson(2.5))):
        side = int(rng.choice([-1, 1]))
        calcified = bool(rng.uniform() < 0.8)
        granulomas.append({"center": _point_in_lung(rng, body, side, 0.75), "calcified": calcified,
                           "radius": float(rng.uniform(2.0, 3.5) if calcified else rng.uniform(1.5, 2.5)),
                           "hu": float(rng.uniform(400, 900) if calcified else rng.uniform(10, 60))})
    blur = float(rng.uniform(0.5, 1.5)) if rng.uniform() < 0.5 else 0.0
    axes = [(1.0, 0.3, 0.3), (0.3, 1.0, 0.3)][int(rng.integers(2))]  # breathing along z, motion along y
    tubes = []
    for _ in range(int(rng.poisson(2.5)) if mimics else 0):
        start = np.array(_point_in_lung(rng, body, int(rng.choice([-1, 1])), 0.75))
        direction = rng.normal(0, 1, size=3)
        end = start + direction / np.linalg.norm(direction) * float(rng.uniform(25, 45))
        radius = float(rng.uniform(3.0, 4.5))
        tubes.append({"p0": tuple(start), "p1": tuple(end), "r0": radius, "r1": radius * 0.9,
                      "hu": float(rng.uniform(10, 60))})
    return {"vessels": vessels, "granulomas": granulomas, "blur_mm": blur, "blur_axes": axes, "mimics": tubes}


def _patient_geometry(rng: np.random.Generator, matrix: int) -> dict:
    ps = float(np.round(rng.uniform(320.0, 370.0) / matrix, 4))  # field of view 320-370 mm
    dz = float(rng.choice([2.5, 3.0, 4.0, 5.0]))
    length = float(rng.uniform(190.0, 230.0))
    nz = int(round(length / dz)) + 1
    fov = ps * matrix
    origin = (-fov / 2 + float(rng.uniform(-5, 5)), -fov / 2 + float(rng.uniform(-5, 5)), float(rng.uniform(-420, -120)))
    a, b = float(rng.uniform(135, 160)), float(rng.uniform(95, 115))
    yc = float(rng.uniform(-8, 8))
    lung_zc = origin[2] + dz * (nz - 1) * float(rng.uniform(0.45, 0.55))
    lung_zh = dz * (nz - 1) * float(rng.uniform(0.40, 0.46))
    return {"ps": ps, "dz": dz, "nz": nz, "origin": origin,
            "body": {"a": a, "b": b, "yc": yc, "lung_zc": lung_zc, "lung_zh": lung_zh}}


def nodule_mask(shape: tuple[int, int, int], spacing, origin, nodule: dict) -> np.ndarray:
    """Voxels whose centre lies within the nodule's radius (the ground truth of ``phantom``), uint8."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    z = origin[2] + dz * np.arange(nz)[:, None, None]
    y = origin[1] + dy * np.arange(ny)[None, :, None]
    x = origin[0] + dx * np.arange(nx)[None, None, :]
    cx, cy, cz = nodule["center"]
    return (((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) <= nodule["radius"] ** 2).astype(np.uint8)


def write_seg(source_paths: list[Path], mask: np.ndarray, out: Path, *, seed: int, i: int,
              label: str = "nodule") -> Path:
    """A DICOM SEG (highdicom) of ``mask`` (one frame per source slice, in the order of ``source_paths``)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in source_paths]
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(bool), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=_uid(seed, "seg-series", i), series_number=90,
        sop_instance_uid=_uid(seed, "seg", i), instance_number=1, manufacturer="MEDFLOW-SYNTH",
        manufacturer_model_name="ground truth", software_versions="medflow synth", device_serial_number="0",
    )
    seg.save_as(out)
    return out


def write_marks(source_paths: list[Path], marks: list[dict], out: Path, *, seed: int, i: int) -> Path:
    """The nodules of a series as a DICOM SR (TID 1500: a 3D point and a diameter each), as an annotator's."""
    import pydicom

    from storage.marks import write_sr

    return write_sr([pydicom.dcmread(p, stop_before_pixels=True) for p in source_paths], marks, out,
                    series_uid=_uid(seed, "sr-series", i), sop_uid=_uid(seed, "sr", i), description="nodule marks",
                    manufacturer="MEDFLOW-SYNTH")


def _hard_nodule(rng: np.random.Generator, body: dict, radius_mm: tuple[float, float], vessels: list[dict]) -> dict:
    """A nodule as screening finds them: solid, or ground-glass (low contrast); some touch the pleura
    or sit on a vessel."""
    nodule = _nodule_in_lung(rng, body, radius_mm)
    kind = rng.choice(["solid", "ground-glass", "juxtapleural", "juxtavascular"], p=[0.5, 0.15, 0.2, 0.15])
    if kind == "ground-glass":
        nodule.update(hu=float(rng.uniform(-500, -350)), radius=nodule["radius"] * 1.3)
    elif kind == "juxtapleural":
        side = 1 if nodule["center"][0] > 0 else -1
        nodule["center"] = _point_in_lung(rng, body, side, 0.97, surface=True)
    elif kind == "juxtavascular" and vessels:
        v = vessels[int(rng.integers(len(vessels)))]
        t = float(rng.uniform(0.3, 1.0))
        on = np.asarray(v["p0"]) + t * (np.asarray(v["p1"]) - np.asarray(v["p0"]))
        nodule["center"] = tuple(float(c) for c in on + rng.normal(0, 1.0, 3))
    nodule["kind"] = str(kind)
    return nodule


def _nodule_in_lung(rng: np.random.Generator, body: dict, radius_mm: tuple[float, float] = (4.0, 8.0)) -> dict:
    a, b, yc = body["a"], body["b"], body["yc"]
    radius = float(rng.uniform(*radius_mm))
    side = int(rng.choice([-1, 1]))
    # a point well inside the lung ellipsoid (uniform in a shrunken ellipsoid)
    while True:
        u = rng.uniform(-1, 1, size=3)
        if (u**2).sum() <= 1:
            break
    shrink = 0.55
    cx = side * 0.45 * a + u[0] * 0.32 * a * shrink
    cy = yc - 0.08 * b + u[1] * 0.62 * b * shrink
    cz = body["lung_zc"] + u[2] * body["lung_zh"] * shrink
    return {"center": (float(cx), float(cy), float(cz)), "radius": radius, "hu": float(rng.uniform(10, 60))}


def _base_dataset(seed: int, i: int, *, canary: bool) -> Dataset:
    ds = Dataset()
    n = f"{i:04d}"
    ds.PatientName = f"{CANARY}^PATIENT{n}" if canary else f"SYNTH^{n}"
    ds.PatientID = f"{CANARY}PID{n}"
    ds.PatientBirthDate = f"19{30 + i % 60:02d}0{1 + i % 9}1{i % 10}"
    ds.PatientSex = "F" if i % 2 else "M"
    ds.InstitutionName = f"{CANARY} General Hospital"
    ds.ReferringPhysicianName = f"{CANARY}^REFERRER{n}"
    ds.AccessionNumber = f"{CANARY}ACC{n}"
    ds.StudyID = f"S{n}"
    ds.StudyDate = f"2024{1 + i % 12:02d}{1 + i % 27:02d}"
    ds.StudyTime = "101500"
    ds.StudyDescription = f"CT CHEST {CANARY} free text"
    ds.StudyInstanceUID = _uid(seed, "study", i)
    ds.Manufacturer = ("MEDFLOW-SYNTH", "OTHER-SYNTH", "THIRD-SYNTH")[i % 3]
    ds.ManufacturerModelName = f"Phantom {1 + i % 3}"
    ds.KVP = 120
    ds.BodyPartExamined = "CHEST"
    return ds


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _write_series(
    ds: Dataset, volume_hu: np.ndarray, geo: dict, *, series_uid: str, seed: int, i: int, series_no: int,
    descending: bool, slope: float, intercept: float, paths: list[Path], description: str,
) -> None:
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_no
    ds.SeriesDescription = description
    ds.FrameOfReferenceUID = _uid(seed, "for", i)
    ds.Modality = "CT"
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    nz, ny, nx = volume_hu.shape
    ds.Rows, ds.Columns = ny, nx
    ds.PixelSpacing = [geo["ps"], geo["ps"]]
    ds.SliceThickness = geo["dz"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = -600, 1500
    stored = np.clip(np.round((volume_hu - intercept) / slope), 0, 4095).astype(np.uint16)
    for k in range(nz):
        inst = nz - k if descending else k + 1
        z = geo["origin"][2] + geo["dz"] * k
        sop = _uid(seed, "sop", i, series_no, k)
        ds.SOPInstanceUID = sop
        ds.file_meta = _file_meta(CTImageStorage, sop)
        ds.InstanceNumber = inst
        ds.ImagePositionPatient = [geo["origin"][0], geo["origin"][1], z]
        ds.SliceLocation = z
        ds.PixelData = stored[k].tobytes()
        ds.save_as(paths[k], enforce_file_format=True)


def synthesize(
    out: str | Path, *, patients: int = 80, seed: int = 0, matrix: int = 128, positive_fraction: float = 0.5,
    broken: bool = True, masks: bool = False, nodule_radius: tuple[float, float] = (4.0, 8.0), progress=None,
    hard: bool = True, marks: bool = False, mimics: bool = False,
) -> Cohort:
    """Write a synthetic cohort to ``out/dicom`` and ``out/labels.csv``.

    Args:
        out: output folder (created).
        patients: number of patients (one study each).
        seed: random seed; the same seed gives the same files.
        matrix: rows and columns of each slice.
        positive_fraction: fraction of patients with a nodule.
        broken: add unusable files (truncated, not DICOM, SR without pixels, a localizer).
        masks: also write each nodule as a DICOM SEG beside its series.
        nodule_radius: range of nodule radii in mm.
        progress: optional callable ``progress(done, total)``.
        hard: vessels, benign granulomas in any patient, ground-glass, juxtapleural and juxtavascular
            nodules, blur and a wider spread of noise (dose); False: the plain phantom (solid nodules only).
        marks: also write each nodule's centre and diameter as a DICOM SR (TID 1500, a 3D point) beside its
            series and as a row of ``out/marks.csv`` (LUNA16's layout), for detection.
        mimics: (with ``hard``) thick tubular soft-tissue opacities in any patient, which an intensity blob
            detector mistakes for nodules (the detection demo's cohort).
    """
    if patients < 2:
        raise ValueError(f"Received patients={patients}, expected at least 2.")
    out = Path(out)
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_pos = int(round(patients * positive_fraction))
    labels = np.zeros(patients, dtype=int)
    labels[rng.permutation(patients)[:n_pos]] = 1
    cohort = Cohort(out, dicom_dir, out / "labels.csv", patients, n_pos, 0)
    rows, mark_rows = [], []
    name_rng = np.random.default_rng(seed + 1)

    def fname(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        ext = name_rng.choice([".dcm", "", ".DCM", ".ima"])
        return folder / f"{int(name_rng.integers(16**12)):012x}{ext}"

    for i in range(patients):
        geo = _patient_geometry(rng, matrix)
        anatomy = _hard_anatomy(rng, geo["body"], mimics=mimics) if hard else None
        if labels[i]:
            nodule = (_hard_nodule(rng, geo["body"], nodule_radius, anatomy["vessels"]) if hard
                      else _nodule_in_lung(rng, geo["body"], nodule_radius))
        else:
            nodule = None
        noise = float(rng.uniform(10, 40) if hard else rng.uniform(12, 25))
        vol = phantom(rng, shape=(geo["nz"], matrix, matrix), spacing=(geo["dz"], geo["ps"], geo["ps"]),
                      origin=geo["origin"], body=geo["body"], nodule=nodule, noise=noise, anatomy=anatomy)
        layout = ["flat", "patient", "series"][i % 3]
        pfolder = dicom_dir / ("flat" if layout == "flat" else f"case{i:03d}")
        sfolder = pfolder / "ser1" if layout == "series" else pfolder
        ds = _base_dataset(seed, i, canary=True)
        series_uid = _uid(seed, "series", i, 1)
        slope, intercept = [(1.0, -1024.0), (1.0, -1000.0), (2.0, -1024.0)][int(rng.integers(3))]
        paths = [fname(sfolder) for _ in range(geo["nz"])]
        _write_series(ds, vol, geo, series_uid=series_uid, seed=seed, i=i, series_no=2, descending=bool(i % 4 == 1),
                      slope=slope, intercept=intercept, paths=paths, description="CHEST AXIAL")
        cohort.n_files += len(paths)
        cohort.uids += [ds.StudyInstanceUID, series_uid]
        rows.append({"StudyInstanceUID": ds.StudyInstanceUID, "nodule": int(labels[i])})
        if nodule:
            cohort.nodules[ds.StudyInstanceUID] = nodule
            if masks:
                truth = nodule_mask(vol.shape, (geo["dz"], geo["ps"], geo["ps"]), geo["origin"], nodule)
                seg_path = fname(pfolder / "seg" if layout == "series" else pfolder)
                cohort.seg_files.append(write_seg(paths, truth, seg_path, seed=seed, i=i))
                cohort.n_files += 1
            if marks:
                mark = {"x": nodule["center"][0], "y": nodule["center"][1], "z": nodule["center"][2],
                        "diameter_mm": 2.0 * nodule["radius"]}
                mark_rows.append({"seriesuid": series_uid, "coordX": mark["x"], "coordY": mark["y"],
                                  "coordZ": mark["z"], "diameter_mm": mark["diameter_mm"]})
                sr_path = fname(pfolder / "sr" if layout == "series" else pfolder)
                cohort.sr_files.append(write_marks(paths, [mark], sr_path, seed=seed, i=i))
                cohort.n_files += 1
        if broken and i % 10 == 3:
            # a 3-slice localizer in the same study: too few slices for a 3D model
            loc_geo = {**geo, "nz": 3}
            loc_paths = [fname(pfolder / "scout" if layout == "series" else pfolder) for _ in range(3)]
            _write_series(ds, vol[:3], loc_geo, series_uid=_uid(seed, "series", i, 9), seed=seed, i=i, series_no=1,
                          descending=False, slope=1.0, intercept=-1024.0, paths=loc_paths, description="LOCALIZER")
            cohort.n_files += 3
        if progress:
            progress(i + 1, patients)
    cohort.canaries = [
        f"{CANARY}^PATIENT", f"{CANARY}PID", f"{CANARY} General Hospital", f"{CANARY}^REFERRER", f"{CANARY}ACC",
        CANARY,
    ]
    if broken:
        cohort.n_files += _write_broken(dicom_dir, seed, rng, matrix)
    with cohort.labels_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["StudyInstanceUID", "nodule"])
        writer.writeheader()
        writer.writerows(rows)
    if marks:
        cohort.marks_csv = out / "marks.csv"
        with cohort.marks_csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
            writer.writeheader()
            writer.writerows(mark_rows)
    logger.info("synthesised %d patients (%d with a nodule), %d files", patients, n_pos, cohort.n_files)
    return cohort


def _write_broken(dicom_dir: Path, seed: int, rng: np.random.Generator, matrix: int) -> int:
    """A truncated image, two non-DICOM files and a structured report without pixels."""
    folder = dicom_dir / "misc"
    folder.mkdir(parents=True, exist_ok=True)
    # 1. truncated CT slice (its own series, cut in the middle of the pixel data)
    ds = _base_dataset(seed, 9999, canary=True)
    geo = {"ps": 2.6, "dz": 2.5, "origin": (-166.0, -166.0, -200.0)}
    vol = np.full((1, matrix, matrix), -1000.0, dtype=np.float32)
    path = folder / "7f3e91aa02c4"
    _write_series(ds, vol, geo, series_uid=_uid(seed, "series", 9999), seed=seed, i=9999, series_no=3,
                  descending=False, slope=1.0, intercept=-1024.0, paths=[path], description="BROKEN EXPORT")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - matrix * matrix])
    # 2. not DICOM at all
    (folder / "README.txt").write_text("Exported from PACS. Contact the department for questions.\n")
    (folder / "DICOMDIR.bak").write_bytes(rng.bytes(2048))
    # 3. a Basic Text SR: no pixel data, canary PHI in the header and the text
    sr = _base_dataset(seed, 9998, canary=True)
    sr_uid = _uid(seed, "sop", "sr")
    sr.file_meta = _file_meta(BASIC_TEXT_SR, sr_uid)
    sr.SOPClassUID = BASIC_TEXT_SR
    sr.SOPInstanceUID = sr_uid
    sr.SeriesInstanceUID = _uid(seed, "series", "sr")
    sr.Modality = "SR"
    sr.ValueType = "CONTAINER"
    sr.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.ValueType = "TEXT"
    item.TextValue = f"Findings for {CANARY}^PATIENT9998: no acute abnormality."
    sr.ContentSequence = [item]
    sr.save_as(folder / "sr_0001.dcm", enforce_file_format=True)
    return 4
