"""The train flow: patient-level split, then model training with early stopping on validation."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from medflow.spec import PipelineSpec
from tasks.train import combine_folds_task, split_cohort_task, train_fold_task, train_model_task


@flow(name="train", task_runner=ThreadPoolTaskRunner())
def train_flow(spec: PipelineSpec, run_dir: str, prep_key: str) -> dict:
    """Split, then train one model (early-stopping on ``val``), or with ``data.split.folds: K`` one model per
    fold, ``train.fold_workers`` at a time, combined into the ensemble."""
    split_csv = split_cohort_task(spec, run_dir)
    folds = spec.data.split.folds
    if not folds:
        result = train_model_task(spec, run_dir, prep_key, split_csv)
        return {**result, "split_csv": split_csv}
    results, at_once = [], spec.train.fold_workers
    for start in range(0, folds, at_once):
        futures = [train_fold_task.submit(spec, run_dir, prep_key, split_csv, fold)
                   for fold in range(start, min(start + at_once, folds))]
        results += [f.result() for f in futures]
    return {**combine_folds_task(run_dir, results), "split_csv": split_csv}
