"""The evaluate flow: threshold on validation, metrics on test."""

from __future__ import annotations

from prefect import flow

from medflow.spec import PipelineSpec
from tasks.evaluate import evaluate_model_task


@flow(name="evaluate")
def evaluate_flow(spec: PipelineSpec, run_dir: str, prep_key: str, split_csv: str, model_path: str) -> dict:
    return evaluate_model_task(spec, run_dir, prep_key, split_csv, model_path)
