"""Checks of a valid spec against the files and the store it names, before any run starts.

``medflow validate`` prints them; ``medflow run`` refuses to start with any of them, so that a
missing label column or a busy store is one line at once, not a traceback 40 s into a run.
"""

from __future__ import annotations

import math
import os

from medflow.spec import PipelineSpec, step_items

# a prepared array may take this share of one local worker's memory (the worker also holds its
# input volume and the step's intermediates)
WORKER_SHARE = 0.25


def preflight(spec: PipelineSpec) -> list[str]:
    """Problems found without running: one ``field: message`` line each; empty when none."""
    from medflow import kinds

    return [*_source_problems(spec), *kinds.get(spec.model.task).preflight(spec), *_label_problems(spec),
            *store_problems(spec), *_memory_problems(spec)]


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
    what = "images in one subfolder per class" if spec.data.format == "images" else "DICOM files (any layout)"
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
