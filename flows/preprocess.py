"""The preprocess flow: the spec's steps on every series, in parallel on Dask, cached in the store."""

from __future__ import annotations

from prefect import flow

from medflow.spec import PipelineSpec
from tasks.preprocess import preprocess_task


@flow(name="preprocess")
def preprocess_flow(spec: PipelineSpec) -> dict:
    return preprocess_task(spec.data.store, spec.steps(), spec.run.dask.model_dump())
