"""Helpers for tests: a serial ingest and hand-made DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from storage.ingest import (
    IngestOptions,
    ingest_series,
    nifti_mask_files,
    plan_series,
    read_marks_table,
    scan_source,
    source_index,
    with_paths,
)
from storage.store import Store


def ingest_serial(source, store_root, options: IngestOptions | None = None, nifti: dict | None = None) -> dict:
    """Scan, plan and ingest without Prefect or Dask; returns a summary.

    ``nifti``: keyword arguments of ``nifti_mask_files`` (table, key, key_column, path_column).
    ``options.marks == "csv"``: the marks come from ``options.marks_table``.
    """
    options = options or IngestOptions()
    store = Store(store_root)
    index = scan_source(str(source), store)
    pseudo = store.pseudonymizer()
    nifti_masks = nifti_mask_files(**nifti, pseudo=pseudo, index=index) if nifti else None
    marks = read_marks_table(options.marks_table, pseudo) if options.marks == "csv" else {}
    plan = plan_series(index, pseudo=pseudo, catalog=store.catalog(), previous_quarantine=store.quarantine(),
                       options=options, nifti_masks=nifti_masks, **marks)
    results = [ingest_series(str(store.root), str(source), p, options) for p in plan.todo]
    rows = list(plan.quarantine) + [r for res in results for r in res["quarantine"]]
    store.write_quarantine(rows)
    return {"plan": plan, "results": results, "store": store, "source": str(source)}


def quarantine(out: dict) -> list[dict]:
    """The quarantine table of an ``ingest_serial`` result, each row with its file's ``path``."""
    return with_paths(out["store"].quarantine(), out["store"], out["source"])


def quarantine_reasons(out: dict) -> dict[str, str]:
    """Path -> quarantine reason of an ``ingest_serial`` result."""
    return {row["path"]: row["reason"] for row in quarantine(out)}


def ingested_files(store: Store, source) -> set[str]:
    """Source files that are part of a series (or are a planar image or a waveform) in the store's catalog."""
    catalog = store.catalog()
    keys = set(catalog) | {e["parent"] for e in catalog.values() if "parent" in e}  # parts name their series
    out = set()
    for path, rec in source_index(store, str(source)).items():
        if rec.get("series_key") in keys or any(prefix + rec.get("sop_key", "")[:15] in keys for prefix in "iw"):
            out.add(path)
        elif rec.get("marks_for") in keys or rec.get("mask_for") in keys:  # an SR or SEG used for a stored series
            out.add(path)
    return out


def unaccounted(store: Store, source) -> set[str]:
    """Entries of ``source`` (files, and what could not be listed) neither in a stored series nor in
    the quarantine table."""
    from storage.dicom import list_source

    problems: list = []
    listed = {p for p, _, _ in list_source(source, problems)} | {p for p, _ in problems}
    quarantined = {r["path"] for r in with_paths(store.quarantine(), store, str(source))}
    return listed - ingested_files(store, source) - quarantined


def new_instance(sop_class: str) -> Dataset:
    """An empty dataset with file meta for a new instance of ``sop_class`` (explicit VR little endian)."""
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    return ds


def write_ct_series(folder: Path, volume_stored: np.ndarray, *, positions, orientation=(1, 0, 0, 0, 1, 0),
                    pixel_spacing=(0.8, 0.7), slope=1.0, intercept=-1024.0, instance_numbers=None,
                    names=None, slice_thickness=None, series_uid=None) -> list[Path]:
    """Write one CT slice per entry of ``positions``; ``volume_stored[k]`` goes with ``positions[k]``."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_of_reference = generate_uid(), generate_uid()
    paths = []
    for k, pos in enumerate(positions):
        ds = new_instance(CTImageStorage)
        ds.PatientID, ds.PatientName = "TESTPID", "TEST^PATIENT"
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName = "", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "120000", "1", ""
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality = "CT"
        ds.Rows, ds.Columns = volume_stored.shape[1:]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_thickness or 1.0
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.InstanceNumber = (instance_numbers or list(range(1, len(positions) + 1)))[k]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = volume_stored[k].astype(np.uint16).tobytes()
        path = folder / ((names[k]) if names else f"{k:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def study_uids(store: Store, source) -> dict[str, str]:
    """Series key -> the StudyInstanceUID of its source files (read back from the files: the store
    holds pseudonyms only), to compare what two stores with different secrets did."""
    import pydicom

    out = {}
    for path, rec in source_index(store, str(source)).items():
        key = rec.get("series_key")
        if key and key not in out:
            out[key] = str(pydicom.dcmread(Path(source) / path, stop_before_pixels=True).StudyInstanceUID)
    return out


def report_in_browser(report: Path, screenshot: Path, width: int = 1280) -> dict:
    """Open a run's ``report.html`` in Debian's chromium at ``width`` pixels, as a reader does; save a full-page
    screenshot; return the page's ``scroll_width``, ``client_width``, its visible ``text``, the ``headings`` and
    the images that did not load (``broken``)."""
    import shutil

    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        raise RuntimeError("Debian's chromium is needed for browser tests: apt-get install -y chromium "
                           "(.ci/run does this)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu",
                                                                     "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(Path(report).resolve().as_uri())
            page.wait_for_load_state("load")
            out = page.evaluate("""() => ({
                scroll_width: document.documentElement.scrollWidth,
                client_width: document.documentElement.clientWidth,
                text: document.body.innerText,
                headings: [...document.querySelectorAll('h2')].map(h => h.innerText),
                broken: [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
                wide: [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right >
                      document.documentElement.clientWidth + 1).map(e => e.tagName + (e.id ? '#' + e.id : '')
                      + (e.alt ? '[' + e.alt + ']' : '')).slice(0, 10),
            })""")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return out


COLLAPSED = r"\b(\d\.\d{3}) – \1\b"  # an "interval" that is a point


def assert_report_reads_well(report: Path, screenshot: Path, classes: list[str] | None = None) -> dict:
    """The report as a reader sees it at 1280 px: no horizontal scroll, every figure loaded, a table of
    contents, no interval collapsed to a point, and the class names (not 0/1) where classes are named."""
    import re

    page = report_in_browser(report, screenshot)
    assert page["scroll_width"] <= page["client_width"], f"horizontal scroll: {page['wide']}"
    assert not page["broken"], page["broken"]
    assert page["text"].count("Contents") >= 1 and len(page["headings"]) >= 4, page["headings"]
    collapsed = re.findall(COLLAPSED, page["text"])
    assert not collapsed, f"intervals that are points: {collapsed}"
    for name in classes or []:
        assert re.search(rf"\b{re.escape(name)}\b", page["text"]), f"class {name!r} not named in the report"
    return page
