"""Ingest: scan a DICOM folder, group files into series, write each series to the store.

Plain functions; the Prefect tasks in ``tasks/ingest.py`` run them on Dask. Workers write
their series to the store themselves and return a small summary (never a volume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from storage.deid import IDENTIFYING_ATTRIBUTES, SAFE_ATTRIBUTES, Pseudonymizer, demographics
from storage.dicom import (
    cast_volume,
    check_orientation,
    check_spacing,
    check_image,
    exact_integer_rescale,
    is_mosaic,
    list_source,
    planar_geometry,
    read_header,
    read_raw,
    read_slice,
    rescale_frame,
    scan_file,
    split_frames,
    split_mosaic,
    to_physical,
    volume_dtype,
)
from storage.errors import IngestError, InvalidSeriesError, belongs_to_run, reason_for
from storage.marks import is_box_table, place_marks, read_boxes_csv, read_marks_csv, resolve_image_marks
from storage.masks import MaskError, load_mask
from storage.qc import StackQC, deshear, group_mixed, measure, positions_along, resample_along_normal, split_duplicates
from storage.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOptions:
    deidentify: bool = True
    modalities: tuple[str, ...] | None = None
    min_slices: int = 1
    spacing_tolerance: float = 0.1
    color: str = "quarantine"
    qc_mixed: str = "quarantine"
    qc_duplicates: str = "quarantine"
    qc_spacing: str = "quarantine"
    qc_tilt: str = "quarantine"
    tilt_tolerance_deg: float = 0.5
    masks: str | None = None  # "seg" or "nifti": map masks onto their series
    fallback_spacing: float | None = None  # mm, for planar images whose spacing is impossible
    marks: str | None = None  # "sr" or "csv": lesion marks placed on their series
    marks_table: str | None = None  # the CSV of marks (its rows enter each series' digest, not its path)

    def digest(self) -> str:
        # only what changes the stored result (the modality filter acts before reading)
        fields = {k: v for k, v in self.__dict__.items() if k not in ("modalities", "marks_table")}
        for later in ("fallback_spacing", "marks"):  # added later: unset, the digests of existing stores stay valid
            if fields[later] is None:
                del fields[later]
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class SeriesPlan:
    """One series to ingest: its key, files (relative paths) and source digest."""

    series_key: str
    files: list[str]
    digest: str
    modality: str
    kind: str = "volume"  # or "image": one planar file (no patient position), stored as one slice
    memory: int = 0  # estimated peak bytes while ingesting it
    masks: list[str] = field(default_factory=list)  # SEG files (relative to the source) or NIfTI files (absolute)
    mask_kind: str | None = None  # "seg" or "nifti"
    raw: dict[str, dict] | None = None  # per file: where its pixels are (``raw_pixel_header``), for a direct read
    # files that hold the same SOP instance (exported twice, or in two transfer syntaxes); each group's
    # first file is kept if the others have the same pixels, all are quarantined if not
    repeats: list[list[str]] = field(default_factory=list)
    # lesion marks in patient mm (``storage.marks``; None: the run reads no marks) and where they came from
    marks: list[dict] | None = None
    marks_from: list[str] = field(default_factory=list)


# Peak bytes per decoded pixel while a series is ingested: the decoded frames (up to float64
# for rescaled non-CT data), the output volume, and compression buffers.
BYTES_PER_PIXEL = 16


def estimate_memory(index: dict[str, dict], files: list[str]) -> int:
    """Estimated peak memory (bytes) to ingest ``files``, from their headers.

    >>> estimate_memory({"a": {"pixels": 512 * 512}, "b": {"pixels": 512 * 512}}, ["a", "b"])
    8388608
    """
    return BYTES_PER_PIXEL * sum(int(index[f].get("pixels", 0)) for f in files)


@dataclass
class ScanResult:
    """What a scan found: series to ingest, unchanged series, and quarantine rows."""

    todo: list[SeriesPlan] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    n_files: int = 0
    n_scanned: int = 0


def scan_files(source: str, files: list[tuple[str, int, int]], secret: bytes) -> dict[str, dict]:
    """Scan headers of ``files`` (``(relpath, size, mtime_ns)``); the Dask worker entry point."""
    pseudo = Pseudonymizer(secret)
    out = {}
    for relpath, size, mtime in files:
        rec = scan_file(source, relpath, pseudo)
        out[relpath] = {"size": size, "mtime_ns": mtime, **rec}
    return out


def stale_files(listing: list[tuple[str, int, int]], index: dict[str, dict]) -> list[tuple[str, int, int]]:
    """Files that are new or changed (size or mtime) since the cached scan, or whose read failed on I/O."""
    return [
        (p, s, m)
        for p, s, m in listing
        if p not in index or index[p].get("size") != s or index[p].get("mtime_ns") != m or index[p].get("retry")
    ]


def plan_series(
    index: dict[str, dict],
    *,
    pseudo: Pseudonymizer,
    catalog: dict[str, dict],
    previous_quarantine: list[dict],
    options: IngestOptions,
    nifti_masks: dict[str, tuple[str, int, int]] | None = None,
    csv_marks: dict[str, list[dict]] | None = None,
    csv_image_marks: dict[str, list[dict]] | None = None,
    marks_table_problems: list[tuple[int, str]] | None = None,
) -> ScanResult:
    """Group scanned files into series and decide what to ingest.

    A series whose digest (its SOP instances and file sizes, its masks, and the ingest options)
    matches the catalog, or a quarantine row from an earlier run, is unchanged and skipped.
    DICOM SEG files are attached to the series they reference (``options.masks == "seg"``);
    ``nifti_masks`` maps series keys to ``(path, size, mtime_ns)`` of their NIfTI masks.
    Lesion marks come from DICOM SR files that reference the series (``options.marks == "sr"``)
    or from ``csv_marks`` (series key -> marks, ``options.marks == "csv"``), or, for planar images,
    ``csv_image_marks`` (SOP instance key -> boxes); a box whose image is not a planar image of
    the source is quarantined with its table line.
    """
    result = ScanResult(n_files=len(index))
    result.quarantine.extend({"file": f"{MARKS_TABLE}#{line}", "stage": "scan", "reason": f"marks table line {line}: "
                              f"{reason}"} for line, reason in marks_table_problems or [])
    groups: dict[str, list[str]] = defaultdict(list)
    segs: dict[str, list[str]] = defaultdict(list)
    srs: dict[str, list[str]] = defaultdict(list)
    for relpath, rec in sorted(index.items()):
        if "reason" in rec:
            result.quarantine.append({"path": relpath, "reason": rec["reason"], "stage": "scan"})
        elif "marks_for" in rec:
            if options.marks == "sr":
                srs[rec["marks_for"]].append(relpath)
            else:
                result.quarantine.append({"path": relpath, "stage": "scan", "reason": "DICOM SR with lesion marks "
                                          "(not an image); set data.marks.source: sr to use them"})
        elif "mask_for" in rec:
            if options.masks == "seg":
                segs[rec["mask_for"]].append(relpath)
            else:
                result.quarantine.append({"path": relpath, "stage": "scan", "reason": "DICOM SEG (a segmentation, "
                                          "not an image); set data.masks.source: seg to use it as a mask"})
        else:
            groups[rec["series_key"]].append(relpath)
    for ref, files in sorted(segs.items()):
        if ref not in groups:
            result.quarantine.extend({"path": f, "stage": "scan", "reason": "DICOM SEG references a series that "
                                      "is not in the source"} for f in files)
    for ref, files in sorted(srs.items()):
        if ref not in groups:
            result.quarantine.extend({"path": f, "stage": "scan", "reason": "DICOM SR references a series that "
                                      "is not in the source"} for f in files)
    nifti_masks = nifti_masks or {}
    quarantined_digests = {
        (row["series_key"], row.get("digest")) for row in previous_quarantine if row.get("series_key")
    }
    # a series split into parts is known by its parts' parent key
    stored_digests = {entry.get("parent", k): entry.get("digest") for k, entry in catalog.items()}
    opt = options.digest()
    instances: dict[str, list[str]] = defaultdict(list)  # planar images and waveforms: one plan per SOP instance
    boxed: set[str] = set()  # the instances of csv_image_marks that were found
    for key, files in sorted(groups.items()):
        first = index[files[0]]
        modality = first["modality"]
        if options.modalities and modality not in options.modalities:
            reason = f"modality {modality} not in ingest.modalities ({', '.join(options.modalities)})"
            result.quarantine.extend(
                {"path": f, "reason": reason, "stage": "scan", "series_key": key} for f in files
            )
            continue
        for f in files:  # each planar image (and waveform) is its own volume, keyed by its instance
            if index[f].get("planar"):
                instances["i" + index[f]["sop_key"][:15]].append(f)  # files are sorted: so are the copies
            elif index[f].get("waveform"):
                instances["w" + index[f]["sop_key"][:15]].append(f)
        files = [f for f in files if not index[f].get("planar") and not index[f].get("waveform")]
        if not files:
            continue
        masks, mask_kind, mask_parts = [], None, []
        if options.masks == "seg" and segs.get(key):
            masks, mask_kind = segs[key], "seg"
            mask_parts = sorted(f"seg:{index[f]['sop_key']}:{index[f]['size']}" for f in masks)
        elif options.masks == "nifti" and key in nifti_masks:
            path, size, mtime = nifti_masks[key]
            masks, mask_kind = [path], "nifti"
            mask_parts = [f"nifti:{pseudo.key(path, kind='path')}:{size}:{mtime}"]
        marks, marks_from = None, []
        if options.marks == "sr":
            marks_from = srs.get(key, [])
            marks = _image_marks_to_files(_sr_marks(index, marks_from), index, files)
        elif options.marks == "csv":
            marks, marks_from = (csv_marks or {}).get(key, []), ["marks table"]
        if marks:
            mask_parts = mask_parts + [f"marks:{pseudo.digest([json.dumps(marks, sort_keys=True)])}"]
        digest = pseudo.digest(sorted(f"{index[f]['sop_key']}:{index[f]['size']}" for f in files) + mask_parts
                               + [opt])
        if stored_digests.get(key) == digest or (key, digest) in quarantined_digests:
            result.unchanged.append(key)  # with its quarantine rows (files dropped, parts refused)
            result.quarantine.extend(r for r in previous_quarantine if r.get("series_key") == key)
        else:
            raw = {f: index[f]["raw"] for f in files} if all("raw" in index[f] for f in files) else None
            result.todo.append(SeriesPlan(key, files, digest, modality, memory=estimate_memory(index, files),
                                          masks=masks, mask_kind=mask_kind, raw=raw,
                                          repeats=_repeated_instances(index, files), marks=marks,
                                          marks_from=marks_from))
    for image_key, copies in sorted(instances.items()):
        marks: dict = {}
        if options.marks == "sr":  # an SR's regions on this image (a planar image is its own volume)
            srs_of = srs.get(index[copies[0]]["series_key"], [])
            own = _image_marks_to_files([m for m in _sr_marks(index, srs_of)
                                         if m.get("sop_key") == index[copies[0]]["sop_key"]], index, copies[:1])
            marks = {"marks": own, "marks_from": srs_of}
        elif options.marks == "csv" and csv_image_marks is not None:
            sop = index[copies[0]]["sop_key"]
            boxed.add(sop)
            own = _image_marks_to_files([{**m, "sop_key": sop} for m in csv_image_marks.get(sop, [])], index,
                                        copies[:1])
            marks = {"marks": own, "marks_from": ["marks table"]}
        marks_part = [f"marks:{pseudo.digest([json.dumps(marks['marks'], sort_keys=True)])}"] if marks.get("marks") \
            else []
        image_digest = pseudo.digest(sorted(f"{index[f]['sop_key']}:{index[f]['size']}" for f in copies) + marks_part
                                     + [opt])
        if stored_digests.get(image_key) == image_digest or (image_key, image_digest) in quarantined_digests:
            result.unchanged.append(image_key)
            result.quarantine.extend(r for r in previous_quarantine if r.get("series_key") == image_key)
        else:
            result.todo.append(SeriesPlan(image_key, copies, image_digest, index[copies[0]]["modality"],
                                          kind="waveform" if image_key.startswith("w") else "image",
                                          memory=estimate_memory(index, copies[:1]),
                                          repeats=[copies] if len(copies) > 1 else [], **marks))
    lost = sorted(m["line"] for sop, boxes in (csv_image_marks or {}).items() if sop not in boxed for m in boxes)
    result.quarantine.extend({"file": f"{MARKS_TABLE}#{line}", "stage": "ingest-marks", "reason": (
        f"marks table line {line}: the box references an image that is not a planar image of the ingested "
        "modalities in the source")} for line in lost)
    return result


def _sr_marks(index: dict[str, dict], srs: list[str]) -> list[dict]:
    """The marks of SR files, each with ``at``: its SR file and region number (for its own quarantine row)."""
    return [{**m, "at": [f, i]} for f in srs for i, m in enumerate(index[f]["marks"], start=1)]


def read_marks_table(table: str, pseudo: Pseudonymizer) -> dict:
    """A marks CSV as ``plan_series`` keyword arguments: LUNA16-style centres by series key (``csv_marks``) or
    boxes on planar images by instance key (``csv_image_marks``), told apart by the table's columns, and the
    rows that cannot be used (``marks_table_problems``: ``(line, reason)``, each quarantined)."""
    if is_box_table(table):
        boxes, bad = read_boxes_csv(table)
        return {"csv_image_marks": {pseudo.key(uid, kind="sop"): m for uid, m in boxes.items()},
                "marks_table_problems": bad}
    centres, bad = read_marks_csv(table)
    return {"csv_marks": {pseudo.series_key(uid): m for uid, m in centres.items()}, "marks_table_problems": bad}


MARKS_TABLE = "marks table"


def mark_row_file(at: list | None, path_key) -> str:
    """The quarantine ``file`` of one refused lesion mark: its SR file's path key and region number, or the marks
    table and its line (``"marks table#12"``). One row per mark: the table's name and folders are not kept."""
    if not at:
        return MARKS_TABLE
    source, number = at
    return f"{path_key(source) if source else MARKS_TABLE}#{number}"


def _image_marks_to_files(marks: list[dict], index: dict[str, dict], files: list[str]) -> list[dict]:
    """Marks on an image name their instance by its key; give each the file that holds it (None: not among
    ``files``), so that ingest finds the slice however the series is read."""
    by_sop = {index[f]["sop_key"]: f for f in files}
    return [{**m, "file": by_sop.get(m["sop_key"])} if "sop_key" in m else m for m in marks]


def _repeated_instances(index: dict[str, dict], files: list[str]) -> list[list[str]]:
    """Groups of ``files`` that hold the same SOP instance."""
    by_sop: dict[str, list[str]] = defaultdict(list)
    for f in files:
        by_sop[index[f]["sop_key"]].append(f)
    return [group for group in by_sop.values() if len(group) > 1]


def ingest_series(store_root: str, source: str, plan: SeriesPlan, options: IngestOptions) -> dict:
    """Read a series, sort it in space, apply the QC policies, write its volume(s) to the store.

    A series UID normally gives one volume under ``plan.series_key``. With QC policy
    ``split``, mixed orientations/sizes or repeated positions give several volumes, keyed
    ``<key>g<i>`` / ``<key>d<j>``, whose catalog entries name the series as ``parent``.

    Returns a small summary: ``{"series_key", "status": "ingested"|"quarantined", "parts",
    "shape", "reason", "quarantine": [rows], "seconds"}``. Never raises for bad data:
    unusable files and series become quarantine rows (``storage.errors.reason_for``); only a
    failure of the run itself (``belongs_to_run``: the store, the process) propagates.
    """
    t0 = time.perf_counter()
    try:
        return _ingest_series(store_root, source, plan, options, t0)
    except Exception as exc:
        if belongs_to_run(exc):
            raise
        # the per-series boundary: whatever escaped the per-file checks is this series' fault
        Store(store_root).withdraw_series(plan.series_key)  # no part of a failed series stays
        reason = f"series could not be ingested: {reason_for(exc)}"
        logger.warning("ingest: %s quarantined: %s", plan.series_key, reason)
        # a series too large for memory is tried again by a later run (perhaps with bigger workers)
        digest = {} if isinstance(exc, MemoryError) else {"digest": plan.digest}
        rows = [{"path": f, "reason": reason, "stage": "ingest", "series_key": plan.series_key, **digest}
                for f in plan.files]
        return {"series_key": plan.series_key, "status": "quarantined", "parts": 0, "shape": None,
                "reason": reason, "quarantine": rows, "seconds": time.perf_counter() - t0}


def _ingest_series(store_root: str, source: str, plan: SeriesPlan, options: IngestOptions, t0: float) -> dict:
    if plan.kind == "waveform":
        return _ingest_waveform(store_root, source, plan, options, t0)
    store = Store(store_root)
    key = plan.series_key
    rows: list[dict] = []

    def reject(reason: str, files: list[str]) -> None:
        rows.extend(
            {"path": f, "reason": reason, "stage": "ingest", "series_key": key, "digest": plan.digest} for f in files
        )

    copies: dict[str, str] = {}  # file dropped as an exact copy -> the file kept in its place

    def summary(shapes: list[list[int]]) -> dict:
        # every file is accounted for: a copy shares its kept file's fate; a series not stored
        # quarantines each of its files that has no row yet
        recorded = {r["path"]: r["reason"] for r in rows if "path" in r}
        for copy, kept in copies.items():
            if kept in recorded and copy not in recorded:
                reject(recorded[kept], [copy])
        if not shapes:
            recorded = {r.get("path") for r in rows}
            reason = rows[-1]["reason"] if rows else "no readable image in the series"
            reject(reason, [f for f in plan.files if f not in recorded])
            # the SR files whose marks were for it have nothing to mark
            reject(f"its lesion marks are for a series that was not ingested ({reason})",
                   [f for f in plan.marks_from if f != MARKS_TABLE and f not in recorded])
        return {"series_key": key, "status": "ingested" if shapes else "quarantined", "parts": len(shapes),
                "shape": shapes[0] if shapes else None, "reason": None if shapes or not rows else rows[-1]["reason"],
                "quarantine": rows, "seconds": time.perf_counter() - t0}

    # the source changed: its earlier version (and any parts) must not outlive this attempt
    store.withdraw_series(key)
    slices: list[_Slice] = []
    block = _RawBlock.for_plan(plan)
    if block is not None:  # in order along the normal: the spatially first file is the template
        files = block.files
    else:
        first_file = _spatially_first(plan)
        files = sorted(plan.files, key=lambda f: f != first_file)  # the template slice is read first, in full
    template = None
    for relpath in files:
        if plan.raw and relpath in plan.raw and (template is not None or block is not None):
            # the scan kept this file's geometry, rescale and pixel offset: one read, no parse
            header = plan.raw[relpath]
            try:
                if block is not None:
                    pixels = block.read(source, relpath)
                else:
                    pixels = rescale_frame(read_raw(Path(source) / relpath, header),
                                           slope=float(header.get("RescaleSlope", 1) or 1),
                                           intercept=float(header.get("RescaleIntercept", 0) or 0),
                                           bits=int(header["bits"]), photometric=header["photometric"])
                if template is None:  # the block's first file: its header in full, for the catalog
                    template = read_header(Path(source) / relpath)
            except IngestError as exc:
                reject(str(exc), [relpath])
                continue
            slot = (block, block.index[relpath]) if block is not None else None
            slices.append(_Slice(relpath, _Header(template, header), pixels, slot))
            continue
        try:
            ds, decoded = read_slice(Path(source) / relpath)
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:  # enhanced multi-frame: one slice per frame
                frames = split_frames(ds, color=options.color, pixels=decoded)
                slices.extend(_Slice(relpath, frame, values) for frame, values in frames)
                continue
            check_image(ds, planar=plan.kind == "image")
            pixels = to_physical(ds, color=options.color, pixels=decoded)
            if is_mosaic(ds):  # a Siemens mosaic: its tiles are the slices
                slices.extend(_Slice(relpath, frame, values) for frame, values in split_mosaic(ds, pixels))
                template = template if template is not None else ds
                continue
        except Exception as exc:  # the per-file boundary
            if belongs_to_run(exc):
                raise
            if isinstance(exc, InvalidSeriesError):  # e.g. a multi-frame or colour image: the series goes
                recorded = {r.get("path") for r in rows}
                reject(str(exc), [f for f in plan.files if f not in recorded])
                return summary([])
            reject(reason_for(exc) if isinstance(exc, IngestError) else f"invalid header value: {reason_for(exc)}",
                   [relpath])
            continue
        del ds.PixelData  # the decoded frame is kept; free the raw bytes
        slices.append(_Slice(relpath, ds, pixels))
        template = template if template is not None else ds
    slices, copies = _resolve_repeats(slices, plan.repeats, reject)
    if not slices:
        return summary([])

    writer = _StackWriter(store, plan, options, source=source, quarantine=rows, repeats_dropped=len(copies))
    if plan.kind == "image":
        try:
            return summary([writer.write_image(slices[0])])
        except (InvalidSeriesError, ValueError, AttributeError, TypeError) as exc:
            reject(str(exc), [slices[0].relpath])
            return summary([])

    groups = group_mixed([s.ds.get("ImageOrientationPatient") for s in slices], [s.pixels.shape for s in slices])
    if len(groups) > 1 and options.qc_mixed == "quarantine":
        sizes = ", ".join(str(len(g)) for g in groups)
        reject(f"mixed orientations or image sizes: {len(groups)} groups of {sizes} slices "
               "(set ingest.qc.mixed: split to keep each group)", [s.relpath for s in slices])
        return summary([])
    shapes = []
    for gi, idx in enumerate(groups):
        part_key = key if len(groups) == 1 else f"{key}g{gi}"
        try:
            shapes += writer.write_group([slices[i] for i in idx], part_key, mixed_groups=len(groups))
        except (InvalidSeriesError, ValueError, AttributeError, TypeError) as exc:
            reason = str(exc) if isinstance(exc, InvalidSeriesError) else f"invalid geometry: {exc}"
            reject(reason, [slices[i].relpath for i in idx])
    return summary(shapes)


def _ingest_waveform(store_root: str, source: str, plan: SeriesPlan, options: IngestOptions, t0: float) -> dict:
    """A DICOM waveform (ECG) as a (1, samples, leads) float32 array in mV; copies of the instance with the
    same samples are dropped, copies that differ quarantine every one."""
    from storage.waveform import read_waveform

    store = Store(store_root)
    key = plan.series_key
    store.withdraw_series(key)
    read, rows = [], []
    for relpath in plan.files:
        try:  # the per-file boundary: reading is the file's fault (never the run's), as for images
            ds = pydicom.dcmread(Path(source) / relpath)
            read.append((relpath, ds, read_waveform(ds)))
        except Exception as exc:
            reason = reason_for(exc) if isinstance(exc, IngestError) else f"unreadable waveform: {reason_for(exc)}"
            rows.append({"path": relpath, "reason": reason.replace(str(Path(source) / relpath), "the file"),
                         "stage": "ingest", "series_key": key, "digest": plan.digest})

    def done(status: str, shape=None) -> dict:
        return {"series_key": key, "status": status, "parts": int(status == "ingested"), "shape": shape,
                "reason": rows[-1]["reason"] if rows and status != "ingested" else None, "quarantine": rows,
                "seconds": time.perf_counter() - t0}

    if not read:
        return done("quarantined")
    first_path, ds, wave = read[0]
    if any(w.signal.shape != wave.signal.shape or not np.array_equal(w.signal, wave.signal) for _, _, w in read[1:]):
        rows += [{"path": f, "reason": f"{len(read)} files hold the same SOP instance with different samples; none "
                  "of them is used", "stage": "ingest", "series_key": key, "digest": plan.digest} for f, _, _ in read]
        return done("quarantined")
    pseudo = store.pseudonymizer()
    volume = wave.signal[None]  # (1, samples, leads): time runs along y, one lead per column
    entry = {
        "patient_key": pseudo.patient_key(str(ds.get("PatientID", "") or "")),
        "study_key": pseudo.study_key(str(ds.get("StudyInstanceUID", "") or "")),
        "accession_key": pseudo.accession_key(str(ds.get("AccessionNumber", "") or "")),
        "modality": str(ds.get("Modality", "") or "ECG"), "kind": "waveform", "shape": list(volume.shape),
        "dtype": "float32", "n_files": 1, "n_frames": 1, "digest": plan.digest,
        "spacing": [1.0, 1000.0 / wave.rate, 1.0], "spacing_source": "SamplingFrequency (y: ms per sample)",
        "origin": [0.0, 0.0, 0.0], "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        "spacing_deviation": 0.0, "rescaled": True, "sampling_rate": wave.rate, "leads": list(wave.leads),
        "units": "mV", "group": wave.group, "seconds": round(volume.shape[1] / wave.rate, 3),
        "acquisition": header_values(ds, SAFE_ATTRIBUTES),
        "demographics": demographics(ds),
    }
    if len(read) > 1:
        entry["duplicate_files_dropped"] = len(read) - 1
    if not options.deidentify:
        entry["identifiers"] = header_values(ds, IDENTIFYING_ATTRIBUTES)
    store.write_series(key, volume, entry)
    return done("ingested", list(volume.shape))


def _resolve_repeats(slices: list[_Slice], repeats: list[list[str]], reject) -> tuple[list[_Slice], dict[str, str]]:
    """Copies of one SOP instance: drop the copies of an exact duplicate (same frames, same
    positions), reject every copy of one whose pixels or positions differ. Returns the slices
    kept, and each file dropped as a copy with the file kept in its place."""
    copies: dict[str, str] = {}
    if not repeats:
        return slices, copies
    by_file: dict[str, list[_Slice]] = defaultdict(list)
    for item in slices:
        by_file[item.relpath].append(item)
    drop: set[str] = set()
    for group in repeats:
        read = [f for f in group if f in by_file]  # unreadable copies were rejected on their own
        if len(read) < 2:
            continue
        first = by_file[read[0]]
        if all(_same_frames(first, by_file[f]) for f in read[1:]):
            drop.update(read[1:])
            copies.update((f, read[0]) for f in read[1:])
        else:
            reject(f"{len(read)} files hold the same SOP instance with different pixels or positions; "
                   "none of them is used", read)
            drop.update(read)
    return [s for s in slices if s.relpath not in drop], copies


def _same_frames(a: list[_Slice], b: list[_Slice]) -> bool:
    def position(item: _Slice):
        value = item.ds.get("ImagePositionPatient")
        return None if value is None else [float(v) for v in value]

    return len(a) == len(b) and all(
        x.pixels.shape == y.pixels.shape and np.array_equal(x.pixels, y.pixels) and position(x) == position(y)
        for x, y in zip(a, b))


def _spatially_first(plan: SeriesPlan) -> str | None:
    """The file of a raw-readable plan lowest along its slice normal (the one whose header the catalog keeps)."""
    if not plan.raw or plan.kind != "volume":
        return None
    along = _along_normal(plan)
    return min(plan.files, key=along.__getitem__)  # the first of equals, in plan order


def _along_normal(plan: SeriesPlan) -> dict[str, float]:
    """Each raw-readable file's position along its own slice normal (mm)."""
    iop = np.array([plan.raw[f]["ImageOrientationPatient"] for f in plan.files], dtype=float)
    ipp = np.array([plan.raw[f]["ImagePositionPatient"] for f in plan.files], dtype=float)
    along = np.einsum("ij,ij->i", ipp, np.cross(iop[:, :3], iop[:, 3:]))
    return dict(zip(plan.files, along.tolist()))


class _RawBlock:
    """One buffer for a series whose files all hold native pixels of one shape and 16-bit type,
    with a rescale that stays exact in int16 (CT: 12-bit values, slope 1, intercept -1024).

    Each file is read straight into its slot, in order along the slice normal, and rescaled in
    place; a stack whose slices fill consecutive slots in that order is then stored from the
    buffer itself. That saves two allocations and two copies of every slice (the read array,
    its rescaled copy, the copy into the volume) and halves the peak memory of the series.
    """

    def __init__(self, files: list[str], headers: dict[str, dict], intercepts: dict[str, int]):
        h0 = headers[files[0]]
        self.files, self.headers, self.intercepts = files, headers, intercepts
        self.index = {f: i for i, f in enumerate(files)}
        self.stored = np.empty((len(files), h0["rows"], h0["columns"]), dtype=h0["dtype"])
        self.values = self.stored.view(np.int16)  # the same bytes, as the rescaled values

    @classmethod
    def for_plan(cls, plan: SeriesPlan) -> _RawBlock | None:
        if plan.kind != "volume" or not plan.raw or any(f not in plan.raw for f in plan.files) or len(plan.files) < 2:
            return None
        headers = {f: plan.raw[f] for f in plan.files}
        if len({(h["rows"], h["columns"], h["dtype"]) for h in headers.values()}) != 1:
            return None
        intercepts = {f: _int16_intercept(h) for f, h in headers.items()}
        if any(v is None for v in intercepts.values()):
            return None
        along = _along_normal(plan)
        return cls(sorted(plan.files, key=along.__getitem__), headers, intercepts)

    def read(self, source: str, relpath: str) -> np.ndarray:
        """The file's rescaled pixels, in its slot (a view of the buffer)."""
        i = self.index[relpath]
        read_raw(Path(source) / relpath, self.headers[relpath], out=self.stored[i])
        out = self.values[i]
        if self.intercepts[relpath]:
            out += np.int16(self.intercepts[relpath])
        return out

    def volume(self, slots: list[tuple[_RawBlock, int] | None]) -> np.ndarray | None:
        """The buffer's rows for these slices (in volume order), if they are consecutive slots of this block."""
        if not slots or any(s is None or s[0] is not self for s in slots):
            return None
        start = slots[0][1]
        if [s[1] for s in slots] != list(range(start, start + len(slots))):
            return None
        return self.values[start:start + len(slots)]


def _int16_intercept(header: dict) -> int | None:
    """The intercept, if ``rescale_frame`` of this raw header gives int16 (16-bit stored values,
    not inverted, slope 1, an integer intercept, every possible value in range); else None.
    Adding it to the stored bits viewed as int16 then gives exactly ``rescale_frame``'s values."""
    if header["dtype"] not in ("<u2", "<i2") or header["photometric"] != "MONOCHROME2":
        return None
    slope, intercept = float(header.get("RescaleSlope", 1) or 1), float(header.get("RescaleIntercept", 0) or 0)
    dtype = exact_integer_rescale(header["dtype"] == "<i2", int(header["bits"]), slope, intercept)
    return int(intercept) if dtype is np.int16 else None


class _Header:
    """A slice's header: its own geometry and rescale (from the scan), other attributes from a fully
    read slice of the same series (the template). Enough of pydicom's Dataset interface for ingest."""

    def __init__(self, template, values: dict):
        self._template, self._values = template, values

    def __getattr__(self, name: str):
        values = self.__dict__.get("_values", {})
        if name in values:
            return values[name]
        return getattr(self.__dict__["_template"], name)

    def get(self, name: str, default=None):
        return self._values[name] if name in self._values else self._template.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self._values or name in self._template


@dataclass
class _Slice:
    relpath: str
    ds: object
    pixels: np.ndarray
    slot: tuple[_RawBlock, int] | None = None  # where the pixels lie in a series buffer


class _StackWriter:
    """Turns groups of decoded slices into stored volumes, applying the QC policies."""

    def __init__(self, store: Store, plan: SeriesPlan, options: IngestOptions, *, source: str = "",
                 quarantine: list[dict] | None = None, repeats_dropped: int = 0):
        self.store, self.plan, self.options, self.source = store, plan, options, source
        self.repeats_dropped = repeats_dropped
        self.pseudo = store.pseudonymizer()
        self.quarantine = quarantine if quarantine is not None else []

    def _mask(self, first, entry: dict, shape) -> np.ndarray | None:
        """The plan's mask on this volume's grid, or None (no mask, or quarantined with the reason)."""
        if not self.plan.masks:
            return None
        try:
            mask, info = load_mask(self.plan.mask_kind, self.plan.masks, source=self.source, shape=shape,
                                   spacing=entry["spacing"], origin=entry["origin"], direction=entry["direction"],
                                   frame_of_reference=str(first.get("FrameOfReferenceUID", "") or "") or None)
        except MaskError as exc:
            reason = str(exc)
            for m in self.plan.masks:  # the user's own mask paths may name the patient
                reason = reason.replace(str(m), "the mask file")
            self.quarantine.extend(
                {"path": self._mask_name(m), "reason": reason, "stage": "ingest-mask",
                 "series_key": self.plan.series_key, "digest": self.plan.digest} for m in self.plan.masks)
            return None
        entry["mask"] = info
        return mask

    def _marks(self, entry: dict, shape, slices: list[_Slice], *, planar: bool = False) -> None:
        """The plan's lesion marks on this volume's grid, into ``entry["marks"]``; a mark outside the volume
        is quarantined with the reason (under the SR file, or the marks table, that gave it). Marks on an
        image of the series are placed through that slice's own geometry."""
        if self.plan.marks is None:
            return
        frames = Counter(s.relpath for s in slices)  # a multi-frame file gives several slices
        by_file = {s.relpath: (s.ds if frames[s.relpath] == 1 else None) for s in slices}
        marks = resolve_image_marks(self.plan.marks, by_file, planar=planar)
        frame = str(slices[0].ds.get("FrameOfReferenceUID", "") or "") if slices and not planar else ""
        frame_key = self.store.pseudonymizer().key(frame, kind="frame") if frame else ""
        for mark in marks:  # a 3D region in another frame of reference has no place on this volume
            if mark.get("frame_key") and frame_key and mark["frame_key"] != frame_key and not mark.get("reason"):
                mark["reason"] = ("its frame of reference (ReferencedFrameOfReferenceUID) is not the series' "
                                  "FrameOfReferenceUID: its coordinates are in another space")
        placed, refused = place_marks(marks, shape=shape, spacing=entry["spacing"], origin=entry["origin"],
                                      direction=entry["direction"])
        entry["marks"] = placed
        self.quarantine.extend({"file": mark_row_file(at, self.store.path_key), "reason": reason,
                                "stage": "ingest-marks", "series_key": self.plan.series_key,
                                "digest": self.plan.digest} for at, reason in refused)

    def _mask_name(self, path: str) -> str:
        # a NIfTI path is the user's own file; keep only its name (folders may carry identifiers)
        return path if self.plan.mask_kind == "seg" else "nifti:" + Path(path).name

    def write_group(self, group: list[_Slice], part_key: str, *, mixed_groups: int) -> list[list[int]]:
        """One orientation and image size; duplicates per policy; returns the shapes written."""
        opts = self.options
        iop = check_orientation(group[0].ds.ImageOrientationPatient)  # before positions are projected on it
        positions = [s.ds.ImagePositionPatient for s in group]
        qc = measure(positions, iop, tolerance=opts.spacing_tolerance)
        actions = [f"split from {mixed_groups} orientation/size groups"] if mixed_groups > 1 else []
        stacks = [group]
        if qc.duplicates:
            if opts.qc_duplicates == "quarantine":
                raise InvalidSeriesError(f"{qc.duplicates} duplicate slice position(s) "
                                         "(set ingest.qc.duplicates: split or accept)")
            numbers = [int(s.ds.get("InstanceNumber", 0) or 0) for s in group]
            parts = split_duplicates(positions, iop, numbers)
            if opts.qc_duplicates == "accept":
                stacks = [[group[i] for i in parts[0]]]
                actions.append(f"dropped {qc.duplicates} slice(s) at repeated positions")
            else:
                stacks = [[group[i] for i in part] for part in parts]
                actions.append(f"split into {len(parts)} stacks at repeated positions")
        shapes = []
        for j, stack in enumerate(stacks):
            stack_key = part_key if len(stacks) == 1 else f"{part_key}d{j}"
            shapes.append(self._write_stack(stack, stack_key, qc, actions, mixed_groups))
        return shapes

    def _write_stack(self, stack: list[_Slice], stack_key: str, group_qc: StackQC, actions: list[str],
                     mixed_groups: int) -> list[int]:
        opts = self.options
        if len(stack) < opts.min_slices:
            raise InvalidSeriesError(f"{len(stack)} slice(s) < ingest.min_slices={opts.min_slices}")
        iop = check_orientation(stack[0].ds.ImageOrientationPatient)
        positions = np.asarray([[float(v) for v in s.ds.ImagePositionPatient] for s in stack], dtype=float)
        if positions.shape[1:] != (3,) or not np.isfinite(positions).all() or np.abs(positions).max() > 1e6:
            raise InvalidSeriesError("impossible ImagePositionPatient: 3 finite coordinates within 1 km expected")
        pixel_spacing = check_spacing(stack[0].ds.PixelSpacing, "PixelSpacing")
        along, normal = positions_along(positions, iop)
        order = np.argsort(along, kind="stable")
        s_sorted = along[order]
        qc = measure(positions, iop, tolerance=opts.spacing_tolerance)
        actions = list(actions)
        resample = qc.spacing_deviation > opts.spacing_tolerance
        if resample and opts.qc_spacing == "quarantine":
            raise InvalidSeriesError(
                f"non-uniform slice spacing: deviation {qc.spacing_deviation:.0%} > tolerance "
                f"{opts.spacing_tolerance:.0%}, {qc.missing_slices} missing slice(s) "
                "(set ingest.qc.spacing: accept to resample to uniform spacing)")
        tilted = qc.tilt_deg > opts.tilt_tolerance_deg
        if tilted and opts.qc_tilt == "quarantine":
            raise InvalidSeriesError(
                f"slice positions deviate {qc.tilt_deg:.1f} deg from the slice normal (gantry tilt or shear; "
                "set ingest.qc.tilt: accept to resample)")
        first = stack[order[0]].ds
        modality = str(first.get("Modality", "") or "OT")
        dtype = volume_dtype(modality, [s.pixels for s in stack])
        slots = [stack[i].slot for i in order]
        block = slots[0][0] if slots[0] is not None else None
        volume = block.volume(slots) if block is not None and dtype == np.int16 else None
        if volume is None:
            volume = np.empty((len(stack), *stack[0].pixels.shape), dtype=dtype)
            for out_index, in_index in enumerate(order):  # fill in spatial order; no float64 stack
                volume[out_index] = cast_volume(stack[in_index].pixels, dtype)
        if tilted:
            volume = cast_volume(deshear(volume, positions[order], iop, pixel_spacing, fill=float(volume.min())), dtype)
            actions.append(f"de-sheared {qc.tilt_deg:.1f} deg tilt")
        if len(stack) > 1:
            gaps = np.diff(s_sorted)
            dz = check_spacing([float(np.median(gaps))], "slice spacing (from ImagePositionPatient)")[0]
        else:  # one slice: the spacing it declares, else its thickness (1 mm if neither)
            declared = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
            dz = check_spacing([declared], "SpacingBetweenSlices/SliceThickness")[0] if declared else 1.0
        if resample:
            volume = cast_volume(resample_along_normal(volume, s_sorted, dz), dtype)
            actions.append(f"resampled to uniform {dz:.3g} mm spacing ({qc.missing_slices} missing slice(s))")
        row_dir = [float(v) for v in iop[:3]]
        col_dir = [float(v) for v in iop[3:]]
        entry = self._entry(first, stack, dtype, volume.shape)
        entry.update({
            "spacing": [dz, *pixel_spacing],
            "origin": [float(v) for v in positions[order][0]],
            "direction": [normal.tolist(), col_dir, row_dir],
            "spacing_deviation": qc.spacing_deviation,
            "qc": {**group_qc.as_dict(), **{k: v for k, v in qc.as_dict().items() if k != "duplicates"},
                   "mixed_groups": mixed_groups, "actions": actions},
        })
        if stack_key != self.plan.series_key:
            entry["parent"] = self.plan.series_key
        mask = self._mask(first, entry, volume.shape)
        self._marks(entry, volume.shape, stack)
        self.store.write_series(stack_key, volume, entry, mask=mask)
        return list(volume.shape)

    def write_image(self, item: _Slice) -> list[int]:
        """A planar image (no patient position) as a one-slice volume."""
        geo, spacing_source = planar_geometry(item.ds, fallback=self.options.fallback_spacing)
        modality = str(item.ds.get("Modality", "") or "OT")
        dtype = volume_dtype(modality, [item.pixels])
        volume = cast_volume(item.pixels, dtype)[None]
        entry = self._entry(item.ds, [item], dtype, volume.shape)
        entry.update({"spacing": list(geo.spacing), "origin": list(geo.origin),
                      "direction": [list(r) for r in geo.direction], "spacing_deviation": 0.0,
                      "spacing_source": spacing_source})
        mask = self._mask(item.ds, entry, volume.shape)
        self._marks(entry, volume.shape, [item], planar=True)
        self.store.write_series(self.plan.series_key, volume, entry, mask=mask)
        return list(volume.shape)

    def _entry(self, first, stack: list[_Slice], dtype, shape) -> dict:
        pseudo, opts = self.pseudo, self.options
        entry = {
            "patient_key": pseudo.patient_key(str(first.get("PatientID", "") or "")),
            "study_key": pseudo.study_key(str(first.get("StudyInstanceUID", "") or "")),
            "accession_key": pseudo.accession_key(str(first.get("AccessionNumber", "") or "")),
            "modality": str(first.get("Modality", "") or "OT"),
            "shape": list(shape),
            "dtype": str(dtype),
            "n_files": len({s.relpath for s in stack}),
            "n_frames": len(stack),
            "digest": self.plan.digest,
            "kind": self.plan.kind,
            "spacing_source": "PixelSpacing",
            "rescaled": "RescaleSlope" in first or "RescaleIntercept" in first,
            # only allow-listed, non-identifying acquisition facts
            "acquisition": header_values(first, SAFE_ATTRIBUTES),
            "demographics": demographics(first),  # sex and an age band, for subgroup tables
        }
        if self.repeats_dropped:
            entry["duplicate_files_dropped"] = self.repeats_dropped  # exact copies of instances kept once
        if not opts.deidentify:
            entry["identifiers"] = header_values(first, IDENTIFYING_ATTRIBUTES)
        return entry


def header_values(ds, keywords) -> dict:
    """JSON-ready values of the given header keywords that are present and non-empty."""
    out = {}
    for keyword in keywords:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[keyword] = [_plain(v) for v in value]
        else:
            out[keyword] = _plain(value)
    return out


def _plain(value):
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def nifti_mask_files(table: str | Path, *, key: str, key_column: str, path_column: str, pseudo: Pseudonymizer,
                     index: dict[str, dict]) -> dict[str, tuple[str, int, int]]:
    """Series key -> ``(NIfTI path, size, mtime_ns)`` from a CSV of masks keyed by series or study UID.

    Keys are turned into pseudonyms and matched against the scan index, so no UID is kept.
    A study key gives its mask to every image series of the study. Relative paths are taken
    from the CSV's folder.

    Raises:
        ValueError: a column is missing.
    """
    import pandas as pd

    table = Path(table)
    rows = pd.read_csv(table, dtype=str)
    for col in (key_column, path_column):
        if col not in rows.columns:
            raise ValueError(f"masks table {table.name!r} has no column {col!r}; its columns are {list(rows.columns)}")
    field_name = "series_key" if key == "SeriesInstanceUID" else "study_key"
    hash_key = pseudo.series_key if key == "SeriesInstanceUID" else pseudo.study_key
    wanted = {}
    for uid, path in zip(rows[key_column], rows[path_column]):
        if isinstance(uid, str) and isinstance(path, str) and uid and path:
            full = Path(path) if Path(path).is_absolute() else table.parent / path
            wanted[hash_key(uid.strip())] = str(full.resolve())
    out = {}
    for rec in index.values():
        if "reason" in rec or "mask_for" in rec or rec.get(field_name) not in wanted:
            continue
        path = wanted[rec[field_name]]
        try:
            st = Path(path).stat()
            out[rec["series_key"]] = (path, st.st_size, st.st_mtime_ns)
        except OSError:
            out[rec["series_key"]] = (path, -1, -1)  # quarantined with the reason at ingest
    return out


def chunk_files(files: list, n_chunks: int) -> list[list]:
    """Split a list into at most ``n_chunks`` contiguous, nearly equal parts (none empty)."""
    n_chunks = max(1, min(n_chunks, len(files)))
    bounds = np.linspace(0, len(files), n_chunks + 1).astype(int)
    return [files[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def scan_source(source: str, store: Store, *, map_fn=None, n_chunks: int = 8) -> dict[str, dict]:
    """Refresh the store's scan index for ``source``: only new or changed files are read.

    Returns the index by path relative to the source. The store keeps it by path key
    (``Store.path_key``): file and folder names can carry UIDs and names.

    Args:
        map_fn: ``map_fn(func, list_of_args) -> list_of_results``, e.g. a Dask client's
            map-and-gather; serial when None.
    """
    problems: list[tuple[str, str]] = []
    listing = list_source(source, problems)
    keys = {p: store.path_key(p) for p in [*(p for p, _, _ in listing), *(p for p, _ in problems)]}
    stored = store.scan_index()
    index = {p: stored[keys[p]] for p, _, _ in listing if keys[p] in stored}
    todo = stale_files(listing, index)
    unlisted = {p: {"reason": reason, "retry": True} for p, reason in problems}
    if todo:
        secret = store.secret
        chunks = chunk_files(todo, n_chunks)
        args = [(source, chunk, secret) for chunk in chunks]
        results = map_fn(scan_files, args) if map_fn else [scan_files(*a) for a in args]
        for part in results:
            index.update(part)
    index.update(unlisted)  # entries the listing could not read: quarantined with the reason, looked at again
    keyed = {keys[p]: rec for p, rec in index.items()}
    if keyed != stored:
        store.write_scan_index(keyed)
    logger.info("scan: %d files, %d new or changed, %d entries not listable", len(listing), len(todo), len(problems))
    return index


def source_index(store: Store, source: str) -> dict[str, dict]:
    """The store's scan index by path relative to ``source`` (files no longer there are left out)."""
    problems: list[tuple[str, str]] = []
    paths = [p for p, _, _ in list_source(source, problems)] + [p for p, _ in problems]
    stored = store.scan_index()
    return {p: stored[k] for p in paths if (k := store.path_key(p)) in stored}


def with_paths(rows: list[dict], store: Store, source: str) -> list[dict]:
    """Quarantine rows with the ``path`` of their file in ``source`` (None for a file no longer there).

    The paths are identifying (file and folder names carry UIDs and names): they are for the
    user's eyes, never for the store, the logs or a report."""
    problems: list[tuple[str, str]] = []
    paths = [p for p, _, _ in list_source(source, problems)] + [p for p, _ in problems]
    for folder, dirs, _ in os.walk(source):  # folders too: an empty class folder is quarantined as "name/"
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        paths += [os.path.relpath(os.path.join(folder, d), source) + "/" for d in dirs]
    by_key = {store.path_key(p): p for p in paths}
    return [{**row, "path": _row_path(row.get("file"), by_key)} for row in rows]


def _row_path(file: str | None, by_key: dict[str, str]) -> str | None:
    """The path of a quarantine row's file key; a lesion mark's row (``key#region``, ``marks table#line``) gives
    its SR file's path or the table with the region or line."""
    if file in by_key or not file or "#" not in file:
        return by_key.get(file)
    base, number = file.rsplit("#", 1)
    source = MARKS_TABLE if base == MARKS_TABLE else by_key.get(base)
    return f"{source}#{number}" if source else None


__all__ = [
    "IngestOptions",
    "ScanResult",
    "SeriesPlan",
    "chunk_files",
    "ingest_series",
    "plan_series",
    "scan_files",
    "scan_source",
    "source_index",
    "stale_files",
    "with_paths",
]
