"""Mutated inputs for the hostile-input tests: seeded, bounded, reproducible.

``fuzz_source(folder, n=300, seed=0)`` writes ``n`` mutated copies of a few well-formed
files (a small CT series, a DX radiograph, pydicom's CT and MR samples; with ``every_kind``
also a 12-lead ECG waveform and a TID 1500 SR with lesion marks on the CT series) plus special
entries (a symbolic-link loop, a dangling link, a FIFO, an empty file, an unreadable
folder where the test does not run as root). Mutations: byte flips in the header,
truncations, absurd element lengths, and absurd values written through pydicom
(overflowing rescale, zero/NaN spacing, damaged orientation, impossible sizes).
``fuzz_images`` does the same for a folder of PNG/JPEG class folders, and ``fuzz_boxes`` writes a
boxes table whose rows are good, malformed or about images that are not there.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

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


def _more_seeds(folder: Path, ct: list[Path]) -> list[Path]:
    """A 12-lead ECG waveform and an SR with two lesion marks (one inside the CT series, one outside)."""
    from medflow.synth_ecg import RATE, ecg_trace, write_ecg_dicom
    from storage.marks import write_sr

    rng = np.random.default_rng(2)
    (folder / "ecg").mkdir()
    write_ecg_dicom(folder / "ecg" / "ecg.dcm", ecg_trace("normal", rng, seconds=2.0), rate=RATE, patient="P7",
                    study_uid=generate_uid(), series_uid=generate_uid(), sop_uid=generate_uid())
    sources = [pydicom.dcmread(p) for p in ct]
    write_sr(sources, [{"x": 4.0, "y": 4.0, "z": 4.0, "diameter_mm": 3.0},
                       {"x": 900.0, "y": 0.0, "z": 0.0, "diameter_mm": 5.0}], folder / "marks.dcm",
             series_uid=generate_uid(), sop_uid=generate_uid())
    return [folder / "ecg" / "ecg.dcm", folder / "marks.dcm"]


def fuzz_source(folder: Path, pydicom_files: Path, *, n: int = 300, seed: int = 0, every_kind: bool = False) -> dict:
    """Write ``n`` mutated files and the special entries under ``folder``; returns what was made."""
    rng = np.random.default_rng(seed)
    seeds_dir = folder / "seeds"
    originals = _seed_files(seeds_dir, pydicom_files)
    if every_kind:
        originals += _more_seeds(seeds_dir, sorted((seeds_dir / "ct").glob("*.dcm")))
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


def fuzz_images(folder: Path, *, n: int = 300, seed: int = 0) -> dict:
    """``n`` mutated PNG/JPEG files in class folders (byte flips, truncations, copies, a colour image, a 1-pixel
    image, a 16-bit image) and special entries (a FIFO, a dangling link, a link loop, a name that is not UTF-8,
    an empty file, a folder named like an image, a file outside any class folder)."""
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for fmt, arr in (("PNG", rng.integers(0, 255, (32, 32), dtype=np.uint8)),
                     ("JPEG", rng.integers(0, 255, (24, 40), dtype=np.uint8)),
                     ("PNG", rng.integers(0, 65535, (16, 16), dtype=np.uint16)),
                     ("PNG", rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)),
                     ("PNG", np.zeros((1, 1), np.uint8))):
        buf = BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        blobs.append((fmt.lower().replace("jpeg", "jpg"), buf.getvalue()))
    kinds: dict[str, int] = {}
    for cls in ("normal", "pneumonia"):
        (folder / cls).mkdir(parents=True)
    for i in range(n):
        suffix, data = blobs[int(rng.integers(len(blobs)))]
        kind = ["flip", "truncate", "copy"][int(rng.choice(3, p=[0.4, 0.2, 0.4]))]
        if kind == "flip":  # anywhere in the first kilobyte: the signature, the header chunks, the compressed data
            out = bytearray(data)
            for _ in range(int(rng.integers(1, 5))):
                out[int(rng.integers(0, min(len(out), 1024)))] ^= 1 << int(rng.integers(0, 8))
            data = bytes(out)
        elif kind == "truncate":
            data = data[: int(rng.integers(0, len(data)))]
        kinds[kind] = kinds.get(kind, 0) + 1
        (folder / ("normal", "pneumonia")[i % 2] / f"i{i:04d}.{suffix}").write_bytes(data)
    special = folder / "normal" / "special"
    special.mkdir()
    os.mkfifo(special / "pipe.png")
    os.symlink(special / "nowhere.png", special / "dangling.png")
    os.symlink(special, special / "loop")
    (special / "empty.png").write_bytes(b"")
    (special / "folder.png").mkdir()
    (special / "notes.txt").write_text("not an image")
    with open(os.fsencode(special) + b"/bad\xffname.png", "wb") as fh:
        fh.write(blobs[0][1])
    (folder / "stray.png").write_bytes(blobs[0][1])
    return {"files": n, "kinds": kinds}


def fuzz_boxes(table: Path, good_uid: str, *, n: int = 150, seed: int = 0) -> dict:
    """A boxes table of ``n`` rows on the image ``good_uid``: good boxes, and rows with a NaN, text, an inverted or
    empty box, an unknown or missing SOPInstanceUID."""
    import csv

    rng = np.random.default_rng(seed)
    kinds: dict[str, int] = {}
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["SOPInstanceUID", "x0", "y0", "x1", "y1"])
        for _ in range(n):
            x0, y0 = rng.uniform(0, 10, 2).round(1)
            row = [good_uid, x0, y0, x0 + 5, y0 + 5]
            kind = ["good", "nan", "text", "inverted", "unknown", "no uid"][int(rng.integers(6))]
            if kind == "nan":
                row[int(rng.integers(1, 5))] = "nan"
            elif kind == "text":
                row[int(rng.integers(1, 5))] = "five"
            elif kind == "inverted":
                row[3], row[1] = row[1], row[3]
            elif kind == "unknown":
                row[0] = generate_uid()
            elif kind == "no uid":
                row[0] = ""
            kinds[kind] = kinds.get(kind, 0) + 1
            writer.writerow(row)
    return {"rows": n, "kinds": kinds}


def unlock(folder: Path) -> None:
    """Make the fuzz tree removable again (the locked folder)."""
    for path in folder.rglob("locked"):
        path.chmod(0o755)


__all__ = ["ABSURD_VALUES", "fuzz_boxes", "fuzz_images", "fuzz_source", "unlock"]
