"""The ingest flow: DICOM folder, DICOMweb server or image folder → Zarr store (incremental, de-identified,
parallel on Dask)."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.utilities.annotations import quote

from medflow.access import scratch_dir
from medflow.spec import PipelineSpec, as_spec
from storage.dicomweb import is_dicomweb
from storage.store import Store
from medflow.dask_runtime import flow_cluster
from tasks.ingest import (
    ingest_images_task,
    volume_options,
    ingest_options,
    ingest_series_task,
    pull_dicomweb_task,
    record_quarantine_task,
    images_listing,
    masks_table,
    quarantine_paths_task,
    scan_source_task,
)

QUARANTINE_PATHS = "quarantine-paths.csv"


@flow(name="ingest", log_prints=False)
def ingest_flow(spec: PipelineSpec | str) -> dict:
    """Ingest new or changed series of ``data.source`` (a folder, or a DICOMweb server) into the store.

    ``spec`` is a spec or the path of a spec file. Holds the store's writer lock throughout.
    """
    spec = as_spec(spec, ingest_only=True)
    with Store(spec.data.store).writer_lock(purpose="ingest"):
        if spec.data.format != "dicom":  # files of images or volumes, in class folders or listed in a CSV
            result = ingest_images_task.with_options(retries=spec.run.retries)(
                spec.data.source, spec.data.store, images_listing(spec), spec.ingest.color,
                spec.run.dask.model_dump(), volume_options(spec), spec.data.layout)
            return {**result, "quarantine_paths": _paths_file(spec)}
        if not is_dicomweb(spec.data.source):
            return {**_ingest_folder(spec, spec.data.source, merge=False), "quarantine_paths": _paths_file(spec)}
        # raw DICOM holds PHI: it is staged outside the store and removed afterwards
        with scratch_dir("medflow-dicomweb-") as staging:
            pulled = pull_dicomweb_task.with_options(retries=spec.run.retries)(spec.data.source, spec.data.store,
                                                                               staging)
            return {**_ingest_folder(spec, staging, merge=True), "dicomweb": pulled}


def _paths_file(spec: PipelineSpec) -> str:
    """The quarantined files with their paths: identifying, so in a folder named so beside the runs folder,
    outside the store, the runs and everything a report or artifact is made from."""
    return quarantine_paths_task(spec.data.store, spec.data.source,
                                 str(Path(spec.runs_dir).parent / "identifying" / QUARANTINE_PATHS))


def _ingest_folder(spec: PipelineSpec, source: str, *, merge: bool) -> dict:
    options = ingest_options(spec)
    retries = {"retries": spec.run.retries}
    # one cluster for both tasks: the header scan runs on it too
    with flow_cluster(spec.run.dask.model_dump(), Store(spec.data.store)) as dask:
        scan = scan_source_task.with_options(**retries)(source, spec.data.store, options, masks_table(spec), dask)
        # quote: the plans hold a header record per file, and Prefect would otherwise walk every
        # value of them looking for futures (3 s per task for the demo's 6405 files)
        results = ingest_series_task.with_options(**retries)(source, spec.data.store, quote(scan.todo), options, dask)
    n_quarantined = record_quarantine_task(spec.data.store, quote(scan), quote(results), merge)
    return {
        "files": scan.n_files,
        "ingested": sum(r["status"] == "ingested" for r in results),
        "quarantined_series": sum(r["status"] == "quarantined" for r in results),
        "unchanged": len(scan.unchanged),
        "quarantined_files": n_quarantined,
    }
