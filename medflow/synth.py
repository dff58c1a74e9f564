"""A synthetic chest-CT cohort written as real DICOM files (``medflow synth``).

Each patient has one study with an axial CT series: body with a fat layer, two lungs,
spine, noise, and in about half the patients one solid nodule (a sphere of a few mm) inside
a lung. With ``masks=True`` each nodule's voxels (centres within its radius) are also
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
) -> np.ndarray:
    """A chest-like volume in HU, float32 of shape (Z, Y, X), in LPS patient coordinates."""
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
    if nodule:
        cx, cy, cz = nodule["center"]
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
        frac = np.clip(nodule["radius"] - d + 0.5, 0.0, 1.0)  # ~1 mm partial-volume edge
        vol = vol + frac * (nodule["hu"] - vol)
    vol += rng.normal(0.0, noise, size=shape).astype(np.float32)
    return vol


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
    ds.Manufacturer = "MEDFLOW-SYNTH"
    ds.ManufacturerModelName = "Phantom 1"
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
    rows = []
    name_rng = np.random.default_rng(seed + 1)

    def fname(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        ext = name_rng.choice([".dcm", "", ".DCM", ".ima"])
        return folder / f"{int(name_rng.integers(16**12)):012x}{ext}"

    for i in range(patients):
        geo = _patient_geometry(rng, matrix)
        nodule = _nodule_in_lung(rng, geo["body"], nodule_radius) if labels[i] else None
        vol = phantom(rng, shape=(geo["nz"], matrix, matrix), spacing=(geo["dz"], geo["ps"], geo["ps"]),
                      origin=geo["origin"], body=geo["body"], nodule=nodule, noise=float(rng.uniform(12, 25)))
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
