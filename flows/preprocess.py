"""The preprocess flow: the spec's steps on every series, in parallel on Dask, cached in the store."""

from __future__ import annotations

from prefect import flow

from medflow.spec import PipelineSpec, as_spec
from storage.store import Store
from tasks.preprocess import preprocess_task


@flow(name="preprocess")
def preprocess_flow(spec: PipelineSpec | str) -> dict:
    """The spec's preprocessing steps on every series not yet prepared; holds the store's writer lock."""
    spec = as_spec(spec)
    with Store(spec.data.store).writer_lock(purpose="preprocess"):
        task = preprocess_task.with_options(retries=spec.run.retries)
        return task(spec.data.store, spec.steps(), spec.run.dask.model_dump())
