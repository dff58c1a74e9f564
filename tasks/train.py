"""Prefect tasks of the train stage: split the cohort, train the model (both through the spec's task kind)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from medflow import kinds
from medflow.runs import write_text_atomic
from medflow.splitting import patient_split
from storage.store import Store


@task(name="split_cohort")
def split_cohort_task(spec, run_dir: str) -> str:
    """The kind's cohort (labels or masks joined to the catalog by pseudonym), split by patient into
    ``split.csv``; returns its path."""
    log = get_run_logger()
    store = Store(spec.data.store)
    df = kinds.get(spec.model.task).cohort(spec, store)
    sp = spec.data.split
    df["split"] = patient_split(df, val=sp.val, test=sp.test, stratify=sp.stratify, seed=sp.seed,
                                order=split_order(store, df, log))
    path = Path(run_dir) / "split.csv"
    write_text_atomic(path, df.to_csv(index=False))
    for name, part in df.groupby("split"):
        counts = part["label_name"].value_counts().to_dict()
        log.info("split %s: %d series, %d patients; %s", name, len(part), part["patient_key"].nunique(),
                 ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return str(path)


def split_order(store: Store, df: pd.DataFrame, log) -> pd.Series | None:
    """Each series' ``content`` key (the same in any store), which makes the split depend on the
    seed alone; None, with a warning, when the store holds series ingested before it had them."""
    catalog = store.catalog()
    content = df["series_key"].map(lambda k: catalog.get(k, {}).get("content"))
    if content.isna().any():
        log.warning("%d series in the store predate content keys: the split follows the store's pseudonyms "
                    "(re-ingest into a new store for a split that the seed alone fixes)", int(content.isna().sum()))
        return None
    return content


@task(name="train_model")
def train_model_task(spec, run_dir: str, prep_key: str, split_csv: str) -> dict:
    """Train the spec's model on the train split, early-stopping on the validation split."""
    log = get_run_logger()
    epochs = spec.train.epochs
    progress = create_progress_artifact(0.0, key="train-progress", description=f"epochs of {epochs}")

    def on_epoch(epoch, total, logs):
        update_progress_artifact(progress, 100.0 * epoch / total,
                                 description=f"epoch {epoch}/{total}, val_loss {logs.get('val_loss', float('nan')):.4f}")

    cases = pd.read_csv(split_csv, dtype={"label_name": str})
    result = kinds.get(spec.model.task).train(spec, Store(spec.data.store), prep_key, cases, Path(run_dir), on_epoch)
    log.info("trained %d epochs in %.1f s on %s; best epoch %s", result["epochs_run"], result["seconds"],
             result["device"], result["best_epoch"])
    return {k: v for k, v in result.items() if k != "history"}
