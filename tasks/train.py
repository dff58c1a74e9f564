"""Prefect tasks of the train stage: split the cohort, train the model (both through the spec's task kind)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.logging import get_run_logger

from medflow import kinds
from medflow.runs import note_work, write_json_atomic
from medflow.errors import LabelError
from medflow.splitting import patient_folds, patient_split, predefined_split
from medflow.subgroups import subgroup_columns
from storage.store import Store
from medflow.tables import read_csv, write_csv_atomic


@task(name="split_cohort")
def split_cohort_task(spec, run_dir: str) -> str:
    """The kind's cohort (labels or masks joined to the catalog by pseudonym), split by patient into
    ``split.csv``; returns its path."""
    log = get_run_logger()
    store = Store(spec.data.store)
    df = kinds.get(spec.model.task).cohort(spec, store)
    sp = spec.data.split
    df = pd.concat([df.reset_index(drop=True),
                    subgroup_columns(store.catalog(), df["series_key"])], axis=1)  # for the report's subgroup tables
    order = split_order(store, df, log)
    if sp.from_ == "random":
        df["split"] = patient_split(df, val=sp.val, test=sp.test, stratify=sp.stratify, seed=sp.seed, order=order)
        note = (f"random by patient (split.val {sp.val:g}, split.test {sp.test:g}, seed {sp.seed}"
                f"{', stratified' if sp.stratify else ''})")
    else:
        if "given_split" not in df.columns:
            raise LabelError(f"data.split.from: {sp.from_}: the {spec.model.task} cohort carries no predefined split "
                             "(classification reads it from the layout's folders or the labels CSV; ingest again "
                             "after setting data.layout)")
        where = "the layout's train/val/test folders" if sp.from_ == "layout" else \
            f"the labels CSV's column {sp.column!r}"
        df["split"], note = predefined_split(df, val=sp.val, stratify=sp.stratify, seed=sp.seed, order=order,
                                             where=where)
    log.info("split: %s", note)
    write_json_atomic(Path(run_dir) / "split.json", {"source": sp.from_, "note": note})
    df = df.drop(columns=["given_split"], errors="ignore")
    if sp.folds:  # the same test split; every other patient is validated once, out of fold
        df["fold"] = patient_folds(df, df["split"], k=sp.folds, seed=sp.seed, stratify=sp.stratify, order=order)
        df.loc[df["split"] != "test", "split"] = "val"
        log.info("%d folds: %s patients each", sp.folds, "/".join(
            str(df[df["fold"] == k]["patient_key"].nunique()) for k in range(sp.folds)))
    if order is not None:  # rows (and so the training order) by content, not by the store's pseudonyms
        df = df.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)
    path = Path(run_dir) / "split.csv"
    write_csv_atomic(path, df)
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


# Every training task run carries this tag: a Prefect task concurrency limit on it (`medflow worker
# --train-slots N`, or `prefect concurrency-limit create medflow-train N`) lets N trainings run at once
# on the server's whole fleet (one per GPU) while ingest and preprocessing runs go on. Without a limit
# the tag changes nothing.
TRAIN_TAG = "medflow-train"


@task(name="train_model", tags=[TRAIN_TAG])
def train_model_task(spec, run_dir: str, prep_key: str, split_csv: str) -> dict:
    """Train the spec's model on the train split, early-stopping on the validation split."""
    log = get_run_logger()
    epochs = spec.train.epochs
    progress = create_progress_artifact(0.0, key="train-progress", description=f"epochs of {epochs}")

    def on_epoch(epoch, total, logs):
        note_work("train", epoch, total, "epochs")
        update_progress_artifact(progress, 100.0 * epoch / total,
                                 description=f"epoch {epoch}/{total}, val_loss {logs.get('val_loss', float('nan')):.4f}")

    cases = read_csv(split_csv, dtype={"label_name": str})
    note_work("train", 0, epochs, "epochs")  # the bar from the start of the first epoch, not its end
    result = kinds.get(spec.model.task).train(spec, Store(spec.data.store), prep_key, cases, Path(run_dir), on_epoch)
    log.info("trained %d epochs in %.1f s on %s; best epoch %s", result["epochs_run"], result["seconds"],
             result["device"], result["best_epoch"])
    return {k: v for k, v in result.items() if k != "history"}


def fold_cases(cases: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The cases as fold ``fold`` sees them: its held-out patients are ``val``, the other folds ``train``.

    >>> c = pd.DataFrame({"split": ["val", "val", "val", "test"], "fold": [0, 1, 1, -1]})
    >>> fold_cases(c, 1)["split"].tolist()
    ['train', 'val', 'val', 'test']
    """
    out = cases.copy()
    dev = out["split"] != "test"
    out.loc[dev, "split"] = (out.loc[dev, "fold"] == fold).map({True: "val", False: "train"})
    return out


@task(name="train_fold", task_run_name="train_fold-{fold}", tags=[TRAIN_TAG])
def train_fold_task(spec, run_dir: str, prep_key: str, split_csv: str, fold: int) -> dict:
    """Train fold ``fold``'s model in ``folds/<fold>/`` of the run folder (it resumes there too)."""
    log = get_run_logger()
    folds = spec.data.split.folds
    progress = create_progress_artifact(0.0, key=f"train-progress-fold-{fold}", description=f"fold {fold}")

    def on_epoch(epoch, total, logs):
        note_work(f"train fold {fold + 1}/{folds}", epoch, total, "epochs")
        update_progress_artifact(progress, 100.0 * epoch / total, description=f"fold {fold}/{folds}: epoch "
                                 f"{epoch}/{total}, val_loss {logs.get('val_loss', float('nan')):.4f}")

    cases = fold_cases(read_csv(split_csv, dtype={"label_name": str}), fold)
    note_work(f"train fold {fold + 1}/{folds}", 0, spec.train.epochs, "epochs")
    fold_dir = Path(run_dir) / "folds" / str(fold)
    fold_dir.mkdir(parents=True, exist_ok=True)
    result = kinds.get(spec.model.task).train(spec, Store(spec.data.store), prep_key, cases, fold_dir, on_epoch)
    log.info("fold %d/%d: %d epochs in %.1f s; best epoch %s, best val_loss %.4f", fold + 1, folds,
             result["epochs_run"], result["seconds"], result["best_epoch"], min(result["history"].get("val_loss",
                                                                                                      [float("nan")])))
    return {**{k: v for k, v in result.items() if k != "history"}, "fold": fold,
            "held_out": cases.loc[cases["split"] == "val", "series_key"].tolist(),
            "best_val_loss": float(min(result["history"].get("val_loss", [float("nan")])))}


@task(name="combine_folds")
def combine_folds_task(run_dir: str, results: list[dict]) -> dict:
    """The ensemble ``model.keras`` (mean of the fold models), ``folds.json`` and the run's ``training.json``."""
    from models.ensemble import MANIFEST, build_ensemble
    from models.training import read_history

    log = get_run_logger()
    run = Path(run_dir)
    results = sorted(results, key=lambda r: r["fold"])
    members = [f"folds/{r['fold']}/model.keras" for r in results]
    model = build_ensemble([run / m for m in members], run / "model.keras")
    losses = [r["best_val_loss"] for r in results]
    manifest = {"folds": len(results), "models": members, "held_out": [r["held_out"] for r in results],
                "per_fold": [{k: r[k] for k in ("fold", "epochs_run", "best_epoch", "best_val_loss", "seconds")}
                             for r in results],
                "best_val_loss_mean": float(np.mean(losses)), "best_val_loss_sd": float(np.std(losses, ddof=1))}
    write_json_atomic(run / MANIFEST, manifest)
    first = results[0]
    training = {"model": str(model), "history": read_history(run / members[0].replace("model.keras", "history.csv")),
                "history_of": "fold 0", "epochs_run": sum(r["epochs_run"] for r in results),
                "epochs_trained": sum(r["epochs_trained"] for r in results),
                "resumed_from_epoch": min(r["resumed_from_epoch"] for r in results),
                "best_epoch": [r["best_epoch"] for r in results], "device": first["device"],
                "seconds": sum(r["seconds"] for r in results), "params": first["params"] * len(results),
                "folds": manifest["per_fold"]}
    write_json_atomic(run / "training.json", training)
    log.info("ensemble of %d folds: best val_loss %.4f ± %.4f (mean ± SD over folds)", len(results),
             manifest["best_val_loss_mean"], manifest["best_val_loss_sd"])
    return {k: v for k, v in training.items() if k != "history"}
