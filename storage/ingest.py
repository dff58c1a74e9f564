"""Ingest: scan a DICOM folder, group files into series, write each series to the store.

Plain functions; the Prefect tasks in ``tasks/ingest.py`` run them on Dask. Workers write
their series to the store themselves and return a small summary (never a volume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from storage.deid import IDENTIFYING_ATTRIBUTES, SAFE_ATTRIBUTES, Pseudonymizer
from storage.dicom import (
    cast_volume,
    check_image,
    list_source,
    planar_geometry,
    read_slice,
    scan_file,
    series_geometry,
    to_physical,
    volume_dtype,
)
from storage.errors import IngestError, InvalidSeriesError
from storage.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOptions:
    deidentify: bool = True
    modalities: tuple[str, ...] | None = None
    min_slices: int = 1
    spacing_tolerance: float = 0.1
    color: str = "quarantine"

    def digest(self) -> str:
        # only what changes the stored result (the modality filter acts before reading)
        blob = json.dumps({"deid": self.deidentify, "min": self.min_slices, "tol": self.spacing_tolerance,
                           "color": self.color})
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class SeriesPlan:
    """One series to ingest: its key, files (relative paths) and source digest."""

    series_key: str
    files: list[str]
    digest: str
    modality: str
    kind: str = "volume"  # or "image": one planar file (no patient position), stored as one slice


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
    """Files that are new or changed (size or mtime) since the cached scan."""
    return [
        (p, s, m)
        for p, s, m in listing
        if p not in index or index[p].get("size") != s or index[p].get("mtime_ns") != m
    ]


def plan_series(
    index: dict[str, dict],
    *,
    pseudo: Pseudonymizer,
    catalog: dict[str, dict],
    previous_quarantine: list[dict],
    options: IngestOptions,
) -> ScanResult:
    """Group scanned files into series and decide what to ingest.

    A series whose digest (its SOP instances and file sizes, and the ingest options) matches
    the catalog, or a quarantine row from an earlier run, is unchanged and skipped.
    """
    result = ScanResult(n_files=len(index))
    groups: dict[str, list[str]] = defaultdict(list)
    for relpath, rec in sorted(index.items()):
        if "reason" in rec:
            result.quarantine.append({"path": relpath, "reason": rec["reason"], "stage": "scan"})
        else:
            groups[rec["series_key"]].append(relpath)
    quarantined_digests = {
        (row["series_key"], row.get("digest")) for row in previous_quarantine if row.get("series_key")
    }
    opt = options.digest()
    for key, files in sorted(groups.items()):
        first = index[files[0]]
        modality = first["modality"]
        if options.modalities and modality not in options.modalities:
            reason = f"modality {modality} not in ingest.modalities ({', '.join(options.modalities)})"
            result.quarantine.extend(
                {"path": f, "reason": reason, "stage": "scan", "series_key": key} for f in files
            )
            continue
        planar = [f for f in files if index[f].get("planar")]
        for f in planar:  # each planar image is its own one-slice volume, keyed by its instance
            image_key = "i" + index[f]["sop_key"][:15]
            image_digest = pseudo.digest([f"{index[f]['sop_key']}:{index[f]['size']}", opt])
            if catalog.get(image_key, {}).get("digest") == image_digest:
                result.unchanged.append(image_key)
            elif (image_key, image_digest) in quarantined_digests:
                result.unchanged.append(image_key)
                result.quarantine.extend(r for r in previous_quarantine if r.get("series_key") == image_key)
            else:
                result.todo.append(SeriesPlan(image_key, [f], image_digest, modality, kind="image"))
        files = [f for f in files if not index[f].get("planar")]
        if not files:
            continue
        digest = pseudo.digest(sorted(f"{index[f]['sop_key']}:{index[f]['size']}" for f in files) + [opt])
        if catalog.get(key, {}).get("digest") == digest:
            result.unchanged.append(key)
        elif (key, digest) in quarantined_digests:
            result.unchanged.append(key)
            result.quarantine.extend(r for r in previous_quarantine if r.get("series_key") == key)
        else:
            result.todo.append(SeriesPlan(key, files, digest, modality))
    return result


def ingest_series(store_root: str, source: str, plan: SeriesPlan, options: IngestOptions) -> dict:
    """Read a series, sort it in space, convert to physical units and write it to the store.

    Returns a small summary: ``{"series_key", "status": "ingested"|"quarantined", "shape",
    "quarantine": [rows], "seconds"}``. Never raises for bad data: unusable files and series
    become quarantine rows.
    """
    t0 = time.perf_counter()
    store = Store(store_root)
    pseudo = store.pseudonymizer()
    key = plan.series_key
    rows: list[dict] = []

    def quarantine_all(reason: str, files: list[str]) -> dict:
        rows.extend(
            {"path": f, "reason": reason, "stage": "ingest", "series_key": key, "digest": plan.digest} for f in files
        )
        return {"series_key": key, "status": "quarantined", "reason": reason, "quarantine": rows,
                "seconds": time.perf_counter() - t0}

    datasets, pixels, good_files = [], [], []
    for relpath in plan.files:
        try:
            ds = read_slice(Path(source) / relpath)
            check_image(ds, planar=plan.kind == "image")
            pixels.append(to_physical(ds, color=options.color))
        except IngestError as exc:
            if isinstance(exc, InvalidSeriesError):  # e.g. a multi-frame or colour image: the series goes
                recorded = {r["path"] for r in rows}
                return quarantine_all(str(exc), [f for f in plan.files if f not in recorded])
            rows.append({"path": relpath, "reason": str(exc), "stage": "ingest", "series_key": key,
                         "digest": plan.digest})
            continue
        del ds.PixelData  # the decoded frame is kept; free the raw bytes
        datasets.append(ds)
        good_files.append(relpath)
    if not datasets:
        return quarantine_all("no readable image in the series", [])
    try:
        if len(datasets) < options.min_slices:
            raise InvalidSeriesError(f"{len(datasets)} slice(s) < ingest.min_slices={options.min_slices}")
        shapes = {p.shape for p in pixels}
        if len(shapes) > 1:
            raise InvalidSeriesError(f"mixed image sizes within the series: {sorted(shapes)}")
        spacing_source = "PixelSpacing"
        if plan.kind == "image":
            geo, spacing_source = planar_geometry(datasets[0])
        else:
            geo = series_geometry(
                [ds.ImagePositionPatient for ds in datasets],
                [ds.ImageOrientationPatient for ds in datasets],
                datasets[0].PixelSpacing,
                slice_thickness=float(datasets[0].get("SliceThickness", 0) or 0) or None,
                tolerance=options.spacing_tolerance,
            )
    except (InvalidSeriesError, ValueError, AttributeError, TypeError) as exc:
        reason = str(exc) if isinstance(exc, InvalidSeriesError) else f"invalid geometry: {exc}"
        return quarantine_all(reason, good_files)

    first = datasets[geo.order[0]]
    modality = str(first.get("Modality", "") or "OT")
    dtype = volume_dtype(modality, pixels)
    volume = np.empty((len(pixels), *pixels[0].shape), dtype=dtype)
    for out_index, in_index in enumerate(geo.order):  # fill in spatial order; no float64 stack
        volume[out_index] = cast_volume(pixels[in_index], dtype)
        pixels[in_index] = None
    entry = {
        "patient_key": pseudo.patient_key(str(first.get("PatientID", "") or "")),
        "study_key": pseudo.study_key(str(first.get("StudyInstanceUID", "") or "")),
        "accession_key": pseudo.accession_key(str(first.get("AccessionNumber", "") or "")),
        "modality": modality,
        "shape": list(volume.shape),
        "dtype": str(dtype),
        "spacing": list(geo.spacing),
        "origin": list(geo.origin),
        "direction": [list(r) for r in geo.direction],
        "spacing_deviation": geo.spacing_deviation,
        "n_files": len(good_files),
        "digest": plan.digest,
        "kind": plan.kind,
        "spacing_source": spacing_source,
        "rescaled": "RescaleSlope" in first or "RescaleIntercept" in first,
        # only allow-listed, non-identifying acquisition facts
        "acquisition": header_values(first, SAFE_ATTRIBUTES),
    }
    if not options.deidentify:
        entry["identifiers"] = header_values(first, IDENTIFYING_ATTRIBUTES)
    store.write_series(key, volume, entry)
    return {"series_key": key, "status": "ingested", "shape": list(volume.shape), "quarantine": rows,
            "seconds": time.perf_counter() - t0}


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


def chunk_files(files: list, n_chunks: int) -> list[list]:
    """Split a list into at most ``n_chunks`` contiguous, nearly equal parts (none empty)."""
    n_chunks = max(1, min(n_chunks, len(files)))
    bounds = np.linspace(0, len(files), n_chunks + 1).astype(int)
    return [files[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def scan_source(source: str, store: Store, *, map_fn=None, n_chunks: int = 8) -> dict[str, dict]:
    """Refresh the store's scan index for ``source``: only new or changed files are read.

    Args:
        map_fn: ``map_fn(func, list_of_args) -> list_of_results``, e.g. a Dask client's
            map-and-gather; serial when None.
    """
    listing = list_source(source)
    index = store.scan_index()
    todo = stale_files(listing, index)
    present = {p for p, _, _ in listing}
    index = {p: rec for p, rec in index.items() if p in present}
    if todo:
        secret = store.secret
        chunks = chunk_files(todo, n_chunks)
        args = [(source, chunk, secret) for chunk in chunks]
        results = map_fn(scan_files, args) if map_fn else [scan_files(*a) for a in args]
        for part in results:
            index.update(part)
        store.write_scan_index(index)
    logger.info("scan: %d files, %d new or changed", len(listing), len(todo))
    return index


__all__ = [
    "IngestOptions",
    "ScanResult",
    "SeriesPlan",
    "chunk_files",
    "ingest_series",
    "plan_series",
    "scan_files",
    "scan_source",
    "stale_files",
]
