"""Mutated DICOM files for the hostile-input tests: seeded, bounded, reproducible.

``fuzz_source(folder, n=300, seed=0)`` writes ``n`` mutated copies of a few well-formed
files (a small CT series, a DX radiograph, pydicom's CT and MR samples) plus special
entries (a symbolic-link loop, a dangling link, a FIFO, an empty file, an unreadable
folder where the test does not run as root). Mutations: byte flips in the header,
truncations, absurd element lengths, and absurd values written through pydicom
(overflowing rescale, zero/NaN spacing, damaged orientation, impossible sizes).
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import CTImageStorage, generate_uid

from tests.helpers import new_instance, write_ct_series

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"

# (keyword, value) pairs written into a copy; each a value real or damaged exports have carried
ABSURD_VALUES = [
    ("RescaleIntercept", "1e308"), ("RescaleSlope", "1e308"), ("RescaleSlope", "0"), ("RescaleSlope", "nan"),
    ("PixelSpacing", "0\\0"), ("PixelSpacing", "nan\\1"), ("PixelSpacing", "-1\\-1"), ("PixelSpacing", "1e300\\1"),
    ("ImageOrientationPatient", "a\\b\\c\\d\\e\\f"), ("ImageOrientationPatient", "1\\0\\0\\1\\0\\0"),
    ("ImageOrientationPatient", "0\\0\\0\\0\\0\\0"), ("ImageOrientationPatient", "1\\0"),
    ("ImagePositionPatient", "x\\y\\z"), ("ImagePositionPatient", "1e308\\-1e308\\nan"),
    ("Rows", 0), ("Columns", 65535), ("BitsAllocated", 7), ("BitsStored", 40), ("BitsAllocated", 64),
    ("SamplesPerPixel", 3), ("SamplesPerPixel", 0), ("NumberOfFrames", "-1"), ("NumberOfFrames", "100000"),
    ("PhotometricInterpretation", "PALETTE COLOR"), ("PhotometricInterpretation", "NONSENSE"),
    ("PixelRepresentation", 7), ("SliceThickness", "-5"), ("InstanceNumber", "abc"),
    ("SeriesInstanceUID", ""), ("Modality", "\x00\x01"),
]


def _seed_files(folder: Path, pydicom_files: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 2000, size=(6, 16, 16))
    ct = write_ct_series(folder / "ct", vol, positions=[(0, 0, 2.0 * k) for k in range(6)])
    dx = new_instance(DX_STORAGE)
    dx.PatientID, dx.StudyInstanceUID, dx.SeriesInstanceUID, dx.Modality = "P9", generate_uid(), generate_uid(), "DX"
    dx.Rows, dx.Columns, dx.ImagerPixelSpacing = 20, 24, [0.2, 0.2]
    dx.SamplesPerPixel, dx.PhotometricInterpretation = 1, "MONOCHROME1"
    dx.BitsAllocated, dx.BitsStored, dx.HighBit, dx.PixelRepresentation = 16, 12, 11, 0
    dx.PixelData = rng.integers(0, 4000, size=(20, 24)).astype(np.uint16).tobytes()
    (folder / "dx").mkdir()
    dx.save_as(folder / "dx" / "dx.dcm", enforce_file_format=True)
    extra = [pydicom_files / name for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm")]
    for path in extra:
        shutil.copy(path, folder / path.name)
    return [*ct, folder / "dx" / "dx.dcm", *(folder / p.name for p in extra)]


def _flip(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    end = min(len(out), 1200)  # the header, where one byte decides how the rest is read
    for _ in range(int(rng.integers(1, 5))):
        out[int(rng.integers(132, end))] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def _truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(1, len(data)))]


def _absurd_length(data: bytes, rng: np.random.Generator) -> bytes:
    """Overwrite one explicit-VR element's length with a huge or odd value."""
    out = bytearray(data)
    candidates = [i for i in range(132, min(len(out) - 8, 1500)) if out[i:i + 2] in (b"DS", b"IS", b"UI", b"US",
                                                                                    b"LO", b"CS", b"SQ", b"OB")]
    if not candidates:
        return _flip(data, rng)
    at = int(rng.choice(candidates))
    if out[at:at + 2] in (b"SQ", b"OB"):
        out[at + 4:at + 8] = struct.pack("<I", int(rng.choice([0xFFFFFFFE, 0x7FFFFFFF, 3])))
    else:
        out[at + 2:at + 4] = struct.pack("<H", int(rng.choice([0xFFFF, 0xFFF1, 1])))
    return bytes(out)


def _absurd_value(path: Path, rng: np.random.Generator) -> bytes | None:
    ds = pydicom.dcmread(path)
    keyword, value = ABSURD_VALUES[int(rng.integers(len(ABSURD_VALUES)))]
    try:
        setattr(ds, keyword, value)
    except Exception:  # pydicom refuses some values outright; nothing to write then
        return None
    from io import BytesIO

    buf = BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=False)
    except Exception:
        return None
    return buf.getvalue()


def fuzz_source(folder: Path, pydicom_files: Path, *, n: int = 300, seed: int = 0) -> dict:
    """Write ``n`` mutated files and the special entries under ``folder``; returns what was made."""
    rng = np.random.default_rng(seed)
    seeds_dir = folder / "seeds"
    originals = _seed_files(seeds_dir, pydicom_files)
    blobs = {p: p.read_bytes() for p in originals}
    out_dir = folder / "fuzz"
    out_dir.mkdir(parents=True)
    kinds: dict[str, int] = {}
    for i in range(n):
        src = originals[int(rng.integers(len(originals)))]
        kind = ["flip", "truncate", "length", "value", "copy"][int(rng.choice(5, p=[0.35, 0.15, 0.15, 0.3, 0.05]))]
        data = {"flip": lambda: _flip(blobs[src], rng), "truncate": lambda: _truncate(blobs[src], rng),
                "length": lambda: _absurd_length(blobs[src], rng), "value": lambda: _absurd_value(src, rng),
                "copy": lambda: blobs[src]}[kind]()
        if data is None:
            kind, data = "flip", _flip(blobs[src], rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        (out_dir / f"f{i:04d}.dcm").write_bytes(data)
    special = folder / "special"
    special.mkdir()
    (special / "empty.dcm").write_bytes(b"")
    os.symlink(special, special / "loop")  # a folder that contains itself
    os.symlink(special / "nowhere.dcm", special / "dangling.dcm")
    os.mkfifo(special / "pipe.dcm")
    (special / "folder.dcm").mkdir()
    with open(os.fsencode(special) + b"/bad\xffname.dcm", "wb") as fh:  # a name that is not UTF-8
        fh.write(blobs[originals[0]])
    locked = special / "locked"
    locked.mkdir()
    shutil.copy(originals[0], locked / "hidden.dcm")
    locked.chmod(0)
    return {"files": n, "kinds": kinds, "locked": locked, "root_can_read": os.access(locked, os.R_OK)}


def unlock(folder: Path) -> None:
    """Make the fuzz tree removable again (the locked folder)."""
    for path in folder.rglob("locked"):
        path.chmod(0o755)


__all__ = ["ABSURD_VALUES", "fuzz_source", "unlock"]
