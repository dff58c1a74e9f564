"""The scan's own header walk gives exactly the records pydicom's reader gives, or leaves the file to it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from storage import dicom
from storage.deid import Pseudonymizer

PSEUDO = Pseudonymizer(b"\x01" * 32)


def _walked(path: Path) -> bool:
    with open(path, "rb") as fp:
        return dicom._walk_file(fp) is not None


def _both_ways(root: Path, relpath: str, monkeypatch) -> tuple[dict, dict]:
    """(the scan record with the walk, the record with pydicom's reader alone)."""
    walked = dicom.scan_file(root, relpath, PSEUDO)
    with monkeypatch.context() as m:
        m.setattr(dicom, "_walk_file", lambda fp: None)
        read = dicom.scan_file(root, relpath, PSEUDO)
    return walked, read


def _compare_folder(root: Path, monkeypatch) -> tuple[int, int]:
    n = n_walked = 0
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        relpath = path.relative_to(root).as_posix()
        walked, read = _both_ways(root, relpath, monkeypatch)
        assert walked == read, relpath
        n += 1
        n_walked += _walked(path)
    return n, n_walked


def test_walked_scan_records_equal_pydicoms_on_every_file_pydicom_ships(pydicom_test_files, monkeypatch):
    n, n_walked = _compare_folder(pydicom_test_files, monkeypatch)
    # 176 files; the others have no preamble, a big-endian or deflated syntax, no pixel data, or a
    # kept sequence of undefined length, and go to pydicom's reader
    assert n > 150 and n_walked >= 75, (n, n_walked)


def test_walked_scan_records_equal_pydicoms_on_a_generated_cohort(small_cohort, monkeypatch):
    n, n_walked = _compare_folder(small_cohort.dicom_dir, monkeypatch)
    assert n_walked >= n * 0.8, (n, n_walked)  # the broken files (truncated, not DICOM) go to pydicom


def _ct(syntax) -> Dataset:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_walk_skips_nested_undefined_length_sequences_and_long_private_data(syntax, tmp_path, monkeypatch):
    ds = _ct(syntax)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator = "113691", "DCM"
    outer = Dataset()
    outer.ReferencedSOPInstanceUID = "1.2.3.4"
    outer.PurposeOfReferenceCodeSequence = Sequence([inner, inner])
    ds.SourceImageSequence = Sequence([outer, Dataset()])  # written with undefined lengths by pydicom
    block = ds.private_block(0x0029, "MEDFLOW TEST", create=True)
    block.add_new(0x10, "OB", bytes(range(256)) * 400)  # 100 KiB: the header outgrows the first read
    ds.PatientID = "PAT 123  "
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    raw = (tmp_path / "a.dcm").read_bytes()
    assert b"\xff\xff\xff\xff" in raw[: raw.index(b"\xe0\x7f\x10\x00")]  # an undefined length was written

    assert _walked(tmp_path / "a.dcm")
    walked, read = _both_ways(tmp_path, "a.dcm", monkeypatch)
    assert walked == read
    assert walked["raw"]["offset"] == raw.index(b"\xe0\x7f\x10\x00") + (12 if syntax == ExplicitVRLittleEndian else 8)
    assert np.array_equal(dicom.read_raw(tmp_path / "a.dcm", walked["raw"]), ds.pixel_array)


def test_a_file_cut_inside_its_header_goes_to_pydicom_and_gets_its_reason(tmp_path, monkeypatch):
    src = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    raw = src.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: raw.index(b"\xe0\x7f\x10\x00") - 40])
    assert not _walked(tmp_path / "cut.dcm")
    walked, read = _both_ways(tmp_path, "cut.dcm", monkeypatch)
    assert walked == read and "reason" in walked


def test_explicit_vr_data_under_an_implicit_syntax_is_left_to_pydicom(tmp_path, monkeypatch):
    ds = _ct(ExplicitVRLittleEndian)
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    data = bytearray((tmp_path / "x.dcm").read_bytes())
    explicit, implicit = str(ExplicitVRLittleEndian).encode(), str(ImplicitVRLittleEndian).encode()
    at = data.index(explicit)
    data[at:at + len(explicit)] = implicit + b"\x00" * (len(explicit) - len(implicit))  # same length
    (tmp_path / "x.dcm").write_bytes(bytes(data))
    assert not _walked(tmp_path / "x.dcm")
    walked, read = _both_ways(tmp_path, "x.dcm", monkeypatch)
    assert walked == read and "series_key" in walked


def test_a_non_ascii_patient_id_is_read_by_pydicom_in_the_files_character_set(tmp_path, monkeypatch):
    ds = _ct(ExplicitVRLittleEndian)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientID = "Müller-7"
    ds.save_as(tmp_path / "l1.dcm", enforce_file_format=True)
    shutil.copy(tmp_path / "l1.dcm", tmp_path / "l1b.dcm")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.save_as(tmp_path / "u8.dcm", enforce_file_format=True)
    records = {}
    for name in ("l1.dcm", "u8.dcm"):
        assert _walked(tmp_path / name)
        walked, read = _both_ways(tmp_path, name, monkeypatch)
        assert walked == read
        records[name] = walked
    # the same name in two character sets is the same patient
    assert records["l1.dcm"]["patient_key"] == records["u8.dcm"]["patient_key"]
    assert records["l1.dcm"]["patient_key"] == PSEUDO.patient_key("Müller-7")
