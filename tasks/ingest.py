"""Prefect tasks of the ingest stage: thin adapters over ``storage.ingest``."""

from __future__ import annotations

import functools

import time

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from storage.ingest import (
    IngestOptions,
    ScanResult,
    SeriesPlan,
    ingest_series,
    nifti_mask_files,
    plan_series,
    read_marks_table,
    scan_source,
)
from storage.store import Store
from medflow.dask_runtime import cluster_options, dask_client, map_on, run_all, total_threads, worker_memory
from medflow.retry import retry_transient
from medflow.runs import note_work


def ingest_options(spec) -> IngestOptions:
    ing = spec.ingest
    return IngestOptions(deidentify=ing.deidentify, modalities=tuple(ing.modalities) if ing.modalities else None,
                         min_slices=ing.min_slices, spacing_tolerance=ing.spacing_tolerance, color=ing.color,
                         qc_mixed=ing.qc.mixed, qc_duplicates=ing.qc.duplicates, qc_spacing=ing.qc.spacing,
                         qc_tilt=ing.qc.tilt, tilt_tolerance_deg=ing.qc.tilt_tolerance_deg,
                         masks=spec.data.masks.source if spec.data.masks else None,
                         fallback_spacing=ing.fallback_spacing,
                         marks=spec.data.marks.source if spec.data.marks else None,
                         marks_table=spec.data.marks.table if spec.data.marks else None)


def masks_table(spec) -> dict | None:
    """The NIfTI masks table settings of a spec (None without one)."""
    masks = spec.data.masks
    if masks is None or masks.source != "nifti":
        return None
    return {"table": masks.table, "key": masks.key, "key_column": masks.key_column_name,
            "path_column": masks.path_column}


def volume_options(spec) -> dict | None:
    """What a volume-file source reads (``data.format`` nifti, nrrd, mha or volumes), or None for images."""
    from storage.volumes import SUFFIXES, VOLUME_SUFFIXES

    fmt = spec.data.format
    if fmt in ("dicom", "images"):
        return None
    return {"suffixes": list(VOLUME_SUFFIXES if fmt == "volumes" else SUFFIXES[fmt]),
            "time_point": spec.ingest.time_point}


def images_listing(spec) -> dict | None:
    """How an image-folder source lists its images: None for class folders, else the labels CSV."""
    lab = spec.data.labels
    if lab is None or lab.key != "path":
        return None
    return {"table": lab.path, "path_column": lab.key_column_name, "label_column": lab.label_column,
            "split_column": spec.data.split.column if spec.data.split.from_ == "column" else None}


@task(name="scan_source", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def scan_source_task(source: str, store_root: str, options: IngestOptions, nifti: dict | None = None,
                     dask: dict | None = None) -> ScanResult:
    """Read headers of new or changed files (on Dask, given ``dask_client`` options), group them
    into series and decide what to ingest."""
    log = get_run_logger()
    store = Store(store_root)
    if dask is None:
        index = scan_source(source, store)
    else:
        with dask_client(**cluster_options(dask, store)) as client:
            index = scan_source(source, store, map_fn=map_on(client), n_chunks=4 * total_threads(client))
    pseudo = store.pseudonymizer()
    nifti_masks = nifti_mask_files(**nifti, pseudo=pseudo, index=index) if nifti else None
    if nifti_masks is not None:
        log.info("masks: %d series have a NIfTI mask in the table", len(nifti_masks))
    marks = read_marks_table(options.marks_table, pseudo) if options.marks == "csv" else {}
    for what, by_key in marks.items():
        if what == "marks_table_problems":
            if by_key:
                log.warning("marks: %d row(s) of the marks table cannot be used (quarantined with their lines)",
                            len(by_key))
            continue
        log.info("marks: %d %s on %d %s in the marks table", sum(map(len, by_key.values())),
                 "box(es)" if what == "csv_image_marks" else "lesion(s)", len(by_key),
                 "image(s)" if what == "csv_image_marks" else "series")
    result = plan_series(index, pseudo=pseudo, catalog=store.catalog(), previous_quarantine=store.quarantine(),
                         options=options, nifti_masks=nifti_masks, **marks)
    log.info("scan: %d files; %d series to ingest, %d unchanged; %d file(s) quarantined at scan",
             result.n_files, len(result.todo), len(result.unchanged),
             sum(1 for r in result.quarantine if r.get("stage") == "scan"))
    return result


@task(name="ingest_series", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def ingest_series_task(source: str, store_root: str, plans: list[SeriesPlan], options: IngestOptions,
                       dask: dict) -> list[dict]:
    """Ingest every planned series on Dask; each worker writes its series and returns a summary."""
    log = get_run_logger()
    if not plans:
        log.info("ingest: nothing to do, every series is already in the store")
        return []
    progress = create_progress_artifact(0.0, key="ingest-progress", description=f"series ingested of {len(plans)}")

    step = max(1, len(plans) // 20)  # about 20 progress lines however large the source; every quarantine said
    started = time.perf_counter()

    def on_result(done, total, res):
        update_progress_artifact(progress, 100.0 * done / total)
        note_work("ingest", done, total, "series")
        if res["status"] != "ingested":
            log.info("ingest %d/%d: %s %s: %s", done, total, res["series_key"], res["status"], res.get("reason"))
        elif done % step == 0 or done == total:
            rate = done / max(time.perf_counter() - started, 1e-9)
            log.info("ingest %d/%d series (%.1f/s, about %.0f s left)", done, total, rate, (total - done) / rate)

    with dask_client(**cluster_options(dask, Store(store_root))) as client:
        limits = [m for m in worker_memory(client) if m]
        budget = int(0.6 * sum(limits)) if limits else None  # leave room for the workers themselves
        plans, too_big = split_by_memory(plans, limits)
        results = [too_large(p, max(limits)) for p in too_big]
        for res in results:
            log.warning("ingest: %s quarantined: %s", res["series_key"], res["reason"])
        results += run_all(client, ingest_series, [(store_root, source, p, options) for p in plans],
                           on_result=on_result, weights=[p.memory for p in plans], budget=budget,
                           on_error=lambda i, exc: worker_died(plans[i], exc))
    n_ok = sum(r["status"] == "ingested" for r in results)
    log.info("ingest: %d series ingested, %d quarantined", n_ok, len(results) - n_ok)
    return results


def split_by_memory(plans: list[SeriesPlan], limits: list[int]) -> tuple[list[SeriesPlan], list[SeriesPlan]]:
    """(plans a worker can hold, plans too large for any worker: over 80% of the largest limit)."""
    if not limits:
        return plans, []
    ceiling = 0.8 * max(limits)
    return [p for p in plans if p.memory <= ceiling], [p for p in plans if p.memory > ceiling]


def worker_died(plan: SeriesPlan, exc: Exception) -> dict:
    """A series whose ingest killed its Dask workers (a decoder crash, or the memory limit):
    quarantined, so that one series cannot stop the ingest. Without a digest: tried again next run."""
    from distributed import KilledWorker

    if not isinstance(exc, KilledWorker):
        raise exc
    reason = ("the Dask worker died while ingesting this series (a decoder crash, or over its memory "
              "limit); it is tried again by the next ingest")
    rows = [{"path": f, "reason": reason, "stage": "ingest", "series_key": plan.series_key} for f in plan.files]
    return {"series_key": plan.series_key, "status": "quarantined", "parts": 0, "shape": None, "reason": reason,
            "quarantine": rows, "seconds": 0.0}


def too_large(plan: SeriesPlan, worker_limit: int) -> dict:
    """A series that no worker can hold: quarantined before it can OOM-kill one.

    Its rows carry no digest, so a later run (perhaps with bigger workers) tries it again.
    """
    reason = (f"series too large for the Dask workers: about {plan.memory / 2**30:.1f} GiB to ingest, "
              f"workers have {worker_limit / 2**30:.1f} GiB; use workers with more memory (run.dask)")
    rows = [{"path": f, "reason": reason, "stage": "ingest", "series_key": plan.series_key} for f in plan.files]
    return {"series_key": plan.series_key, "status": "quarantined", "parts": 0, "shape": None, "reason": reason,
            "quarantine": rows, "seconds": 0.0}


@task(name="record_quarantine")
def record_quarantine_task(store_root: str, scan: ScanResult, results: list[dict], merge: bool = False) -> int:
    """Write the quarantine table: scan rows, rows of unchanged series, and rows of this run.

    With ``merge`` (a source that is pulled incrementally, like DICOMweb), rows of earlier
    runs about files and series this run did not touch are kept.
    """
    store = Store(store_root)
    rows = list(scan.quarantine)
    for res in results:
        rows.extend(res["quarantine"])
    if merge:
        touched_keys = {p.series_key for p in scan.todo}
        touched_files = ({store.path_key(r["path"]) if "path" in r else r["file"] for r in rows}
                         | {store.path_key(f) for p in scan.todo for f in p.files})
        rows += [r for r in store.quarantine()
                 if r.get("series_key") not in touched_keys and r["file"] not in touched_files]
    store.write_quarantine(rows)
    return len(store.quarantine())  # files: one row each


@task(name="pull_dicomweb", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def pull_dicomweb_task(source: str, store_root: str, staging: str) -> dict:
    """List series on a DICOMweb server and fetch those the store does not hold yet into ``staging``."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from storage.dicomweb import known_instances, list_series, make_client, pull_series, series_to_pull

    log = get_run_logger()
    store = Store(store_root)
    client = make_client(source)
    remote = list_series(client, store.pseudonymizer())
    todo = series_to_pull(remote, known_instances(store.catalog(), store.quarantine()))
    log.info("dicomweb: %d series listed, %d new or changed to fetch", len(remote), len(todo))
    files = 0
    if todo:
        progress = create_progress_artifact(0.0, key="dicomweb-progress", description=f"series fetched of {len(todo)}")
        with ThreadPoolExecutor(max_workers=4) as pool:  # I/O-bound: a few requests in flight
            for done, n in enumerate(pool.map(lambda s: pull_series(client, s, Path(staging)), todo), start=1):
                files += n
                update_progress_artifact(progress, 100.0 * done / len(todo))
                note_work("fetch (DICOMweb)", done, len(todo), "series")
    return {"listed": len(remote), "fetched": len(todo), "files": files}


@task(name="ingest_images", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def ingest_images_task(source: str, store_root: str, listing: dict | None, color: str, dask: dict,
                       volumes: dict | None = None, layout: str | None = None) -> dict:
    """Ingest a folder of image files (PNG/JPEG/BMP/TIFF; with ``volumes``, NIfTI/NRRD/MetaImage files of the
    formats ``volumes["suffixes"]``) in class folders, or the CSV in ``listing``, on Dask; write the quarantine
    table; withdraw files no longer in the source."""
    from storage.images import ingest_images, list_class_folders, list_csv, list_split_folders, resolve_duplicates
    from storage.ingest import chunk_files
    from storage.volumes import COMPANIONS, ingest_volumes

    log = get_run_logger()
    store = Store(store_root)
    what, kind = ("volume", "volume") if volumes else ("image", "image")
    folders = {"suffixes": tuple(volumes["suffixes"]), "what": what, "companions": COMPANIONS} \
        if volumes else {}
    if listing:
        items, quarantine = list_csv(source, **listing)
    elif layout == "folders":
        items, quarantine = list_split_folders(source, **folders)
        log.info("%ss: the layout's splits: %s", what, ", ".join(
            f"{s} {sum(i.split == s for i in items)}" for s in ("train", "val", "test")))
    else:
        items, quarantine = list_class_folders(source, **folders)
    log.info("%ss: %d file(s) in %d class(es); %d file(s) not usable at listing", what, len(items),
             len({i.label for i in items}), len(quarantine))
    progress = create_progress_artifact(0.0, key="ingest-progress", description=f"{what}s ingested of {len(items)}")
    chunks = chunk_files(items, 4 if volumes else 16) if items else []
    done = {"n": 0}

    def on_result(i, total, res):
        done["n"] += res["ingested"] + res["unchanged"] + len(res["quarantine"])
        update_progress_artifact(progress, 100.0 * i / total)
        note_work("ingest", done["n"], len(items), f"{what}s")

    with dask_client(**cluster_options(dask, store)) as client:
        # the options reach the workers with the function
        reader = functools.partial(ingest_volumes, time_point=volumes.get("time_point")) if volumes else \
            functools.partial(ingest_images, color=color)
        results = run_all(client, reader, [(store_root, source, c) for c in chunks], on_result=on_result) \
            if chunks else []
    for res in results:
        quarantine += res["quarantine"]
    withdraw, rows = resolve_duplicates(results)
    quarantine += rows
    present = {key for res in results for key, *_ in res["keys"]} - set(withdraw)
    gone = [k for k, e in store.catalog().items() if e.get("kind") == kind and k not in present]
    for key in withdraw + gone:
        store.withdraw_series(key)
    store.write_quarantine(quarantine)
    summary = {"files": len(items) + sum(1 for r in quarantine if r["stage"] == "scan"),
               "ingested": sum(r["ingested"] for r in results), "unchanged": sum(r["unchanged"] for r in results),
               "quarantined_files": len(quarantine), "withdrawn": len(withdraw) + len(gone),
               "noted": sum(r.get("noted", 0) for r in results)}
    log.info(f"{what}s: %(ingested)d ingested, %(unchanged)d unchanged, %(quarantined_files)d quarantined, "
             "%(withdrawn)d withdrawn", summary)
    if summary["noted"]:
        log.info("images: %d stored with a change noted in the catalog (EXIF orientation applied, alpha channel "
                 "dropped, colour converted): `notes` of their catalog entries", summary["noted"])
    return summary


@task(name="list_quarantine")
def quarantine_paths_task(store_root: str, source: str, out: str) -> str:
    """Write the quarantine table with each file's path to ``out`` (a CSV outside the store).

    The store names files by path key only; this file is where a user finds them. It is
    identifying (file and folder names carry UIDs and names): never a Prefect artifact."""
    from pathlib import Path

    import pandas as pd

    from medflow.runs import write_text_atomic
    from medflow.tables import to_csv
    from storage.dicom import printable_path
    from storage.ingest import with_paths

    store = Store(store_root)
    rows = with_paths(store.quarantine(), store, source)
    table = pd.DataFrame(rows, columns=["path", "reason", "stage", "series_key", "file"])
    table["path"] = table["path"].map(printable_path)
    folder = Path(out).parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # the paths are identifying: this user's eyes only
    write_text_atomic(out, to_csv(table), mode=0o600)
    return out
