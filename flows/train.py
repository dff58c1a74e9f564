"""The train flow: patient-level split, then model training with early stopping on validation."""

from __future__ import annotations

from prefect import flow

from medflow.spec import PipelineSpec
from tasks.train import split_cohort_task, train_model_task


@flow(name="train")
def train_flow(spec: PipelineSpec, run_dir: str, prep_key: str) -> dict:
    split_csv = split_cohort_task(spec, run_dir)
    result = train_model_task(spec, run_dir, prep_key, split_csv)
    return {**result, "split_csv": split_csv}
