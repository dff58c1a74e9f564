"""Prefect task of the validate/test stage (the spec's task kind does the work)."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from medflow import kinds
from medflow.tracking import log_evaluation
from storage.store import Store
from medflow.tables import read_csv


@task(name="evaluate_model")
def evaluate_model_task(spec, run_dir: str, prep_key: str, split_csv: str, model_path: str) -> dict:
    """Predict, choose on validation, score the test split; writes ``predictions.csv`` (pseudonymous keys)
    and ``metrics.json`` into the run folder."""
    cases = read_csv(split_csv, dtype={"label_name": str})
    result = kinds.get(spec.model.task).evaluate(spec, Store(spec.data.store), prep_key, cases, model_path,
                                                 Path(run_dir))
    log_evaluation(run_dir, result, spec_name=spec.name)
    return result
