"""Prefect tasks of ``medflow predict``: read new studies into a scratch store, predict them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from medflow.predicting import predict_store
from storage.ingest import ingest_series, plan_series, scan_source
from storage.store import Store
from tasks.ingest import ingest_options


@task(name="read_studies")
def read_studies_task(run, source: str, scratch: str) -> tuple[list[dict], dict[str, str] | None]:
    """New studies into a scratch store with the run's ingest settings; returns the files not used and, for a
    run on PNG/JPEG images, the file of each stored image (None for DICOM)."""
    log = get_run_logger()
    if run.spec.data.format != "dicom":
        from storage.images import ingest_images, list_unlabelled
        from storage.volumes import COMPANIONS, ingest_volumes
        from tasks.ingest import volume_options

        volumes = volume_options(run.spec)
        if volumes:
            items, quarantine = list_unlabelled(source, suffixes=tuple(volumes["suffixes"]), what="volume",
                                                companions=COMPANIONS)
            result = ingest_volumes(scratch, source, items, time_point=volumes["time_point"])
        else:
            items, quarantine = list_unlabelled(source)
            result = ingest_images(scratch, source, items, color=run.spec.ingest.color)
        quarantine += result["quarantine"]
        files = {}
        for key, _, rel, *_ in result["keys"]:
            files.setdefault(key, rel)  # the same image twice is predicted once, under its first file
        log.info("predict: %d image(s) read, %d file(s) not used", len(files), len(quarantine))
        return quarantine, files
    options = replace(ingest_options(run.spec), masks=None, deidentify=True)
    store = Store(scratch)
    index = scan_source(source, store)
    plan = plan_series(index, pseudo=store.pseudonymizer(), catalog={}, previous_quarantine=[], options=options)
    results = [ingest_series(scratch, source, p, options) for p in plan.todo]
    quarantine = list(plan.quarantine) + [r for res in results for r in res["quarantine"]]
    log.info("predict: %d series read, %d file(s) not used", sum(r["status"] == "ingested" for r in results),
             len(quarantine))
    return quarantine, None


@task(name="predict_series")
def predict_series_task(run, scratch: str, source: str, output: str, image_files: dict[str, str] | None = None
                        ) -> list[dict]:
    """The run's task kind predicts every series of the scratch store and writes its outputs."""
    return predict_store(run, scratch, Path(source), Path(output), image_files=image_files)
