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
def read_studies_task(run, source: str, scratch: str) -> list[dict]:
    """New studies into a scratch store with the run's ingest settings; returns the files not used."""
    log = get_run_logger()
    options = replace(ingest_options(run.spec), masks=None, deidentify=True)
    store = Store(scratch)
    index = scan_source(source, store)
    plan = plan_series(index, pseudo=store.pseudonymizer(), catalog={}, previous_quarantine=[], options=options)
    results = [ingest_series(scratch, source, p, options) for p in plan.todo]
    quarantine = list(plan.quarantine) + [r for res in results for r in res["quarantine"]]
    log.info("predict: %d series read, %d file(s) not used", sum(r["status"] == "ingested" for r in results),
             len(quarantine))
    return quarantine


@task(name="predict_series")
def predict_series_task(run, scratch: str, source: str, output: str) -> list[dict]:
    """The run's task kind predicts every series of the scratch store and writes its outputs."""
    return predict_store(run, scratch, Path(source), Path(output))
