"""The predict flow: a trained run on new DICOM studies → per series a DICOM SEG, a DICOM SR of detections,
or scores."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.logging import get_run_logger

from medflow import kinds
from medflow.access import check_allowed, scratch_dir
from medflow.predicting import input_folder, load_run, write_outputs
from tasks.predict import predict_series_task, read_studies_task


@flow(name="predict")
def predict_flow(model: str, input: str, output: str) -> dict:  # noqa: A002 (the CLI's words)
    """Apply the run at ``model`` to the DICOM studies at ``input`` (a folder, or a spec's data.source);
    write what the run's task kind writes (DICOM SEGs, SRs of detections, or scores), ``predictions.csv`` and
    ``predictions.json`` into ``output``."""
    log = get_run_logger()
    for what, path in (("model run", model), ("input", input), ("output", output)):
        check_allowed(path, what)
    run = load_run(model)
    source = input_folder(input)
    out = Path(output).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    log.info("predict with run %s (%s, %s)", run.run_id, run.spec.model.task, run.spec.model.arch)
    for warning in run.metrics.get("warnings", []):
        log.warning("the model's evaluation warned: %s", warning)
    # the scratch store holds decoded images of the new studies: a private temp folder, removed afterwards
    with scratch_dir("medflow-predict-") as scratch:
        quarantine, image_files = read_studies_task(run, str(source), scratch)
        rows = predict_series_task(run, scratch, str(source), str(out), image_files)
    summary = write_outputs(rows, out, run, quarantine)
    columns = kinds.get(run.spec.model.task).predict_table_columns()
    table = [{k: r.get(k) for k in columns if k in r} for r in rows]
    create_table_artifact(table or [{"series_key": "none"}], key="predict-results",
                          description=f"predictions of run {run.run_id} (pseudonymous series keys)")
    return {"output": str(out), "series": len(rows), "not_used": len(quarantine), "run_id": summary["run_id"]}
