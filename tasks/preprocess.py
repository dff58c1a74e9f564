"""Prefect task of the preprocess stage."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from storage.store import Store
from medflow.dask_runtime import cluster_options, dask_client, run_all
from medflow.preprocessing import preprocess_series, steps_key
from medflow.retry import retry_transient
from medflow.runs import note_work


def stale_series(store: Store, prep_key: str) -> list[str]:
    """Series whose prepared array is missing or was made from other source data."""
    out = []
    for key, entry in store.catalog().items():
        attrs = store.prep_attrs(prep_key, key)
        if attrs is None or attrs.get("source_digest") != entry["digest"]:
            out.append(key)
    return out


@task(name="preprocess_series", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient)
def preprocess_task(store_root: str, steps: list[tuple[str, dict]], dask: dict) -> dict:
    """Apply the spec's steps to every series not yet prepared with the same steps and source."""
    log = get_run_logger()
    store = Store(store_root)
    prep_key = steps_key(steps)
    todo = stale_series(store, prep_key)
    total = len(store.catalog())
    if not todo:
        log.info("preprocess: nothing to do, %d series already prepared under prep/%s", total, prep_key)
        return {"prep_key": prep_key, "computed": 0, "reused": total}
    progress = create_progress_artifact(0.0, key="preprocess-progress", description=f"series prepared of {len(todo)}")

    def on_result(done, n, res):
        update_progress_artifact(progress, 100.0 * done / n)
        note_work("preprocess", done, n, "series")

    with dask_client(**cluster_options(dask, Store(store_root))) as client:
        run_all(client, preprocess_series, [(store_root, k, steps, prep_key) for k in todo], on_result=on_result)
    log.info("preprocess: %d series computed, %d reused (prep/%s)", len(todo), total - len(todo), prep_key)
    return {"prep_key": prep_key, "computed": len(todo), "reused": total - len(todo)}
