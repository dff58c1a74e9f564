"""The ingest flow: DICOM folder → Zarr store (incremental, de-identified, parallel on Dask)."""

from __future__ import annotations

from prefect import flow

from medflow.spec import PipelineSpec, as_spec
from storage.store import Store
from tasks.ingest import ingest_options, ingest_series_task, record_quarantine_task, scan_source_task


@flow(name="ingest", log_prints=False)
def ingest_flow(spec: PipelineSpec | str) -> dict:
    """Scan ``data.source``, ingest new or changed series, record what was quarantined.

    ``spec`` is a spec or the path of a spec file. Holds the store's writer lock throughout.
    """
    spec = as_spec(spec)
    options = ingest_options(spec)
    with Store(spec.data.store).writer_lock(purpose="ingest"):
        retries = {"retries": spec.run.retries}
        scan = scan_source_task.with_options(**retries)(spec.data.source, spec.data.store, options)
        results = ingest_series_task.with_options(**retries)(spec.data.source, spec.data.store, scan.todo, options,
                                                             spec.run.dask.model_dump())
        n_quarantined = record_quarantine_task(spec.data.store, scan, results)
    return {
        "files": scan.n_files,
        "ingested": sum(r["status"] == "ingested" for r in results),
        "quarantined_series": sum(r["status"] == "quarantined" for r in results),
        "unchanged": len(scan.unchanged),
        "quarantined_files": n_quarantined,
    }
