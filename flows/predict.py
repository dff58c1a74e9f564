"""The predict flow: a trained run on new DICOM studies → DICOM SEG per series, or scores."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from storage.ingest import ingest_series, plan_series, scan_source
from storage.store import Store
from tasks.ingest import ingest_options
from tasks.predict import input_folder, load_run, predict_store, write_outputs


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
    return predict_store(run, scratch, Path(source), Path(output))


@flow(name="predict")
def predict_flow(model: str, input: str, output: str) -> dict:  # noqa: A002 (the CLI's words)
    """Apply the run at ``model`` to the DICOM studies at ``input`` (a folder, or a spec's data.source);
    write DICOM SEGs or scores, ``predictions.csv`` and ``predictions.json`` into ``output``."""
    log = get_run_logger()
    run = load_run(model)
    source = input_folder(input)
    out = Path(output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log.info("predict with run %s (%s, %s)", run.run_id, run.spec.model.task, run.spec.model.arch)
    # the scratch store holds decoded images of the new studies: a private temp folder, removed afterwards
    with tempfile.TemporaryDirectory(prefix="medflow-predict-") as scratch:
        quarantine = read_studies_task(run, str(source), scratch)
        rows = predict_series_task(run, scratch, str(source), str(out))
    summary = write_outputs(rows, out, run, quarantine)
    table = [{k: r.get(k) for k in ("series_key", "seg", "volume_ml", "score", "prediction", "note") if k in r}
             for r in rows]
    create_table_artifact(table or [{"series_key": "none"}], key="predict-results",
                          description=f"predictions of run {run.run_id} (pseudonymous series keys)")
    return {"output": str(out), "series": len(rows), "not_used": len(quarantine), "run_id": summary["run_id"]}
