"""Prefect tasks of the train stage: split the cohort, train the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from storage.store import Store
from tasks.splitting import join_labels, patient_split


@task(name="split_cohort")
def split_cohort_task(spec, run_dir: str) -> str:
    """Join labels to the catalog by pseudonym, split by patient, write ``split.csv``; returns its path."""
    log = get_run_logger()
    if spec.data.labels is None:
        raise ValueError("data.labels is required for classification; add data.labels.path to the spec")
    store = Store(spec.data.store)
    lab = spec.data.labels
    labels = pd.read_csv(lab.path, dtype={lab.key_column_name: str})
    df = join_labels(store.catalog(), labels, key=lab.key, key_column=lab.key_column_name,
                     label_column=lab.label_column, pseudo=store.pseudonymizer())
    if df.empty:
        raise ValueError(f"no series in the store matches a row of {lab.path} by {lab.key}; check data.labels.key")
    sp = spec.data.split
    df["split"] = patient_split(df, val=sp.val, test=sp.test, stratify=sp.stratify, seed=sp.seed)
    path = Path(run_dir) / "split.csv"
    df.to_csv(path, index=False)
    for name, part in df.groupby("split"):
        log.info("split %s: %d series, %d patients, %d positive", name, len(part), part["patient_key"].nunique(),
                 int(part["label"].sum()))
    return str(path)


@task(name="train_model")
def train_model_task(spec, run_dir: str, prep_key: str, split_csv: str) -> dict:
    """Train the spec's model on the train split, early-stopping on the validation split."""
    from models.training import train_classifier

    log = get_run_logger()
    store = Store(spec.data.store)
    df = pd.read_csv(split_csv)
    tr, va = df[df["split"] == "train"], df[df["split"] == "val"]
    shapes = {tuple(store.prep_ref(prep_key, k).open().shape) for k in df["series_key"]}
    if len(shapes) != 1:
        raise ValueError(f"prepared volumes differ in shape ({sorted(shapes)[:3]}...); end `preprocess` with a "
                         "`resize` or `crop_pad` step so that every volume has the same shape")
    input_shape = (*shapes.pop(), 1)
    epochs = spec.train.epochs
    progress = create_progress_artifact(0.0, key="train-progress", description=f"epochs of {epochs}")

    def on_epoch(epoch, total, logs):
        update_progress_artifact(progress, 100.0 * epoch / total,
                                 description=f"epoch {epoch}/{total}, val_loss {logs.get('val_loss', float('nan')):.4f}")

    result = train_classifier(
        loader=lambda key: store.read_prep(prep_key, key),
        train_keys=tr["series_key"].tolist(), train_labels=tr["label"].to_numpy(np.int64),
        val_keys=va["series_key"].tolist(), val_labels=va["label"].to_numpy(np.int64),
        input_shape=input_shape, arch=spec.model.arch, params=spec.model.params,
        train=spec.train.model_dump(), augment=spec.augment.model_dump(), run_dir=run_dir, on_epoch=on_epoch,
    )
    log.info("trained %d epochs in %.1f s on %s; best epoch %s", result["epochs_run"], result["seconds"],
             result["device"], result["best_epoch"])
    return {k: v for k, v in result.items() if k != "history"}
