"""A synthetic chest X-ray cohort (``medflow synth --kind xray``): DX/CR DICOM files or PNG class folders.

Each image is a frontal (PA) projection of a chest phantom: thorax soft tissue, two lung
fields with diaphragm domes and sharp costophrenic angles, mediastinum and spine, heart,
posterior ribs, lung markings and a diffuse soft-tissue shadow over the lower lungs. Three
classes:

- ``normal``;
- ``pneumonia``: one to three patchy consolidations (irregular, textured opacities) anywhere
  in the lungs;
- ``effusion``: pleural fluid at the base of one lung (sometimes both), homogeneous, with a
  meniscus that rises laterally: it blunts the costophrenic angle and hides the diaphragm.

What differs between patients and acquisitions, so that no single intensity tells the
classes apart: exposure and contrast (a random attenuation scale and gamma), detector gain
and offset, noise, patient size, inspiration depth, heart size, the lower-lung soft-tissue
shadow, and positioning (shift, rotation, magnification). DICOM files are DX or CR, stored
as MONOCHROME1 or MONOCHROME2 at 12, 14 or 16 bits with ImagerPixelSpacing, in a few image
sizes, with canary PHI values; the PNG variant writes 8-bit images in one folder per class.
Deterministic for a seed.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

CLASSES = ("normal", "pneumonia", "effusion")
SIZES = ((256, 256), (240, 256), (256, 232))  # rows, columns
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


@dataclass
class XrayCohort:
    """What ``synthesize_xray`` wrote."""

    root: Path
    images_dir: Path
    labels_csv: Path
    n_images: int
    counts: dict[str, int]
    format: str
    canaries: list[str] = field(default_factory=list)
    boxes_csv: Path | None = None  # with marks=True: one row per consolidation (SOPInstanceUID, x0, y0, x1, y1)
    n_boxes: int = 0


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / (n.std() + 1e-9)


def chest_density(rng: np.random.Generator, shape: tuple[int, int], finding: str,
                  boxes: list | None = None) -> np.ndarray:
    """A projected density map of a chest in [0, ~1.2] (higher: denser), float64 of shape (H, W).

    ``finding`` is one of ``CLASSES``. Patient anatomy and positioning are drawn from ``rng``.
    Each pneumonia consolidation's box (``x0, y0, x1, y1`` in pixels, edges: the part of its core
    ellipse inside the lung) is appended to ``boxes`` when given.
    """
    h, w = shape
    # positioning: shift, rotation and magnification of the patient in the field
    scale = rng.uniform(0.88, 1.05)
    angle = np.deg2rad(rng.uniform(-5, 5))
    sx, sy = rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.04)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    u0 = (xx - (w - 1) / 2) / (w / 2)
    v0 = (yy - (h - 1) / 2) / (h / 2)
    u = (np.cos(angle) * u0 + np.sin(angle) * v0) / scale - sx  # -1 (image left) .. 1 (image right)
    v = ((-np.sin(angle) * u0 + np.cos(angle) * v0) / scale - sy + 1) / 2  # 0 (top) .. 1 (bottom)

    size = rng.uniform(0.72, 0.92)  # half-width of the thorax
    dome = rng.uniform(0.66, 0.80)  # inspiration: height of the diaphragm domes
    heart_w = rng.uniform(0.20, 0.30) * size / 0.82
    dens = np.full(shape, 0.02)
    body = (u / (size * 1.12)) ** 2 + ((v - 0.55) / 0.62) ** 2 <= 1
    dens[body] = 0.42 + 0.12 * (1 - np.abs(u[body]) / (size * 1.12))
    abdomen = body & (v > dome + 0.02)
    dens[abdomen] += 0.08

    lungs = np.zeros(shape, bool)
    lung_of = {}
    for side in (-1, 1):
        xc, hw = side * 0.46 * size, 0.31 * size
        t = (u - xc) / hw  # -1 .. 1 across the hemithorax
        lateral = t * side  # 1 at the outer wall
        top = 0.14 + 0.10 * t**2
        bottom = dome + 0.03 * np.clip(lateral, -1, 1) + 0.08 * np.clip(lateral, 0, 1) ** 2
        lung = (np.abs(t) <= 1) & (v >= top) & (v <= bottom)
        lung &= ((np.abs(t) ** 2.5) + ((v - (top + bottom) / 2) / ((bottom - top) / 2 + 1e-6)) ** 8) <= 1.15
        lungs |= lung
        lung_of[side] = (lung, xc, hw, bottom)
    markings = 0.025 * _smooth_noise(rng, shape, 2.0)
    dens[lungs] = 0.13 + markings[lungs]
    # mediastinum, spine, heart
    dens += 0.16 * np.exp(-((u / (0.10 * size)) ** 2)) * body
    dens += 0.12 * np.exp(-((u / (0.045 * size)) ** 2)) * body * (v > 0.05)
    heart = ((u - 0.07 * size) / heart_w) ** 2 + ((v - (dome - 0.10)) / 0.15) ** 2 <= 1
    dens = np.where(heart, np.maximum(dens, 0.50 + 0.05 * rng.standard_normal()), dens)
    # posterior ribs: curved bands across both lungs
    for k in range(9):
        v0k = 0.15 + 0.072 * k + rng.normal(0, 0.004)
        for side in (-1, 1):
            xc, hw = side * 0.46 * size, 0.31 * size
            t = (u - xc) / hw
            curve = v0k + 0.07 * (t * side + 1) ** 2 / 4 - 0.03
            band = np.exp(-(((v - curve) / 0.010) ** 2)) * (np.abs(t) <= 1.15) * body
            dens += 0.09 * band
    # a diffuse soft-tissue shadow over the lower lungs (breasts, pectoral muscles): in every class
    dens += rng.uniform(0.0, 0.12) * np.clip((v - 0.45) / 0.35, 0, 1) * body

    if finding == "pneumonia":
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.choice([-1, 1]))
            lung, xc, hw, _bottom = lung_of[side]
            ys, xs = np.nonzero(lung)
            if len(ys) == 0:
                continue
            i = int(rng.integers(len(ys)))
            radius = rng.uniform(0.12, 0.24)
            d2 = ((u - u[ys[i], xs[i]]) / radius) ** 2 + ((v - v[ys[i], xs[i]]) / (radius * 0.6)) ** 2
            patchy = np.clip(_smooth_noise(rng, shape, 4.0) * 0.35 + 0.8, 0, 1)
            opacity = np.exp(-d2 * 1.2) * patchy * rng.uniform(0.28, 0.45)
            dens += opacity * lung
            rows, cols = np.nonzero((d2 <= 1.0) & lung)
            if boxes is not None and len(rows) and np.ptp(rows) >= 3 and np.ptp(cols) >= 3:
                boxes.append([int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1])
    elif finding == "effusion":
        sides = [int(rng.choice([-1, 1]))] if rng.random() < 0.75 else [-1, 1]
        for side in sides:
            lung, xc, hw, bottom = lung_of[side]
            t = (u - xc) / hw
            lateral = np.clip(t * side, -1, 1)
            depth = rng.uniform(0.07, 0.20)  # fluid height at the lateral wall
            meniscus = bottom - depth * (0.35 + 0.65 * ((lateral + 1) / 2) ** 1.5)
            fluid = lung & (v >= meniscus)
            dens = np.where(fluid, np.maximum(dens, 0.46 + 0.03 * rng.standard_normal()), dens)
    return ndimage.gaussian_filter(dens, 0.8)


def radiograph(rng: np.random.Generator, density: np.ndarray, *, bits: int) -> np.ndarray:
    """Detector values (MONOCHROME2: dense is bright) of a density map, with exposure, contrast,
    gain, offset and noise drawn from ``rng``; uint16 in [0, 2**bits - 1]."""
    k = rng.uniform(1.6, 3.2)  # attenuation scale: exposure / kVp
    img = 1 - np.exp(-k * density)
    img = img / (1 - np.exp(-k * 1.1))
    img = np.clip(img, 0, 1) ** rng.uniform(0.75, 1.35)  # display contrast
    img = img + rng.normal(0, rng.uniform(0.008, 0.03), img.shape)  # quantum noise
    gain, offset = rng.uniform(0.55, 0.95), rng.uniform(0.0, 0.08)
    top = 2**bits - 1
    return np.clip((img * gain + offset) * top, 0, top).astype(np.uint16)


def _dicom(rng: np.random.Generator, pixels: np.ndarray, *, bits: int, monochrome1: bool, modality: str,
           spacing: float, i: int, seed: int, canaries: list[str]):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medflow.synth import CANARY

    def uid(*parts):
        return generate_uid(entropy_srcs=["medflow-xray", str(seed), str(i), *map(str, parts)])

    ds = Dataset()
    sop_class = DX_STORAGE if modality == "DX" else CR_STORAGE
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    name = f"{CANARY}^PATIENT{i:04d}"
    pid = f"{CANARY}-PID-{seed}-{i:04d}"
    canaries += [name, pid]
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, "19600101"
    ds.PatientSex = str(rng.choice(["F", "M"]))
    ds.InstitutionName = f"{CANARY} General Hospital"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid("study"), uid("series")
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20250301", "101500", f"{CANARY}{i:05d}", "1"
    ds.ReferringPhysicianName = ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, 1
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", "PA"
    ds.Manufacturer = "medflow synth"
    ds.KVP = float(rng.choice([110, 120, 125]))
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, 0, "US"
    stored = (2**bits - 1) - pixels if monochrome1 else pixels
    ds.PixelData = stored.astype(np.uint16).tobytes()
    return ds


def synthesize_xray(out: str | Path, *, images: int = 600, seed: int = 0, fmt: str = "dicom",
                    classes: tuple[str, ...] | list[str] = CLASSES, marks: bool = False,
                    split_folders: bool = False, progress: Callable[[int, int], None] | None = None) -> XrayCohort:
    """Write a 3-class chest X-ray cohort to ``out/images`` and ``out/labels.csv``.

    Args:
        out: output folder.
        images: number of images (split evenly between the classes).
        seed: random seed (the same seed writes the same files).
        fmt: ``dicom`` (DX/CR files, labels.csv keyed by StudyInstanceUID) or ``png`` (8-bit PNG
            files in one folder per class, the flow_from_directory layout; labels.csv keyed by path).
        classes: the classes to draw, a subset of ``CLASSES`` (e.g. normal and pneumonia for a binary task).
        marks: also write ``out/boxes.csv``, a box per pneumonia consolidation (``SOPInstanceUID, x0, y0,
            x1, y1`` in pixels; DICOM only), for detection.
        split_folders: PNG only: ``images/{train,val,test}/<class>/`` (65/15/20 % of the images, drawn
            with the seed), the layout of the Keras chest X-ray programs, for ``data.layout: folders``.
        progress: called with (done, total) after each image.
    """
    if fmt not in ("dicom", "png"):
        raise ValueError(f"Received fmt={fmt!r}, expected 'dicom' or 'png'.")
    if split_folders and fmt != "png":
        raise ValueError("Received split_folders=True with fmt='dicom': split folders hold PNG class folders.")
    if marks and fmt != "dicom":
        raise ValueError("Received marks=True with fmt='png': boxes name their image by SOPInstanceUID (DICOM only).")
    unknown = [c for c in classes if c not in CLASSES]
    if unknown or len(set(classes)) < 2:
        raise ValueError(f"Received classes={list(classes)}, expected two or more of {', '.join(CLASSES)}.")
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    findings = [classes[i % len(classes)] for i in range(images)]
    rng.shuffle(findings)
    splits = np.random.default_rng([seed, 1]).choice(["train", "val", "test"], size=images, p=[0.65, 0.15, 0.20])
    rows, canaries, box_rows = [], [], []
    for i, finding in enumerate(findings):
        size = SIZES[int(rng.integers(len(SIZES)))]
        bits = int(rng.choice([12, 14, 16]))
        boxes: list = []
        pixels = radiograph(rng, chest_density(rng, size, finding, boxes), bits=bits)
        if fmt == "png":
            from PIL import Image

            folder = images_dir / splits[i] / finding if split_folders else images_dir / finding
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"img{i:05d}.png"
            Image.fromarray((pixels >> (bits - 8)).astype(np.uint8)).save(path)
            rows.append({"path": str(path.relative_to(images_dir)), "finding": finding,
                         **({"split": str(splits[i])} if split_folders else {})})
        else:
            modality = "DX" if rng.random() < 0.6 else "CR"
            ds = _dicom(rng, pixels, bits=bits, monochrome1=bool(rng.random() < 0.4), modality=modality,
                        spacing=round(float(rng.uniform(1.3, 1.6)), 3), i=i, seed=seed, canaries=canaries)
            path = images_dir / f"{i % 7:02d}" / f"{ds.SOPInstanceUID[-12:]}.dcm"
            path.parent.mkdir(exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            rows.append({"StudyInstanceUID": ds.StudyInstanceUID, "finding": finding})
            box_rows += [{"SOPInstanceUID": ds.SOPInstanceUID, "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3]}
                         for b in boxes]
        if progress:
            progress(i + 1, images)
    labels = out / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    boxes_csv = None
    if marks:
        boxes_csv = out / "boxes.csv"
        with boxes_csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["SOPInstanceUID", "x0", "y0", "x1", "y1"])
            writer.writeheader()
            writer.writerows(box_rows)
    counts = {c: findings.count(c) for c in classes}
    logger.info("wrote %d chest X-rays (%s) to %s%s", images, counts, images_dir,
                f", {len(box_rows)} consolidation boxes to {boxes_csv.name}" if marks else "")
    return XrayCohort(out, images_dir, labels, images, counts, fmt, canaries, boxes_csv, len(box_rows))
