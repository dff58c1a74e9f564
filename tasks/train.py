"""Prefect tasks of the train stage: split the cohort, train the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from storage.store import Store
from tasks.splitting import join_labels, mask_cohort, patient_split


@task(name="split_cohort")
def split_cohort_task(spec, run_dir: str) -> str:
    """Join labels to the catalog by pseudonym, split by patient, write ``split.csv``; returns its path."""
    log = get_run_logger()
    store = Store(spec.data.store)
    if spec.model.task == "segmentation":
        df = mask_cohort(store.catalog(), missing=spec.data.masks.missing)
        if df.empty:
            raise ValueError("no series in the store has a mask; check data.masks and the quarantine table")
    else:
        if spec.data.labels is None:
            raise ValueError("data.labels is required for classification; add data.labels.path to the spec")
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
    epochs = spec.train.epochs
    progress = create_progress_artifact(0.0, key="train-progress", description=f"epochs of {epochs}")

    def on_epoch(epoch, total, logs):
        update_progress_artifact(progress, 100.0 * epoch / total,
                                 description=f"epoch {epoch}/{total}, val_loss {logs.get('val_loss', float('nan')):.4f}")

    if spec.model.task == "segmentation":
        result = _train_segmentation(spec, store, prep_key, tr, va, shapes, run_dir, on_epoch)
        log.info("trained %d epochs in %.1f s on %s; best epoch %s", result["epochs_run"], result["seconds"],
                 result["device"], result["best_epoch"])
        return {k: v for k, v in result.items() if k != "history"}
    if len(shapes) != 1:
        raise ValueError(f"prepared volumes differ in shape ({sorted(shapes)[:3]}...); end `preprocess` with a "
                         "`resize` or `crop_pad` step so that every volume has the same shape")
    input_shape = (*shapes.pop(), 1)
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


def prep_pair(store: Store, prep_key: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A prepared volume and its prepared mask (zeros for a series without one: ``data.masks.missing: empty``)."""
    image = store.read_prep(prep_key, key)
    mask = store.read_prep_mask(prep_key, key)
    return image, (mask if mask is not None else np.zeros(image.shape, np.uint8))


def _train_segmentation(spec, store: Store, prep_key: str, tr, va, shapes: set, run_dir: str, on_epoch) -> dict:
    from models.segmentation import train_segmenter

    patch = spec.train.patch_size
    arch = spec.model.arch
    varying = {s[1:] for s in shapes} if arch == "unet2d" else shapes
    if patch is None and len(varying) != 1:
        what = "slice sizes" if arch == "unet2d" else "shapes"
        raise ValueError(f"prepared volumes differ in {what} ({sorted(varying)[:3]}...); set train.patch_size, or "
                         "end `preprocess` with a `resize` or `crop_pad` step")
    return train_segmenter(
        loader=lambda key: prep_pair(store, prep_key, key),
        train_keys=tr["series_key"].tolist(), val_keys=va["series_key"].tolist(), volume_shape=max(shapes),
        arch=arch, params=spec.model.params, train=spec.train.model_dump(), augment=spec.augment.model_dump(),
        run_dir=run_dir, on_epoch=on_epoch,
    )
