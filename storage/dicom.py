"""DICOM reading: header scan, slice geometry, pixels in physical units.

Volumes are ``(Z, Y, X)`` arrays; axis 0 runs along the slice normal, axis 1 down the rows
(the column direction cosine of ImageOrientationPatient), axis 2 along a row (the row
direction cosine).
"""

from __future__ import annotations

import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pydicom.pixels import apply_rescale
from pydicom.tag import BaseTag, Tag
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from storage.deid import Pseudonymizer
from storage.errors import InvalidSeriesError, SourceError, UnreadableFileError, reason_for
from storage.marks import SR_CLASSES, MarksError, read_sr
from storage.masks import SEG_SOP_CLASS

logger = logging.getLogger(__name__)


class ScrubQuotedValues(logging.Filter):
    """pydicom's messages quote header values ("Invalid value for VR UI: '1.2.840...'"): a UID or a
    name would reach the logs and the Prefect UI. Quoted values become '…'.

    >>> r = logging.LogRecord("pydicom", 30, "", 0, "Invalid value for VR UI: '1.2.3'. See %s", ("x",), None)
    >>> ScrubQuotedValues().filter(r), r.getMessage()
    (True, "Invalid value for VR UI: '…'. See x")
    """

    _QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._QUOTED.sub("'…'", str(record.msg))
        record.args = tuple(self._QUOTED.sub("'…'", a) if isinstance(a, str) else a for a in record.args or ())
        return True


def _quiet_pydicom() -> None:
    # ingest checks every value it uses and quarantines with the reason; pydicom's own validation of
    # values it reads only repeats them in warnings that quote the value
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom_logger = logging.getLogger("pydicom")
    if not any(isinstance(f, ScrubQuotedValues) for f in pydicom_logger.filters):
        pydicom_logger.addFilter(ScrubQuotedValues())
    warnings.filterwarnings("ignore", module="pydicom")  # the same messages, logged (scrubbed) as well


_quiet_pydicom()

# Header attributes read by the scan (pixels are skipped).
SCAN_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "AccessionNumber",
    "Modality",
    "Rows",
    "Columns",
    "NumberOfFrames",
]


# Everything the scan looks at (``scan_file``, ``raw_pixel_header``); other elements are skipped unread
# (the scan is about 25% faster than with every element parsed).
SCAN_READ_TAGS = [*SCAN_TAGS, "ImageType", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                  "PixelRepresentation", "ModalityLUTSequence", "ImagePositionPatient", "ImageOrientationPatient",
                  "PixelSpacing", "InstanceNumber", "RescaleSlope", "RescaleIntercept", "ReferencedSeriesSequence"]
# as tags: pydicom otherwise turns each keyword into a tag on every read (scan 0.47 -> 0.43 ms a file)
_SCAN_READ_TAGS = [Tag(keyword) for keyword in SCAN_READ_TAGS]
_WALK_TAGS = frozenset(int(t) for t in [*_SCAN_READ_TAGS, Tag("SpecificCharacterSet")])


OUTSIDE = ("symbolic link to outside the folders allowed for runs started through the API (medflow serve --allow): "
           "not followed")


def list_source(root: str | Path, problems: list[tuple[str, str]] | None = None) -> list[tuple[str, int, int]]:
    """Every regular file under ``root`` as ``(relative path, size, mtime_ns)``, sorted; hidden entries skipped.

    Symbolic links are followed, each real folder once. What cannot be listed (an unreadable
    folder, a link loop or a dangling link, a FIFO, socket or device) is appended to
    ``problems`` as ``(relative path, reason)``: one entry never stops the listing.

    Raises:
        SourceError: ``root`` is missing or not a folder.
    """
    from medflow.access import check_allowed, is_inside, restricted

    check_allowed(root, "data.source")
    confined = restricted()  # under medflow serve: a link may not lead out of the allowed folders
    root = Path(root)
    if not root.exists():
        raise SourceError(f"data.source {str(root)!r} does not exist")
    if not root.is_dir():
        raise SourceError(f"data.source {str(root)!r} is not a folder")
    problems = problems if problems is not None else []
    out = []
    seen = {_identity(root)}
    folders = [(str(root), "")]
    while folders:  # os.scandir: one stat per file, no Path objects (1600 files: 0.035 -> 0.01 s)
        folder, prefix = folders.pop()
        try:
            with os.scandir(folder) as entries:
                entries = list(entries)
        except OSError as exc:
            problems.append((prefix.rstrip("/") or ".", f"folder not readable: {type(exc).__name__}: "
                             f"{os.strerror(exc.errno) if exc.errno else exc}"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            relpath = prefix + entry.name
            try:
                if confined and entry.is_symlink() and not is_inside(entry.path):
                    problems.append((relpath, OUTSIDE))
                    continue
                if entry.is_dir():  # follows links: a linked folder is listed once, a loop is reported
                    identity = _identity(entry)
                    if identity in seen:
                        problems.append((relpath, "symbolic link to a folder already listed (a link loop or a "
                                         "second path to it): not followed"))
                        continue
                    seen.add(identity)
                    folders.append((entry.path, relpath + "/"))
                elif entry.is_file():
                    st = entry.stat()
                    out.append((relpath, st.st_size, st.st_mtime_ns))
                elif entry.is_symlink():
                    problems.append((relpath, "symbolic link to nothing (dangling)"))
                else:
                    problems.append((relpath, f"not a regular file ({file_type(entry.stat().st_mode)})"))
            except OSError as exc:  # ELOOP, EACCES, a file removed while listing
                problems.append((relpath, f"cannot be listed: {type(exc).__name__}: "
                                 f"{os.strerror(exc.errno) if exc.errno else exc}"))
    out.sort()
    problems.sort()
    return out


def printable_path(path):
    """A path as text any file or console takes: bytes of a name that are not UTF-8 (given by ``os`` as
    surrogates) shown as ``\\xNN``; other values unchanged.

    >>> printable_path("a/bad" + bytes([0xff]).decode("utf-8", "surrogateescape") + "name.dcm")
    'a/bad\\\\xffname.dcm'
    """
    if not isinstance(path, str):
        return path
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _identity(entry) -> tuple[int, int]:
    st = entry.stat() if isinstance(entry, os.DirEntry) else os.stat(entry)
    return st.st_dev, st.st_ino


def file_type(mode: int) -> str:
    """What a non-regular file is, from its ``st_mode`` (for a quarantine reason).

    >>> import stat
    >>> file_type(stat.S_IFIFO)
    'FIFO'
    """
    import stat

    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "unknown type"


class ScanHeader:
    """Header values for the scan, parsed straight from the raw bytes where that is trivial.

    pydicom converts a value on first access through its general machinery (validation, value
    representation classes); for the scan's UIDs, codes and numbers that took as long as
    parsing the file (0.35 ms a file of 0.7 ms). UI, CS, US, IS and DS values, and single
    ASCII SH/LO values, are read here from the element's bytes; anything else, and any value
    these simple rules cannot read, goes through pydicom (``Dataset.get``). Tests check both
    give the same values.
    """

    _FAST_VRS = frozenset({"UI", "CS", "US", "IS", "DS", "SH", "LO"})

    def __init__(self, ds: pydicom.Dataset | None = None, *, elements: dict | None = None, syntax: str = ""):
        """From a dataset pydicom read, or from the header walk's raw ``elements`` (by int tag) and
        transfer ``syntax``; then a pydicom Dataset is made only if a value needs pydicom."""
        if ds is not None:
            meta = getattr(ds, "file_meta", None)
            elements = {int(tag): ds.get_item(tag) for tag in ds.keys()}  # raw where pydicom left them so
            syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        self._ds, self._elements, self.syntax = ds, elements, syntax

    @property
    def ds(self) -> pydicom.Dataset:
        if self._ds is None:
            self._ds = Dataset({BaseTag(tag): raw for tag, raw in self._elements.items()})
        return self._ds

    def __contains__(self, keyword: str) -> bool:
        return _tag_of(keyword) in self._elements

    def get(self, keyword: str, default=None):
        tag = _tag_of(keyword)
        raw = self._elements.get(tag)
        if raw is None:
            return default
        if getattr(raw, "is_raw", False) and raw.value is not None:
            vr = raw.VR or dictionary_VR(tag)
            if vr in self._FAST_VRS:
                try:
                    return _fast_value(vr, raw.value, raw.is_little_endian)
                except (ValueError, UnicodeDecodeError):
                    pass  # let pydicom read it (and complain in its own words)
        return self.ds.get(keyword, default)


_KEYWORD_TAGS: dict[str, int] = {}


def _tag_of(keyword: str) -> int | None:
    tag = _KEYWORD_TAGS.get(keyword)
    if tag is None:
        tag = _KEYWORD_TAGS[keyword] = tag_for_keyword(keyword)
    return tag


def _fast_value(vr: str, value: bytes, little_endian: bool):
    """A UI/CS/SH/LO (str), US/IS (int) or DS (float, or list of floats when multi-valued) value;
    "" if empty. UIDs come back as plain strings (equal to pydicom's ``UID``)."""
    if vr == "US":
        if len(value) != 2:
            raise ValueError("not one US value")
        return int.from_bytes(value, "little" if little_endian else "big")
    if vr in ("SH", "LO"):  # text in the file's character set: plain ASCII only (no escape sequences)
        if not value.isascii() or b"\x1b" in value or b"\\" in value:
            raise ValueError("not one ASCII value")
        return value.decode("ascii").rstrip("\x00 ")
    text = value.decode("ascii").strip(" \x00")
    if vr in ("UI", "CS"):
        if "\\" in text:
            raise ValueError("multi-valued")
        return text
    if not text:
        return ""
    if vr == "IS":
        return int(text)
    parts = text.split("\\")
    return float(parts[0]) if len(parts) == 1 else [float(v) for v in parts]


# The scan's header walk. pydicom's reader spends about 9 µs an element in its general element
# generator (file tells, Tag objects, deferred reads), most of a CT file's scan time. The
# scan needs only where ~25 top-level elements are, so it walks the first bytes of a file
# itself (struct on one buffer) and hands those elements to pydicom as the raw elements its
# reader would have made: values are still converted by pydicom. Anything outside the plain
# cases (no preamble, big-endian or deflated syntax, a VR that does not match the syntax, an
# undefined-length element it would have to keep, a file that ends before its pixels) goes
# to ``pydicom.dcmread`` instead. Tests compare both on every file pydicom ships.
_EXPLICIT_LONG = frozenset(vr.value.encode() for vr in EXPLICIT_VR_LENGTH_32)
_EXPLICIT_SHORT = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2) - _EXPLICIT_LONG
_PIXEL_TAG_INTS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
_WALKED_SYNTAXES_NOT = ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")  # big endian, deflated
_HH = struct.Struct("<HH").unpack_from
_HHI = struct.Struct("<HHI").unpack_from
_H = struct.Struct("<H").unpack_from
_I = struct.Struct("<I").unpack_from
_UNDEFINED = 0xFFFFFFFF
_FIRST_READ = 16384


class _Fallback(Exception):
    """The walk met something it leaves to pydicom."""


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """``(tag, VR or None, value start, value length)`` of the element whose header is at ``pos``."""
    group, elem = _HH(buf, pos)
    if implicit:
        return group << 16 | elem, None, pos + 8, _I(buf, pos + 4)[0]
    vr = buf[pos + 4:pos + 6]
    if vr in _EXPLICIT_SHORT:
        return group << 16 | elem, vr, pos + 8, _H(buf, pos + 6)[0]
    if vr in _EXPLICIT_LONG:
        return group << 16 | elem, vr, pos + 12, _I(buf, pos + 8)[0]
    raise _Fallback


def _skip_sequence(buf: bytes, pos: int, implicit: bool) -> int:
    """The position after an undefined-length sequence whose first item (or delimiter) is at ``pos``."""
    while True:
        group, elem, length = _HHI(buf, pos)
        pos += 8
        if group != 0xFFFE:
            raise _Fallback
        if elem == 0xE0DD:  # sequence delimitation item
            return pos
        if elem != 0xE000:
            raise _Fallback
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an undefined-length item: its elements, up to the item delimiter
            group, elem = _HH(buf, pos)
            if group == 0xFFFE and elem == 0xE00D:
                pos += 8
                break
            _, vr, start, length = _element(buf, pos, implicit)
            if length == _UNDEFINED and vr not in (None, b"SQ"):
                raise _Fallback
            pos = _skip_sequence(buf, start, implicit) if length == _UNDEFINED else start + length


def _walk(buf: bytes, pos: int, implicit: bool, keep: frozenset) -> tuple[dict, int]:
    """Index the top-level elements from ``pos`` up to the pixel data: ``({tag: RawDataElement}
    for tags in keep, position of the pixel data element)``. struct.error: ``buf`` ended first."""
    elements = {}
    last = -1
    while True:
        tag, vr, start, length = _element(buf, pos, implicit)
        if tag in _PIXEL_TAG_INTS:
            return elements, pos
        if tag <= last or tag >> 16 in (0x0002, 0xFFFE):  # out of order, or not a dataset element
            raise _Fallback
        last = tag
        if length == _UNDEFINED:
            if tag in keep or vr not in (None, b"SQ"):
                raise _Fallback
            pos = _skip_sequence(buf, start, implicit)
            continue
        end = start + length
        if tag in keep:
            if end > len(buf):
                raise struct.error("value beyond the buffer")
            elements[tag] = RawDataElement(BaseTag(tag), vr.decode() if vr else None, length, buf[start:end],
                                           start, implicit, True)
        pos = end


def _walk_file(fp) -> tuple[ScanHeader, int, bytes] | None:
    """The scan's header, pixel data position and the 12 bytes there, from the header walk; None
    where the walk leaves the file to pydicom."""
    size = _FIRST_READ
    while True:
        fp.seek(0)
        buf = fp.read(size)
        if buf[128:132] != b"DICM":
            return None
        try:
            syntax, pos = None, 132
            while _HH(buf, pos)[0] == 0x0002:  # the file meta group: explicit VR little endian
                tag, vr, start, length = _element(buf, pos, False)
                if length == _UNDEFINED:
                    raise _Fallback
                if start + length > len(buf):
                    raise struct.error("value beyond the buffer")
                if tag == 0x00020010:
                    syntax = _fast_value("UI", buf[start:start + length], True)
                pos = start + length
            if not syntax or syntax in _WALKED_SYNTAXES_NOT:
                return None
            implicit = syntax == "1.2.840.10008.1.2"
            if implicit and all(0x40 < c < 0x5B for c in buf[pos + 4:pos + 6]):
                return None  # what pydicom's reader takes for explicit VR under an implicit syntax
            elements, pixel_at = _walk(buf, pos, implicit, _WALK_TAGS)
            pixel_head = buf[pixel_at:pixel_at + 12]
            if len(pixel_head) < 12:
                raise struct.error("pixel data header beyond the buffer")
        except (_Fallback, ValueError, UnicodeDecodeError):  # not a walk's case, or an unreadable syntax UID
            return None
        except struct.error:
            if len(buf) < size:  # the whole file was read: it ends before its pixel data
                return None
            size *= 4
            continue
        return ScanHeader(elements=elements, syntax=syntax), pixel_at, pixel_head


def scan_file(root: str | Path, relpath: str, pseudo: Pseudonymizer) -> dict:
    """Read one file's header and return a pseudonymous record.

    The record has ``series_key``, ``patient_key``, ``study_key``, ``accession_key``,
    ``sop_key`` and ``modality``, or ``reason`` when the file cannot be used. Never raises:
    whatever one file does (pydicom raises many types on damaged files) becomes its
    ``reason``; an I/O failure also sets ``retry``, so that the next scan reads it again.
    No UID or identifier leaves this function.
    """
    path = Path(root) / relpath
    try:
        return _scan(path, relpath, pseudo)
    except InvalidDicomError as exc:
        return {"reason": f"not a DICOM file ({reason_for(exc)})".replace(str(path), "the file")}
    except Exception as exc:
        record = {"reason": f"unreadable DICOM header: {reason_for(exc)}".replace(str(path), "the file")}
        if isinstance(exc, OSError):
            record["retry"] = True
        return record


def _scan(path: Path, relpath: str, pseudo: Pseudonymizer) -> dict:
    with open(path, "rb") as fp:
        walked = _walk_file(fp)
        if walked is not None:
            header, pixel_at, pixel_head = walked
        else:
            fp.seek(0)
            header = ScanHeader(pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_SCAN_READ_TAGS))
            pixel_at = fp.tell()  # the reader stops at the pixel data element's tag
            pixel_head = fp.read(12)
            if header.syntax == DEFLATED:  # the file position is in the compressed stream: look in the dataset
                fp.seek(0)
                inflated = pydicom.dcmread(fp, specific_tags=[Tag(0x7FE0, 0x0010)])
                pixel_head = PIXEL_TAGS[0] if "PixelData" in inflated else b""
    try:
        series_uid = str(header.get("SeriesInstanceUID", "") or "")
        sop_class = header.get("SOPClassUID", None)
        if not series_uid and pixel_head[:4] in PIXEL_TAGS:
            return {"reason": "no SeriesInstanceUID"}
        if pixel_head[:4] not in PIXEL_TAGS:
            if str(sop_class).startswith(WAVEFORM_CLASSES) and series_uid:  # an ECG: channels, not pixels
                return {**_scan_record(header, relpath, series_uid, pseudo), "waveform": True, "planar": False,
                        "pixels": 0}
            if str(sop_class) in SR_CLASSES and series_uid:  # lesion marks for an image series
                return _sr_record(path, header, relpath, series_uid, pseudo)
            sop_name = UID(str(sop_class)).name if sop_class else "unknown SOP class"
            return {"reason": f"no pixel data ({sop_name})"}
        if str(sop_class) == SEG_SOP_CLASS:
            return _seg_record(header, relpath, series_uid, pseudo)
        record = _scan_record(header, relpath, series_uid, pseudo)
        implausible = _implausible_size(header, record["pixels"], path.stat().st_size)
        if implausible:
            return {"reason": implausible}
        raw = None if record.get("mosaic") else raw_pixel_header(header, pixel_at, pixel_head)
        if raw is not None:
            record["raw"] = raw
        return record
    except Exception as exc:  # a malformed header value (any type: pydicom converts values lazily)
        return {"reason": f"invalid header value: {reason_for(exc)}"}


# Decoded bytes a compressed file may expand to, per byte of file: far above any real codec's ratio on
# images (lossless 2-4, lossy up to ~50), low enough that a damaged size is caught at the scan.
MAX_EXPANSION = 1000


def _implausible_size(ds: ScanHeader, pixels: int, file_size: int) -> str | None:
    """Why the header's image size cannot be true of this file, or None. A damaged Rows, Columns,
    NumberOfFrames or BitsAllocated would otherwise be planned (and its memory reserved) as a
    volume of that size."""
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    claimed = pixels * max(allocated, 1) // 8
    native = ds.syntax in (*NATIVE_SYNTAXES, "1.2.840.10008.1.2.2")
    limit = file_size if native else MAX_EXPANSION * file_size
    if claimed > limit:
        return (f"damaged header: Rows, Columns, NumberOfFrames and BitsAllocated claim {claimed} bytes of pixel "
                f"data, the file has {file_size} bytes{'' if native else ' (compressed)'}")
    return None


def _seg_record(ds: ScanHeader, relpath: str, series_uid: str, pseudo: Pseudonymizer) -> dict:
    """A DICOM SEG: a mask for the series it references, not an image series of its own."""
    referenced = [str(item.get("SeriesInstanceUID", "")) for item in ds.get("ReferencedSeriesSequence", [])]
    referenced = [uid for uid in referenced if uid]
    if len(referenced) != 1:
        return {"reason": f"DICOM SEG references {len(referenced)} series (ReferencedSeriesSequence); expected 1"}
    return {
        "series_key": pseudo.series_key(series_uid),
        "mask_for": pseudo.series_key(referenced[0]),
        "patient_key": pseudo.patient_key(str(ds.get("PatientID", "") or "")),
        "study_key": pseudo.study_key(str(ds.get("StudyInstanceUID", "") or "")),
        "sop_key": pseudo.key(str(ds.get("SOPInstanceUID", "") or relpath), kind="sop"),
        "modality": "SEG",
        "pixels": 0,
    }


def _sr_record(path: Path, ds: ScanHeader, relpath: str, series_uid: str, pseudo: Pseudonymizer) -> dict:
    """A DICOM SR with lesion marks (TID 1500, 3D coordinates) for the one series it references."""
    try:
        report = read_sr(path)
    except MarksError as exc:
        return {"reason": str(exc)}
    if len(report["series"]) != 1:
        return {"reason": f"DICOM SR references {len(report['series'])} series (evidence sequences); expected 1"}
    # no UID in the scan index: an image region names its instance, a 3D region its frame of reference, by key
    marks = [{k: v for k, v in m.items() if k not in ("sop_uid", "frame_of_reference")}
             | ({"sop_key": pseudo.key(m["sop_uid"], kind="sop")} if "sop_uid" in m else {})
             | ({"frame_key": pseudo.key(m["frame_of_reference"], kind="frame")} if m.get("frame_of_reference") else {})
             for m in report["marks"]]
    return {
        "series_key": pseudo.series_key(series_uid),
        "marks_for": pseudo.series_key(report["series"][0]),
        "marks": marks,  # no UID: an image region names its instance by its pseudonymous key
        "patient_key": pseudo.patient_key(str(ds.get("PatientID", "") or "")),
        "study_key": pseudo.study_key(str(ds.get("StudyInstanceUID", "") or "")),
        "sop_key": pseudo.key(str(ds.get("SOPInstanceUID", "") or relpath), kind="sop"),
        "modality": "SR",
        "pixels": 0,
    }


def _scan_record(ds: ScanHeader, relpath: str, series_uid: str, pseudo: Pseudonymizer) -> dict:
    record = {
        "series_key": pseudo.series_key(series_uid),
        "patient_key": pseudo.patient_key(str(ds.get("PatientID", "") or "")),
        "study_key": pseudo.study_key(str(ds.get("StudyInstanceUID", "") or "")),
        "accession_key": pseudo.accession_key(str(ds.get("AccessionNumber", "") or "")),
        "sop_key": pseudo.key(str(ds.get("SOPInstanceUID", "") or relpath), kind="sop"),
        "modality": str(ds.get("Modality", "") or "OT"),
        # decoded size, for memory-aware scheduling
        "pixels": int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
        * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.get("SamplesPerPixel", 1) or 1),
        # no patient-space position: a projection or secondary-capture image, ingested on its own
        "planar": int(ds.get("NumberOfFrames", 1) or 1) <= 1
        and ("ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds),
    }
    if is_mosaic(ds):
        record["mosaic"] = True  # many slices in one frame: read in full and unpacked, never raw
    return record


def is_mosaic(ds) -> bool:
    """A Siemens mosaic: ImageType has MOSAIC (many slices tiled in one frame)."""
    value = ds.get("ImageType", None)
    values = [value] if isinstance(value, str) else list(value or [])
    return any(str(v).strip().upper() == "MOSAIC" for v in values) or "\\MOSAIC" in str(value).upper()


# Pixel data tags (PixelData, FloatPixelData, DoubleFloatPixelData) as they appear in a file, little and big endian.
PIXEL_TAGS = (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00",
              b"\x7f\xe0\x00\x10", b"\x7f\xe0\x00\x08", b"\x7f\xe0\x00\x09")
# Waveform storage SOP classes (12-lead, general and ambulatory ECG, hemodynamic, ...): PS3.4 B.5
WAVEFORM_CLASSES = "1.2.840.10008.5.1.4.1.1.9."
DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zlib-compressed
# Native (uncompressed) little-endian transfer syntaxes: pixels can be read straight from the file.
NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
# Per-slice header values a raw read needs; geometry and rescale only (nothing identifying).
RAW_KEYWORDS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
                "RescaleSlope", "RescaleIntercept")


def raw_pixel_header(ds: pydicom.Dataset | ScanHeader, pixel_at: int, pixel_head: bytes) -> dict | None:
    """Where a plain single-frame greyscale image keeps its pixels, and the header values to use them.

    ``ds`` was read with ``stop_before_pixels`` from an open file, ``pixel_at`` is where the
    reader stopped and ``pixel_head`` the 12 bytes there: the pixel data element's header,
    whose tag and length are checked here. For native little-endian files with one frame, one
    sample, 8 or 16 bits allocated (and, for signed data, all bits stored), no modality LUT and
    a patient position, returns ``{"offset", "dtype", "rows", "columns", "bits", "photometric",
    <RAW_KEYWORDS>}``; else None. Ingest then reads the pixels with one ``readinto``
    instead of parsing the whole file again.
    """
    ds = ds if isinstance(ds, ScanHeader) else ScanHeader(ds)
    syntax = ds.syntax
    if syntax not in NATIVE_SYNTAXES:
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    if "ModalityLUTSequence" in ds or any(k not in ds for k in RAW_KEYWORDS[:3]):
        return None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or allocated not in (8, 16) or (signed and stored != allocated):
        return None
    rows, columns = int(ds.get("Rows")), int(ds.get("Columns"))
    expected = rows * columns * allocated // 8
    if len(pixel_head) < 12 or pixel_head[:4] != PIXEL_TAGS[0]:
        return None
    if syntax == "1.2.840.10008.1.2":  # implicit VR: tag, 4-byte length
        length, offset = int.from_bytes(pixel_head[4:8], "little"), pixel_at + 8
    elif pixel_head[4:6] in (b"OW", b"OB"):  # explicit VR: tag, VR, 2 reserved bytes, 4-byte length
        length, offset = int.from_bytes(pixel_head[8:12], "little"), pixel_at + 12
    else:
        return None
    if length not in (expected, expected + expected % 2):  # undefined length (encapsulated) or a mismatch
        return None
    out = {"offset": int(offset), "dtype": ("<i" if signed else "<u") + str(allocated // 8), "rows": rows,
           "columns": columns, "bits": stored or allocated, "photometric": photometric}
    for keyword in RAW_KEYWORDS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        out[keyword] = [float(v) for v in value] if keyword in RAW_KEYWORDS[:3] else (
            int(value) if keyword == "InstanceNumber" else float(value))
    if [len(out.get(k, ())) for k in RAW_KEYWORDS[:3]] != [3, 6, 2]:
        return None  # malformed geometry: the full read reports it
    return out


def read_raw(path: str | Path, header: dict, out: np.ndarray | None = None) -> np.ndarray:
    """The stored pixel values of a file described by ``raw_pixel_header``, shape (rows, columns),
    read into ``out`` when given (an array of that shape and the header's dtype).

    Raises:
        UnreadableFileError: the file is shorter than its pixel data (truncated).
    """
    if out is None:
        out = np.empty((header["rows"], header["columns"]), dtype=header["dtype"])
    try:
        with open(path, "rb") as fp:
            fp.seek(header["offset"])
            n = fp.readinto(out)
    except OSError as exc:
        raise UnreadableFileError(f"cannot read pixel data: {exc}") from exc
    if n != out.nbytes:
        raise UnreadableFileError(f"cannot decode pixel data: the file ends after {n // out.itemsize} of "
                                  f"{out.size} pixels")
    return out


def exact_integer_rescale(signed: bool, bits: int, slope: float, intercept: float) -> type | None:
    """np.int16 or np.int32 if every stored value of ``bits`` bits, times ``slope`` plus ``intercept``,
    is an integer that fits it (slope 1, an integer intercept); else None (a float rescale).

    >>> exact_integer_rescale(False, 12, 1.0, -1024.0), exact_integer_rescale(True, 16, 1.0, -1024.0)
    (<class 'numpy.int16'>, <class 'numpy.int32'>)
    """
    if slope != 1 or not float(intercept).is_integer():
        return None
    lo = (-(2 ** (bits - 1)) if signed else 0) + intercept
    hi = (2 ** (bits - 1) - 1 if signed else 2**bits - 1) + intercept
    return np.int16 if -(2**15) <= lo and hi < 2**15 else np.int32


# ------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Geometry:
    """Where a volume lies in patient space (LPS, mm).

    Attributes:
        order: indices that sort the input slices along the slice normal (one slice: ``(0,)``).
        spacing: (z, y, x) voxel spacing; z measured between slice positions.
        origin: position of voxel (0, 0, 0).
        direction: 3x3, row i is the patient-space direction of array axis i.
        spacing_deviation: largest relative deviation of a slice gap from the median gap.
    """

    order: tuple[int, ...]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, ...], ...]
    spacing_deviation: float


def slice_normal(orientation) -> np.ndarray:
    """Unit normal of the slice plane from ImageOrientationPatient (row cosines × column cosines).

    >>> slice_normal([1, 0, 0, 0, 1, 0]).tolist()
    [0.0, 0.0, 1.0]
    """
    iop = np.asarray(orientation, dtype=float)
    if iop.shape != (6,):
        raise InvalidSeriesError(f"ImageOrientationPatient must have 6 values; received {len(iop)}")
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise InvalidSeriesError("ImageOrientationPatient row and column directions are parallel")
    return n / norm


# Physical limits of the values a stack's geometry is built from: a pixel or slice spacing
# outside them, or direction cosines that are not unit and orthogonal, are damaged values.
SPACING_RANGE_MM = (1e-4, 100.0)
COSINE_TOLERANCE = 1e-2


def check_spacing(values, what: str) -> list[float]:
    """``values`` as floats, or InvalidSeriesError naming them if any is zero, negative, not finite or absurd.

    >>> check_spacing(["0.7", "0.7"], "PixelSpacing")
    [0.7, 0.7]
    >>> check_spacing(["0", "0"], "PixelSpacing")
    Traceback (most recent call last):
    ...
    storage.errors.InvalidSeriesError: impossible PixelSpacing [0.0, 0.0]: each must be finite, in (0.0001, 100] mm
    """
    floats = [float(v) for v in values]
    lo, hi = SPACING_RANGE_MM
    if not floats or not all(np.isfinite(v) and lo <= v <= hi for v in floats):
        raise InvalidSeriesError(f"impossible {what} {floats}: each must be finite, in ({lo:g}, {hi:g}] mm")
    return floats


def check_orientation(orientation) -> list[float]:
    """ImageOrientationPatient as 6 floats, or InvalidSeriesError unless both vectors are unit and orthogonal."""
    iop = [float(v) for v in orientation]
    if len(iop) != 6 or not all(np.isfinite(iop)):
        raise InvalidSeriesError(f"impossible ImageOrientationPatient {iop}: 6 finite direction cosines expected")
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    if (abs(np.linalg.norm(row) - 1) > COSINE_TOLERANCE or abs(np.linalg.norm(col) - 1) > COSINE_TOLERANCE
            or abs(float(row @ col)) > COSINE_TOLERANCE):
        raise InvalidSeriesError(f"impossible ImageOrientationPatient {iop}: row and column directions must be "
                                 "unit vectors at right angles")
    return iop


# -------------------------------------------------------------------------- pixels
def read_slice(path: str | Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """Read one file and decode its pixels (once); raise UnreadableFileError with the decoder's reason."""
    try:
        ds = pydicom.dcmread(path)
        return ds, ds.pixel_array  # decode now, so that a damaged file fails here
    except Exception as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())  # decoders' reasons on one line
        raise UnreadableFileError(f"cannot decode pixel data: {reason}") from exc


def read_header(path: str | Path) -> pydicom.Dataset:
    """One file's header in full, without its pixel data; raise UnreadableFileError with pydicom's reason."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:
        raise UnreadableFileError(f"unreadable DICOM header: {type(exc).__name__}: {exc}") from exc


def to_physical(ds: pydicom.Dataset, *, color: str = "quarantine", pixels: np.ndarray | None = None) -> np.ndarray:
    """The frame's pixels in physical units (RescaleSlope/RescaleIntercept or a modality LUT).

    MONOCHROME1 is inverted so that, as in MONOCHROME2, higher values are brighter. PALETTE COLOR
    indices become the colours of their palette first (never stored as indices). Colour
    images (RGB, or YBR which pydicom converts to RGB) become luminance with
    ``skimage.color.rgb2gray`` in the stored value range when ``color="grayscale"``; with
    ``color="quarantine"`` they raise InvalidSeriesError. Integer data with slope 1 and an
    integral intercept (most CT) stays integer; anything else is float64. ``pixels``: the
    already decoded frame, if there is one.
    """
    arr = ds.pixel_array if pixels is None else pixels
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        return to_gray(arr, str(ds.get("PhotometricInterpretation", "RGB")), color=color)
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":  # indices into a colour table
        return to_gray(_palette_rgb(arr, ds), "PALETTE COLOR", color=color)
    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_rescale(arr, ds), dtype=np.float64)
    return rescale_frame(
        arr, slope=float(ds.get("RescaleSlope", 1) or 1), intercept=float(ds.get("RescaleIntercept", 0) or 0),
        bits=int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 16),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")),
    )


def _palette_rgb(indices: np.ndarray, ds) -> np.ndarray:
    """The RGB colours a PALETTE COLOR image's indices stand for (its palette, applied by pydicom)."""
    from pydicom.pixels import apply_color_lut

    try:
        return apply_color_lut(indices, ds)
    except Exception as exc:  # a missing or damaged palette: the indices mean nothing on their own
        raise InvalidSeriesError(f"PALETTE COLOR image whose palette cannot be applied: {reason_for(exc)}") from exc


def to_gray(arr: np.ndarray, photometric: str, *, color: str) -> np.ndarray:
    """Luminance of an RGB frame in its stored value range, or InvalidSeriesError by policy."""
    if color != "grayscale":
        raise InvalidSeriesError(f"colour image ({photometric}); set ingest.color: grayscale to convert it")
    from skimage.color import rgb2gray

    scale = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "iu" else 1.0
    return rgb2gray(arr) * scale


def rescale_frame(arr: np.ndarray, *, slope: float, intercept: float, bits: int, photometric: str) -> np.ndarray:
    """Stored values to physical units; MONOCHROME1 inverted first.

    >>> rescale_frame(np.array([0, 4095], np.uint16), slope=1, intercept=-1024, bits=12, photometric="MONOCHROME2")
    array([-1024,  3071], dtype=int16)
    """
    signed = arr.dtype.kind == "i"
    if photometric == "MONOCHROME1":
        arr = (-1 - arr.astype(np.int32)) if signed else ((2**bits - 1) - arr.astype(np.int64))
        arr = arr.astype(np.int32)
    dtype = exact_integer_rescale(signed, bits, slope, intercept) if arr.dtype.kind in "iu" else None
    if dtype is not None:  # every possible value fits; no rounding
        out = arr.astype(dtype)  # always a copy: the intercept is added in place
        out += dtype(intercept)
        return out
    return arr.astype(np.float64) * slope + intercept


# header attributes a frame of a multi-frame image inherits from its file
FRAME_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
                  "AccessionNumber", "StudyDate", "InstitutionName", "Modality", "Manufacturer",
                  "ManufacturerModelName", "KVP", "ConvolutionKernel", "BodyPartExamined",
                  "PhotometricInterpretation", "BitsStored", "PatientSex", "PatientAge")


def _functional_group(ds: pydicom.Dataset, frame: int, sequence: str):
    """The item of ``sequence`` for one frame: its per-frame group first, then the shared group."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[frame] if per_frame else None, shared[0] if shared else None):
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence][0]
    return None


def split_frames(ds: pydicom.Dataset, *, color: str = "quarantine",
                 pixels: np.ndarray | None = None) -> list[tuple[pydicom.Dataset, np.ndarray]]:
    """The frames of an enhanced multi-frame image as ``(frame header, physical pixels)``.

    Each frame header carries ImagePositionPatient, ImageOrientationPatient, PixelSpacing and
    SliceThickness from the per-frame (or shared) functional groups, and the rescale of its
    Pixel Value Transformation.

    Raises:
        InvalidSeriesError: no per-frame positions (cine, or a multi-frame without functional groups).
    """
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        raise InvalidSeriesError(f"multi-frame image ({n} frames) without per-frame functional groups: "
                                 "no position for each frame")
    decoded = ds.pixel_array if pixels is None else pixels
    pixels = decoded.reshape(n, *decoded.shape[-2 - (decoded.ndim == 4):][:2], -1)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    bits = int(ds.get("BitsStored", 16) or 16)
    out = []
    for i in range(n):
        position = _functional_group(ds, i, "PlanePositionSequence")
        orientation = _functional_group(ds, i, "PlaneOrientationSequence")
        measures = _functional_group(ds, i, "PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise InvalidSeriesError(f"frame {i + 1} of {n} has no plane position, orientation or pixel measures")
        frame = pydicom.Dataset()
        for keyword in FRAME_KEYWORDS:
            if keyword in ds:
                setattr(frame, keyword, ds[keyword].value)
        frame.ImagePositionPatient = position.ImagePositionPatient
        frame.ImageOrientationPatient = orientation.ImageOrientationPatient
        frame.PixelSpacing = measures.PixelSpacing
        if "SliceThickness" in measures:
            frame.SliceThickness = measures.SliceThickness
        frame.InstanceNumber = i + 1
        transform = _functional_group(ds, i, "PixelValueTransformationSequence")
        slope = float(transform.get("RescaleSlope", 1) or 1) if transform else 1.0
        intercept = float(transform.get("RescaleIntercept", 0) or 0) if transform else 0.0
        if transform is not None:
            frame.RescaleSlope, frame.RescaleIntercept = slope, intercept
        if pixels.ndim == 4:
            values = to_gray(pixels[i], photometric, color=color)
        elif photometric == "PALETTE COLOR":
            values = to_gray(_palette_rgb(pixels[i], ds), photometric, color=color)
        else:
            values = rescale_frame(pixels[i], slope=slope, intercept=intercept, bits=bits, photometric=photometric)
        out.append((frame, values))
    return out


def split_mosaic(ds: pydicom.Dataset, values: np.ndarray) -> list[tuple[pydicom.Dataset, np.ndarray]]:
    """The slices of a Siemens mosaic, each ``(header, pixels)`` with its own ImagePositionPatient.

    ``values``: the whole mosaic frame in physical units. The number of tiles comes from the
    CSA header or the private NumberOfImagesInMosaic (0019,100A); the corner ImagePositionPatient
    of the mosaic is moved to the first tile and each slice is stepped along the CSA slice
    normal by the slice spacing, as dcm2niix does (nibabel's ``MosaicWrapper`` reads the CSA
    header and computes them; tests compare with dcm2niix).

    Raises:
        InvalidSeriesError: a fact needed to place the slices is missing; never one big slice.
    """
    import warnings as _warnings

    from nibabel.nicom import dicomwrappers

    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # nibabel's notice that its DICOM readers are experimental
        missing = ("Siemens mosaic without the CSA header and NumberOfImagesInMosaic that place its slices "
                   "(never stored as one slice)")
        try:
            wrapper = dicomwrappers.wrapper_from_data(ds)
        except Exception as exc:  # noqa: BLE001
            raise InvalidSeriesError(f"{missing}: {reason_for(exc)}") from exc
        if not isinstance(wrapper, dicomwrappers.MosaicWrapper):
            raise InvalidSeriesError(missing)
        try:
            n = int(wrapper.n_mosaic)
            rows, cols = (int(v) for v in wrapper.image_shape[:2])
            first = np.asarray(wrapper.image_position, dtype=float)
            normal = np.asarray(wrapper.slice_normal, dtype=float)
            dz = float(wrapper.voxel_sizes[2])
        except Exception as exc:  # noqa: BLE001 - nibabel raises several types for what is missing
            raise InvalidSeriesError(f"Siemens mosaic whose slices cannot be placed: {reason_for(exc)} (the CSA "
                                     "header or NumberOfImagesInMosaic is missing or damaged)") from exc
    if normal.shape != (3,) or not np.isfinite(normal).all() or abs(np.linalg.norm(normal) - 1) > COSINE_TOLERANCE:
        raise InvalidSeriesError(f"Siemens mosaic whose slice normal {normal.tolist()} is not a unit vector: its "
                                 "slices cannot be placed")
    side = int(np.ceil(np.sqrt(n)))
    if values.shape != (rows * side, cols * side):
        raise InvalidSeriesError(f"Siemens mosaic of {n} tiles of {rows}x{cols} does not fit its {values.shape} frame")
    dz = check_spacing([dz], "mosaic slice spacing")[0]
    out = []
    for k in range(n):
        r, c = divmod(k, side)
        frame = pydicom.Dataset()
        for keyword in FRAME_KEYWORDS:
            if keyword in ds:
                setattr(frame, keyword, ds[keyword].value)
        frame.ImagePositionPatient = [float(v) for v in first + k * dz * normal]
        frame.ImageOrientationPatient = list(ds.ImageOrientationPatient)
        frame.PixelSpacing = list(ds.PixelSpacing)
        frame.SliceThickness = ds.get("SliceThickness", dz)
        frame.InstanceNumber = int(ds.get("InstanceNumber", 0) or 0)
        out.append((frame, np.ascontiguousarray(values[r * rows:(r + 1) * rows, c * cols:(c + 1) * cols])))
    return out


def check_image(ds: pydicom.Dataset, *, planar: bool = False) -> None:
    """Raise InvalidSeriesError for images this version cannot place in a volume."""
    if planar:
        return
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if k not in ds]
    if missing:
        raise InvalidSeriesError(f"no {', '.join(missing)}: cannot place the image in patient space")


def planar_geometry(ds: pydicom.Dataset, *, fallback: float | None = None) -> tuple[Geometry, str]:
    """A one-slice geometry for an image without patient position, and where its spacing came from.

    Pixel spacing is PixelSpacing, else ImagerPixelSpacing (projection radiography, at the
    detector), else 1 mm (recorded as unknown). An impossible spacing (zero, negative, not
    finite, absurd) raises InvalidSeriesError, or, given ``fallback`` (``ingest.fallback_spacing``),
    becomes that spacing, recorded with the values it replaced.
    """
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in ds and ds.get(keyword):
            values = list(ds.get(keyword))
            try:
                row, col = check_spacing(values, keyword)
                source = keyword
            except (InvalidSeriesError, ValueError, TypeError) as exc:
                if fallback is None:
                    raise InvalidSeriesError(f"{exc} (set ingest.fallback_spacing to give planar images with an "
                                             "impossible spacing a fixed one)") from None
                row = col = float(fallback)
                source = f"ingest.fallback_spacing (impossible {keyword} {[str(v) for v in values]})"
            break
    else:
        row, col, source = 1.0, 1.0, "unknown"
    geo = Geometry(order=(0,), spacing=(1.0, row, col), origin=(0.0, 0.0, 0.0),
                   direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), spacing_deviation=0.0)
    return geo, source


def volume_dtype(modality: str, frames: list[np.ndarray]) -> np.dtype:
    """int16 for CT (HU) and for integer-valued data that fits; float32 otherwise."""
    if modality == "CT":
        return np.dtype(np.int16)
    if all(f.dtype.kind in "iu" or (np.all(np.isfinite(f)) and np.array_equal(f, np.round(f))) for f in frames):
        lo = min(f.min(initial=0) for f in frames)
        hi = max(f.max(initial=0) for f in frames)
        if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
            return np.dtype(np.int16)
        if lo >= np.iinfo(np.int32).min and hi <= np.iinfo(np.int32).max:
            return np.dtype(np.int32)
    return np.dtype(np.float32)


def cast_volume(volume: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``volume`` as ``dtype``: rounded and clipped to its range for integer types (no copy if already so)."""
    if volume.dtype == dtype:
        return volume
    if np.issubdtype(dtype, np.integer):
        if volume.dtype.kind in "iu":
            info = np.iinfo(dtype)
            return np.clip(volume, info.min, info.max).astype(dtype)
        info = np.iinfo(dtype)
        return np.clip(np.round(volume), info.min, info.max).astype(dtype)
    return volume.astype(dtype)
