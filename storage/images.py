"""Image-folder sources: PNG/JPEG files in class folders (Keras' ``flow_from_directory`` layout) or
listed in a CSV with a label column, ingested into the same store as DICOM series.

Each image becomes a one-slice series (1, H, W), grayscale, with its class in the catalog.
Keys are pseudonyms of the image's content (an HMAC of its SHA-256 under the store's
secret), never of its file name, so a file or folder name that carries a patient's name
reaches neither keys nor attributes. Unusable files are quarantined with the reason; the
rest goes on. No Prefect here: ``tasks/ingest.py`` runs these functions on Dask.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.deid import Pseudonymizer
from storage.store import Store

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageItem:
    """One image to ingest: its path relative to the source, its class and, from a layout or a CSV column,
    its split (``train``, ``val``, ``test``; empty: the run splits)."""

    relpath: str
    label: str
    split: str = ""


SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test", "testing": "test"}


def split_name(value) -> str | None:
    """The split a folder name or a CSV value names, or None.

    >>> split_name("Training"), split_name(" val "), split_name("holdout")
    ('train', 'val', None)
    """
    return SPLIT_NAMES.get(str(value).strip().lower()) if isinstance(value, str) else None


def list_split_folders(root: str | Path, **kwargs) -> tuple[list[ImageItem], list[dict]]:
    """Files in ``root/<split>/<class>/...`` (``data.layout: folders``): ``list_class_folders`` of each split
    folder, each item carrying its split; anything else at the top is quarantined with the reason."""
    from medflow.access import check_allowed

    check_allowed(root, "data.source")
    items, quarantine = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        split = split_name(entry.name) if entry.is_dir(follow_symlinks=False) else None
        if split is None:
            quarantine.append({"path": entry.name + ("/" if entry.is_dir() else ""), "stage": "scan",
                               "reason": "not a split folder (data.layout: folders holds train/, val/ and test/, "
                               "each with one subfolder per class)"})
            continue
        found, rows = list_class_folders(entry.path, **kwargs)
        items += [ImageItem(f"{entry.name}/{i.relpath}", i.label, split) for i in found]
        quarantine += [{**r, "path": f"{entry.name}/{r['path']}"} for r in rows]
    return items, quarantine


def _not_usable(path: str, confined: bool) -> str | None:
    """Why the entry at ``path`` cannot be read as an image file, without opening it, or None: special files
    (a FIFO would block the reader), dangling links, and, under ``medflow serve``, links leading out of the
    allowed folders."""
    from medflow.access import is_inside
    from storage.dicom import OUTSIDE, file_type

    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if confined and not is_inside(path):
                return OUTSIDE
            st = os.stat(path)
    except OSError as exc:
        return ("symbolic link to nothing (dangling)" if isinstance(exc, FileNotFoundError)
                else f"cannot be listed: {type(exc).__name__}: {os.strerror(exc.errno) if exc.errno else exc}")
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file ({file_type(st.st_mode)})"
    return None


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def list_class_folders(root: str | Path, *, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, what: str = "image",
                       companions: tuple[str, ...] = ()) -> tuple[list[ImageItem], list[dict]]:
    """Images (files with one of ``suffixes``) in ``root/<class>/...`` and quarantine rows for what cannot be used.

    Files directly in ``root``, files that are not images by their suffix, entries that are not
    regular files (FIFOs, sockets, devices: never opened) and class folders without an image are
    reported with the reason. Files with a suffix of ``companions`` (the detached data of a MetaImage
    or NRRD header) are passed over without a row.
    """
    from medflow.access import check_allowed, is_inside, restricted
    from storage.dicom import OUTSIDE

    check_allowed(root, "data.source")
    confined = restricted()
    root = Path(root)
    items, quarantine = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        why = OUTSIDE if confined and entry.is_symlink() and not is_inside(entry.path) else None
        if why:
            quarantine.append({"path": entry.name, "stage": "scan", "reason": why})
            continue
        if not entry.is_dir():
            why = _not_usable(entry.path, confined)
            quarantine.append({"path": entry.name, "stage": "scan", "reason": why or f"not in a class folder ({what}s "
                               "go in one subfolder per class)"})
            continue
        found = 0
        seen = {_identity(entry.path)}
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in list(dirnames):  # links are followed as in a DICOM source: each real folder once
                full = os.path.join(dirpath, name)
                why = None
                if os.path.islink(full) and confined and not is_inside(full):
                    why = OUTSIDE
                elif (identity := _identity(full)) in seen:
                    why = "symbolic link to a folder already listed (a link loop or a second path to it): not followed"
                else:
                    seen.add(identity)
                if why:
                    dirnames.remove(name)
                    quarantine.append({"path": os.path.relpath(full, root), "stage": "scan", "reason": why})
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                if companions and name.lower().endswith(companions):
                    continue
                why = _not_usable(full, confined)
                if why is None and not name.lower().endswith(suffixes):
                    why = f"not {_article(what)} {what} file (expected " + ", ".join(suffixes) + ")"
                if why:
                    quarantine.append({"path": rel, "stage": "scan", "reason": why})
                    continue
                items.append(ImageItem(rel, entry.name))
                found += 1
        if not found:
            quarantine.append({"path": entry.name + "/", "stage": "scan", "reason": f"empty class folder (no {what})"})
    return items, quarantine


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def list_unlabelled(root: str | Path, *, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, what: str = "image",
                    companions: tuple[str, ...] = ()) -> tuple[list[ImageItem], list[dict]]:
    """Every image file under ``root`` (any layout: new cases have no class) and quarantine rows for the other
    entries (not an image by its suffix, special files, links out of the allowed folders), each with its reason."""
    from medflow.access import check_allowed, restricted
    from storage.dicom import list_source

    check_allowed(root, "input")
    confined = restricted()
    problems: list[tuple[str, str]] = []
    items, quarantine = [], []
    for rel, _, _ in list_source(root, problems):
        if companions and rel.lower().endswith(companions):
            continue
        why = _not_usable(os.path.join(root, rel), confined)
        if why is None and not rel.lower().endswith(suffixes):
            why = f"not {_article(what)} {what} file (expected " + ", ".join(suffixes) + ")"
        if why:
            quarantine.append({"path": rel, "stage": "scan", "reason": why})
        else:
            items.append(ImageItem(rel, ""))
    quarantine += [{"path": rel, "stage": "scan", "reason": reason} for rel, reason in problems]
    return items, quarantine


def list_csv(root: str | Path, table: str | Path, *, path_column: str, label_column: str,
             split_column: str | None = None) -> tuple[list[ImageItem], list[dict]]:
    """Images listed in a CSV (paths relative to ``root``) with their labels.

    An entry must name a file inside ``root``: an absolute path or one that leads out of it (``..``, a
    link; under ``medflow serve`` also a link out of the allowed folders) is quarantined without being
    opened, as is a listed entry that is not a regular file."""
    import pandas as pd

    from medflow.access import check_allowed, is_inside, restricted
    from medflow.splitting import label_text

    check_allowed(root, "data.source")
    check_allowed(table, "data.labels.path")
    confined = restricted()
    real_root = Path(root).resolve()
    df = pd.read_csv(table, dtype=str)
    for col in (path_column, label_column, *([split_column] if split_column else [])):
        if col not in df.columns:
            raise ValueError(f"labels CSV {str(table)!r} has no column {col!r}; its columns are {list(df.columns)}")
    items, quarantine = [], []
    splits = df[split_column] if split_column else [""] * len(df)
    for rel, label, given in zip(df[path_column], df[label_column], splits):
        if not isinstance(rel, str) or not rel.strip():
            continue
        full = Path(root) / rel
        if Path(rel).is_absolute() or not is_inside(full, [real_root]):
            why = "listed in the labels CSV with a path outside data.source (paths are relative to data.source)"
        else:
            why = _not_usable(str(full), confined) if full.exists() or full.is_symlink() else \
                "listed in the labels CSV but not found"
            if why is None and confined and not is_inside(full):
                why = OUTSIDE_ROOTS
        if why:
            quarantine.append({"path": rel, "stage": "scan", "reason": why})
        elif not isinstance(label, str) or not label.strip():
            quarantine.append({"path": rel, "stage": "scan", "reason": "no label in the labels CSV"})
        elif split_column and split_name(given) is None:
            quarantine.append({"path": rel, "stage": "scan", "reason": f"the labels CSV's {split_column!r} is not "
                               "train, val or test for this row"})
        else:
            items.append(ImageItem(rel, label_text(label), split_name(given) if split_column else ""))
    return items, quarantine


OUTSIDE_ROOTS = "outside the folders allowed for runs started through the API (medflow serve --allow)"


MAX_IMAGE_PIXELS = 100_000_000  # beyond this a header is taken for a decompression bomb, not read


def read_image(path: str | Path, *, color: str = "quarantine") -> tuple[np.ndarray, list[str]]:
    """A grayscale image as uint8 or uint16 (H, W), with Pillow, and notes on what was changed.

    Turned upright by its EXIF orientation (``ImageOps.exif_transpose``). RGB images whose channels
    are equal (grayscale saved as colour) are taken as grayscale; other colour images are converted
    to luminance with ``color="grayscale"``, else refused. An alpha channel is dropped, with a note.
    Errors never name the file (its name may carry a patient's name): the caller knows which it was.

    Raises:
        ValueError: unreadable or truncated file, a multi-page file, a header of more than
            ``MAX_IMAGE_PIXELS`` pixels, or a colour image under ``color="quarantine"``.
    """
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"image header declares {width}x{height} pixels, more than "
                                     f"{MAX_IMAGE_PIXELS:,} (a decompression bomb, or not a radiograph); not read")
                pages = getattr(opened, "n_frames", 1)
                if pages > 1:
                    raise ValueError(f"a multi-page image ({pages} pages): one image per file is expected")
                opened.load()
                im = ImageOps.exif_transpose(opened)
                if im is not opened and opened.getexif().get(0x0112, 1) != 1:
                    notes.append(f"turned upright by its EXIF orientation {opened.getexif().get(0x0112)}")
                mode = im.mode
                if "A" in mode or (mode == "P" and "transparency" in im.info):
                    notes.append(f"alpha channel dropped (mode {mode})")
                if mode in ("L", "I;16", "I;16B", "I;16L", "I", "1"):
                    arr = np.asarray(im)
                elif mode == "LA":
                    arr = np.asarray(im.getchannel("L"))
                else:
                    rgb = np.asarray(im.convert("RGB"))
                    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]):
                        arr = rgb[..., 0]
                    elif color == "grayscale":
                        arr = np.asarray(im.convert("RGB").convert("L"))
                        notes.append(f"colour ({mode}) converted to luminance")
                    else:
                        raise ValueError(f"colour image ({mode}); set ingest.color: grayscale to convert it")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"image larger than Pillow reads safely ({type(exc).__name__}); not read") from None
    except UnidentifiedImageError:
        raise ValueError("unreadable image: not an image file Pillow can identify") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"unreadable image: {type(exc).__name__}: {_without_path(str(exc), path)}") from None
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype.kind == "i":
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"image values {arr.min()}..{arr.max()} do not fit 16 bits")
        arr = arr.astype(np.uint16)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"image of shape {arr.shape}, expected a 2D grayscale image")
    return np.ascontiguousarray(arr), notes


def _without_path(message: str, path: str | Path) -> str:
    """``message`` with the file's path and name taken out (Pillow puts them in some of its errors).

    >>> _without_path("cannot read '/data/Doe_John/x.png': broken", "/data/Doe_John/x.png")
    'cannot read <file>: broken'
    """
    full = str(path)
    for text in sorted({full, os.path.abspath(full), os.path.basename(full)}, key=len, reverse=True):
        if text:
            message = message.replace(f"'{text}'", "<file>").replace(text, "<file>")
    return message


def content_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes. Opened without blocking and checked to be a regular file (a FIFO swapped in
    after the listing would otherwise hold the worker).

    Raises:
        ValueError: not a regular file.
    """
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_key(pseudo: Pseudonymizer, digest: str) -> str:
    """The series key of an image: a pseudonym of its content."""
    return "m" + pseudo.key(digest, kind="image")[:31]


def ingest_images(store_root: str, source: str, items: list[ImageItem], *, color: str = "quarantine") -> dict:
    """Write ``items`` to the store (a Dask worker entry point); returns counts and quarantine rows.

    Images already stored with the same content and class are skipped. The same image under
    two classes is quarantined (both copies); the same image twice in one class is stored once.
    """
    def read(path: Path) -> tuple[np.ndarray, dict, list[str]]:
        pixels, notes = read_image(path, color=color)
        return pixels[None], {
            "modality": "OT", "spacing": [1.0, 1.0, 1.0], "origin": [0.0, 0.0, 0.0],
            "direction": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], "spacing_source": "unknown",
            "source_format": path.suffix.lower().lstrip(".")}, notes

    return ingest_files(store_root, source, items, kind="image", digest_of=content_digest,
                        key_of=image_key, read=read)


def ingest_files(store_root: str, source: str, items: list[ImageItem], *, kind: str,
                 digest_of: Callable[[Path], str], key_of: Callable[[Pseudonymizer, str], str],
                 read: Callable[[Path], tuple[np.ndarray, dict, list[str]]]) -> dict:
    """Write image or volume files to the store, each a series keyed by a pseudonym of its content
    (``key_of(pseudo, digest_of(path))``): ``read(path)`` gives the (Z, Y, X) array, its geometry and
    format fields, and notes of what was changed. A file already stored with the same content, class
    and split is skipped; one that cannot be read is a quarantine row whose reason never names it."""
    from medflow.access import is_inside

    store = Store(store_root)
    pseudo = store.pseudonymizer()
    catalog = store.catalog()
    out = {"ingested": 0, "unchanged": 0, "quarantine": [], "keys": []}
    for item in items:
        path = Path(source) / item.relpath
        try:
            if not is_inside(path):  # checked where it is opened: a link swapped in since the listing
                raise ValueError(OUTSIDE_ROOTS)
            digest = digest_of(path)
            key = key_of(pseudo, digest)
            if key in catalog and catalog[key].get("label") == item.label and \
                    catalog[key].get("split", "") == item.split:
                out["unchanged"] += 1
                out["keys"].append((key, item.label, item.relpath, item.split))
                continue
            array, fields, notes = read(path)
        except (OSError, ValueError) as exc:
            out["quarantine"].append({"path": item.relpath, "stage": "ingest",
                                      "reason": _without_path(str(exc), path)})
            continue
        except Exception as exc:  # noqa: BLE001 - a decoder's own failure: this file is quarantined, the rest goes on
            out["quarantine"].append({"path": item.relpath, "stage": "ingest",
                                      "reason": f"unreadable {kind}: {type(exc).__name__}"})
            continue
        entry = {
            "patient_key": key, "study_key": key, "accession_key": "", "kind": kind,
            "shape": list(array.shape), "dtype": str(array.dtype), "n_files": 1, "n_frames": int(array.shape[0]),
            "digest": pseudo.digest([digest]),  # keyed: the plain SHA-256 would confirm a file is in the store
            "spacing_deviation": 0.0, "rescaled": False, "acquisition": {}, "label": item.label, **fields,
        }
        if item.split:
            entry["split"] = item.split
        if notes:
            entry["notes"] = notes
            out["noted"] = out.get("noted", 0) + 1
        store.write_series(key, array, entry)
        out["ingested"] += 1
        out["keys"].append((key, item.label, item.relpath, item.split))
    return out


def resolve_duplicates(results: list[dict]) -> tuple[list[str], list[dict]]:
    """Keys to withdraw and quarantine rows for images that were found more than once.

    The same content under two classes cannot be trusted, nor the same content in two splits (a
    leak: a test image the model trained on): it is withdrawn and every copy is quarantined. The
    same content twice in one class and split keeps one copy.
    """
    seen: dict[str, list[tuple[str, str, str]]] = {}
    for res in results:
        for key, label, rel, *split in res["keys"]:
            seen.setdefault(key, []).append((label, rel, split[0] if split else ""))
    withdraw, rows = [], []
    for key, copies in seen.items():
        labels = {label for label, _, _ in copies}
        splits = {split for _, _, split in copies}
        if len(labels) > 1:
            withdraw.append(key)
            rows += [{"path": rel, "stage": "ingest", "reason": f"the same image is in {len(labels)} classes "
                      f"({', '.join(sorted(labels))})"} for _, rel, _ in copies]
        elif len(splits) > 1:
            withdraw.append(key)
            rows += [{"path": rel, "stage": "ingest", "reason": f"the same file is in {len(splits)} splits "
                      f"({', '.join(sorted(splits))}): a leak between them"} for _, rel, _ in copies]
        elif len(copies) > 1:
            rows += [{"path": rel, "stage": "ingest", "reason": "duplicate of another image in the same class "
                      "(stored once)"} for _, rel, _ in copies[1:]]
    return withdraw, rows
