"""The direct pixel read (offset kept by the header scan) gives exactly what pydicom decodes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest

from medflow.splitting import _is_number
from storage.dicom import SCAN_READ_TAGS, ScanHeader, raw_pixel_header, read_raw, rescale_frame, to_physical
from storage.errors import UnreadableFileError
from storage.ingest import IngestOptions, ingest_series, plan_series, scan_source
from storage.store import Store


def test_raw_read_equals_pydicom_on_every_eligible_file_pydicom_ships(pydicom_test_files):
    checked = 0
    for path in sorted(pydicom_test_files.rglob("*")):
        if not path.is_file():
            continue
        try:
            with open(path, "rb") as fp:
                head_ds = pydicom.dcmread(fp, stop_before_pixels=True)
                header = raw_pixel_header(head_ds, fp.tell(), fp.read(12))
            full = pydicom.dcmread(path)
            expected = full.pixel_array
        except Exception:
            continue
        if header is None:
            continue
        raw = read_raw(path, header)
        np.testing.assert_array_equal(raw, expected, err_msg=path.name)
        physical = rescale_frame(raw, slope=float(header.get("RescaleSlope", 1) or 1),
                                 intercept=float(header.get("RescaleIntercept", 0) or 0), bits=header["bits"],
                                 photometric=header["photometric"])
        np.testing.assert_array_equal(physical, to_physical(full), err_msg=path.name)
        checked += 1
    assert checked >= 20  # CT_small, MR_small and more: explicit and implicit VR little endian


def test_a_truncated_file_is_an_unreadable_file(tmp_path, pydicom_test_files):
    src = pydicom_test_files / "CT_small.dcm"
    with open(src, "rb") as fp:
        header = raw_pixel_header(pydicom.dcmread(fp, stop_before_pixels=True), fp.tell(), fp.read(12))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(src.read_bytes()[:-1000])
    with pytest.raises(UnreadableFileError, match="ends after"):
        read_raw(cut, header)


def test_ingest_with_direct_reads_equals_ingest_with_full_parses(small_cohort, tmp_path):
    options = IngestOptions(min_slices=8)
    stores = {}
    for name, direct in (("direct", True), ("parsed", False)):
        store = Store(tmp_path / f"{name}.zarr")
        index = scan_source(str(small_cohort.dicom_dir), store)
        plan = plan_series(index, pseudo=store.pseudonymizer(), catalog={}, previous_quarantine=[], options=options)
        assert all(p.raw for p in plan.todo)  # synthetic CT: every file qualifies
        for p in plan.todo:
            ingest_series(str(store.root), str(small_cohort.dicom_dir), p if direct else dataclasses.replace(p, raw=None),
                          options)
        stores[name] = store
    direct, parsed = stores["direct"].catalog(), stores["parsed"].catalog()
    # the same secret is not shared, so compare by position in key order of equal-shaped series
    assert len(direct) == len(parsed) > 0
    by_digestless = lambda cat: sorted((e["shape"], e["spacing"], e["origin"]) for e in cat.values())  # noqa: E731
    assert by_digestless(direct) == by_digestless(parsed)
    volumes = lambda s: sorted((tuple(s.catalog_entry(k)["origin"]), s.read_image(k).tobytes()) for k in s.catalog())  # noqa: E731
    assert volumes(stores["direct"]) == volumes(stores["parsed"])
    strip = lambda e: {k: v for k, v in e.items() if not k.endswith("_key") and k != "digest"}  # noqa: E731
    assert sorted(map(str, map(strip, direct.values()))) == sorted(map(str, map(strip, parsed.values())))


def _as_plain(value):
    """pydicom's value as the scan's fast reader returns it: str, int, float or a list of floats."""
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [_as_plain(v) if isinstance(v, str) and not _is_number(v) else float(v) for v in value]
    if isinstance(value, (float, pydicom.valuerep.DSdecimal)):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def test_fast_header_values_equal_pydicoms_on_every_file_pydicom_ships(pydicom_test_files):
    compared = 0
    for path in sorted(pydicom_test_files.rglob("*")):
        if not path.is_file():
            continue
        try:
            fast = ScanHeader(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=SCAN_READ_TAGS))
            slow = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=SCAN_READ_TAGS)
        except Exception:
            continue
        for keyword in SCAN_READ_TAGS:
            try:
                expected = slow.get(keyword)
            except Exception:
                continue  # a value pydicom cannot read is not compared
            if expected is None or isinstance(expected, pydicom.Sequence):
                continue
            got = fast.get(keyword)
            assert _as_plain(got) == _as_plain(expected), (path.name, keyword, got, expected)
            compared += 1
    assert compared > 1000  # every scanned keyword of ~100 files, explicit and implicit VR, both byte orders


def test_series_are_read_into_one_buffer_and_stored_from_it(small_cohort, tmp_path, monkeypatch):
    from storage import ingest as ingest_module

    taken = []
    original = ingest_module._RawBlock.volume

    def spy(self, slots):
        volume = original(self, slots)
        taken.append(volume is not None and np.shares_memory(volume, self.stored))
        return volume

    monkeypatch.setattr(ingest_module._RawBlock, "volume", spy)
    store = Store(tmp_path / "s.zarr")
    options = IngestOptions(min_slices=8)
    index = scan_source(str(small_cohort.dicom_dir), store)
    plan = plan_series(index, pseudo=store.pseudonymizer(), catalog={}, previous_quarantine=[], options=options)
    for p in plan.todo:
        ingest_series(str(store.root), str(small_cohort.dicom_dir), p, options)
    # the cohort's series with slope 1 and 12-bit values were stored straight from their buffers
    # (the others have slope 2: float rescale, per-slice arrays)
    assert taken and all(taken), taken


def test_a_file_truncated_after_the_scan_is_rejected_and_the_series_goes_on(small_cohort, tmp_path):
    import shutil

    source = tmp_path / "dicom"
    shutil.copytree(small_cohort.dicom_dir, source)
    store = Store(tmp_path / "s.zarr")
    options = IngestOptions(min_slices=8, qc_spacing="accept")
    index = scan_source(str(source), store)
    plan = plan_series(index, pseudo=store.pseudonymizer(), catalog={}, previous_quarantine=[], options=options)
    series = max(plan.todo, key=lambda p: len(p.files))
    ordered = sorted(series.files, key=lambda f: series.raw[f]["ImagePositionPatient"][2])
    victim = source / ordered[len(ordered) // 2]  # a slice in the middle of the stack
    victim.write_bytes(victim.read_bytes()[:-100])
    result = ingest_series(str(store.root), str(source), series, options)
    assert result["status"] == "ingested"
    assert [(r["path"], "ends after" in r["reason"]) for r in result["quarantine"]] == [(ordered[len(ordered) // 2], True)]
    entry = store.catalog_entry(series.series_key)
    assert entry["shape"][0] == len(ordered)  # the gap was filled by resampling (qc.spacing: accept)
    assert entry["qc"]["missing_slices"] == 1


@pytest.mark.parametrize("keyword, value", [("ImageOrientationPatient", [1, 0, 0, 0, 1]),
                                            ("ImagePositionPatient", [0, 0]), ("PixelSpacing", [0.5, 0.5, 1])])
def test_malformed_geometry_is_left_to_the_full_read(keyword, value, tmp_path):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    with open(pydicom.data.get_testdata_file("CT_small.dcm"), "rb") as fp:
        pydicom.dcmread(fp, stop_before_pixels=True)
        at, head = fp.tell(), fp.read(12)
    assert raw_pixel_header(ds, at, head) is not None
    setattr(ds, keyword, value)
    assert raw_pixel_header(ds, at, head) is None
