"""Checks of a valid spec against the files and the store it names, before any run starts.

``medflow validate`` prints them; ``medflow run`` refuses to start with any of them, so that a
missing label column or a busy store is one line at once, not a traceback 40 s into a run.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path

from medflow.spec import PipelineSpec, step_items

# a prepared array may take this share of one local worker's memory (the worker also holds its
# input volume and the step's intermediates)
WORKER_SHARE = 0.25


def preflight(spec: PipelineSpec) -> list[str]:
    """Problems found without running: one ``field: message`` line each; empty when none."""
    from medflow import kinds

    source = _source_problems(spec)
    labels = _label_problems(spec)
    keys = _label_key_problems(spec) if not source and not labels else []
    return [*source, *kinds.get(spec.model.task).preflight(spec), *labels, *keys, *store_problems(spec),
            *_memory_problems(spec)]


def _source_problems(spec: PipelineSpec) -> list[str]:
    """A source folder with nothing to read: no file at all, or none that can be listed (one listing of the
    folder; a DICOMweb server is asked at ingest)."""
    from storage.dicom import list_source
    from storage.dicomweb import is_dicomweb
    from storage.errors import SourceError

    if is_dicomweb(spec.data.source):
        return []
    problems: list[tuple[str, str]] = []
    try:
        files = list_source(spec.data.source, problems)
    except SourceError as exc:
        return [f"data.source: {exc}"]
    except Exception:  # noqa: BLE001 - e.g. refused by the confinement: the run reports it
        return []
    what = {"dicom": "DICOM files (any layout)", "images": "images in one subfolder per class"}.get(
        spec.data.format, f"{spec.data.format} volume files in one subfolder per class")
    if not files and not problems:
        return [f"data.source: the folder {spec.data.source!r} holds no files; point it at the folder that holds "
                f"the {what}"]
    if not files:
        first = problems[0][1]
        return [f"data.source: none of the {len(problems)} entries of {spec.data.source!r} can be read (the first: "
                f"{first})"]
    return []


def _label_problems(spec: PipelineSpec) -> list[str]:
    import pandas as pd

    from medflow.splitting import label_text

    lab = spec.data.labels
    if lab is None:
        return []
    try:
        table = pd.read_csv(lab.path, dtype=str, nrows=1_000_000)
    except Exception as exc:  # noqa: BLE001 - any reason the CSV cannot be read is the problem to report
        return [f"data.labels.path: cannot be read as CSV: {type(exc).__name__}: {exc}"]
    problems = [f"data.labels: the CSV has no column {col!r} ({name}); its columns are {list(table.columns)}"
                for name, col in (("key_column", lab.key_column_name), ("label_column", lab.label_column))
                if col not in table.columns]
    if problems:
        return problems
    values = {label_text(v) for v in table[lab.label_column].dropna() if str(v).strip()}
    if not values:
        return [f"data.labels: column {lab.label_column!r} has no labels"]
    if lab.classes:
        unknown = sorted(values - {label_text(c) for c in lab.classes})
        if unknown:
            problems.append(f"data.labels.classes: labels {unknown[:5]} in the CSV are not among the classes "
                            f"{list(lab.classes)}")
    elif len(values) < 2:
        problems.append(f"data.labels: column {lab.label_column!r} holds one class only ({sorted(values)}); a "
                        "classifier needs at least two")
    return problems


def _label_key_problems(spec: PipelineSpec) -> list[str]:
    """No key of the labels CSV found in the source: with DICOM, the key attribute of the source's files
    (a header scan that stops at the first match, cached per file); with images, the listed paths."""
    import pandas as pd

    from storage.dicomweb import is_dicomweb

    lab = spec.data.labels
    if lab is None or is_dicomweb(spec.data.source):
        return []
    try:
        keys = {str(v).strip() for v in pd.read_csv(lab.path, dtype=str)[lab.key_column_name].dropna()}
    except Exception:  # noqa: BLE001 - _label_problems reports an unreadable CSV
        return []
    keys.discard("")
    if not keys:
        return [f"data.labels: column {lab.key_column_name!r} of {lab.path!r} has no keys"]
    if lab.key == "path":
        found = sum(1 for k in keys if (Path(spec.data.source) / k).is_file())
        if not found:
            return [f"data.labels: none of the {len(keys)} paths in column {lab.key_column_name!r} names a file in "
                    f"data.source (paths are relative to {spec.data.source!r}, e.g. 'normal/img001.png')"]
        return []
    try:
        scanned, matched = key_scan(spec.data.source, lab.key, keys)
    except Exception:  # noqa: BLE001 - a source the listing refuses: _source_problems or the run reports it
        return []
    if scanned and not matched:
        return [f"data.labels: none of the {len(keys)} values in column {lab.key_column_name!r} is the {lab.key} of "
                f"a file in data.source ({scanned} DICOM files read); check that data.labels.key names the attribute "
                f"the CSV holds (StudyInstanceUID, PatientID or AccessionNumber) and that the CSV belongs to this "
                f"source"]
    return []


def key_scan(source: str, attribute: str, keys: set[str]) -> tuple[int, bool]:
    """Read ``attribute`` from the source's DICOM files until one holds a value in ``keys``: the number of
    DICOM files read and whether one matched. Each file's value is cached (``$MEDFLOW_CACHE/keys``, by file
    path, size and modification time) as a salted hash, never as the identifier itself, so a second
    validate or the run's own check reads no file again."""
    import hashlib

    import pydicom

    from storage.dicom import list_source

    cache_file: Path | None = None
    cache: dict = {}
    try:
        cache_file = _cache_folder() / f"{hashlib.sha256(str(Path(source).resolve()).encode()).hexdigest()[:24]}.json"
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        pass  # no cache yet, a damaged one, or no cache folder (cache_file stays None: nothing is written)
    if not isinstance(cache, dict) or not isinstance(cache.get("files"), dict) or cache.get("attribute") != attribute:
        cache = {"salt": secrets.token_hex(16), "attribute": attribute, "files": {}}
    salt = cache["salt"]

    def digest(text: str) -> str:
        return hashlib.sha256(f"{salt}\0{text}".encode(errors="surrogateescape")).hexdigest()[:32]

    wanted = {digest(k) for k in keys}
    read, matched, changed = 0, False, False
    for rel, size, mtime in list_source(source, []):
        name = digest(rel)
        entry = cache["files"].get(name)
        if entry and entry[0] == size and entry[1] == mtime:
            value = entry[2]
        else:
            try:
                ds = pydicom.dcmread(os.path.join(source, rel), stop_before_pixels=True, specific_tags=[attribute])
                value = digest(str(ds.get(attribute, "") or "").strip()) if attribute in ds else None
            except Exception:  # noqa: BLE001 - not DICOM, or unreadable: ingest quarantines it with its reason
                value = None
            cache["files"][name] = [size, mtime, value]
            changed = True
        if value is None:
            continue
        read += 1
        if value in wanted:
            matched = True
            break
    if changed and cache_file is not None:
        from medflow.runs import write_text_atomic

        try:
            write_text_atomic(cache_file, json.dumps(cache), mode=0o600)
        except OSError:
            pass  # a read-only cache: the next check reads the files again
    return read, matched


def _cache_folder() -> Path:
    folder = Path(os.environ.get("MEDFLOW_CACHE") or Path.home() / ".cache" / "medflow") / "keys"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def store_problems(spec: PipelineSpec) -> list[str]:
    """Another run writing the store."""
    from storage.errors import StoreLockedError
    from storage.store import Store

    if "://" in spec.data.store or not os.path.isdir(spec.data.store):
        return []
    try:
        Store(spec.data.store, create=False).check_writable()
        return []
    except StoreLockedError as exc:
        return [f"data.store: {exc}"]
    except Exception:  # noqa: BLE001 - a store that cannot be opened is reported by the run itself
        return []


def _memory_problems(spec: PipelineSpec) -> list[str]:
    """The largest prepared array, from the catalog's shapes and spacings, against a worker's memory."""
    from medflow.preprocessing import shape_trace
    from storage.store import Store

    if "://" in spec.data.store or not os.path.isdir(os.path.join(spec.data.store, "catalog")):
        return []
    try:
        catalog = Store(spec.data.store, create=False).catalog()
    except Exception:  # noqa: BLE001
        return []
    steps = step_items(spec.preprocess)
    largest, shape_out = 0, None
    for entry in catalog.values():
        trace = shape_trace(entry["shape"], entry["spacing"], steps)
        shape = trace[-1][3] if trace else tuple(entry["shape"])
        n = math.prod(shape)
        if n > largest:
            largest, shape_out = n, shape
    worker = _worker_memory(spec)
    need = 4 * largest  # float32
    if worker and need > WORKER_SHARE * worker:
        return [f"preprocess: the largest prepared array of the store's series is {list(shape_out)} "
                f"({need / 2**30:.1f} GiB as float32); a local worker has {worker / 2**30:.1f} GiB "
                f"(run.dask.n_workers={spec.run.dask.n_workers}); resample coarser, crop, or use fewer workers"]
    return []


def _worker_memory(spec: PipelineSpec) -> int | None:
    if spec.run.dask.address:
        return None  # an existing cluster: its workers' memory is its own
    try:
        import psutil

        return psutil.virtual_memory().total // spec.run.dask.n_workers
    except Exception:  # noqa: BLE001
        return None
