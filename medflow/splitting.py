"""Labels joined to the catalog by pseudonym, and a patient-level stratified split."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from medflow.errors import LabelError
from storage.deid import Pseudonymizer

logger = logging.getLogger(__name__)

_KEY_FIELD = {"StudyInstanceUID": "study_key", "PatientID": "patient_key", "AccessionNumber": "accession_key"}


def label_text(value) -> str:
    """A label value as its class name: integers without a decimal point, text stripped.

    >>> [label_text(v) for v in (1, 1.0, " pneumonia ", "0")]
    ['1', '1', 'pneumonia', '0']
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def split_name(value) -> str | None:
    """``storage.images.split_name``: train, val or test from a folder name or a CSV value."""
    from storage.images import split_name as name

    return name(value)


def join_labels(catalog: dict[str, dict], labels: pd.DataFrame, *, key: str, key_column: str, label_column: str,
                pseudo: Pseudonymizer, split_column: str | None = None) -> pd.DataFrame:
    """One row per labelled series: ``series_key, patient_key, study_key, label_name``.

    The CSV's identifiers are turned into pseudonyms with the store's secret and matched
    against the catalog, so no identifier is kept. Labels are class names (any text or
    number); rows with an empty label and series without a label are left out.

    Raises:
        LabelError: a missing column.
    """
    for col in (key_column, label_column, *([split_column] if split_column else [])):
        if col not in labels.columns:
            raise LabelError(f"labels CSV has no column {col!r}; its columns are {list(labels.columns)}")
    given = labels[labels[label_column].notna() & (labels[label_column].astype(str).str.strip() != "")]
    if len(given) < len(labels):
        logger.warning("labels: %d row(s) with an empty %r left out", len(labels) - len(given), label_column)
    kind = {"StudyInstanceUID": "study", "PatientID": "patient", "AccessionNumber": "accession"}[key]
    hashed = {pseudo.key(str(v), kind=kind): label_text(lab) for v, lab in zip(given[key_column], given[label_column])}
    splits = {pseudo.key(str(v), kind=kind): split_name(s)
              for v, s in zip(given[key_column], given[split_column])} if split_column else {}
    field = _KEY_FIELD[key]
    rows = []
    for series_key, entry in sorted(catalog.items()):
        lab = hashed.get(entry.get(field, ""))
        if lab is not None:
            rows.append({"series_key": series_key, "patient_key": entry["patient_key"],
                         "study_key": entry["study_key"], "label_name": lab,
                         **({"given_split": splits.get(entry.get(field, ""))} if split_column else {})})
    df = pd.DataFrame(rows, columns=["series_key", "patient_key", "study_key", "label_name",
                                     *(["given_split"] if split_column else [])])
    logger.info("labels: %d of %d series labelled", len(df), len(catalog))
    return df


def catalog_labels(catalog: dict[str, dict]) -> pd.DataFrame:
    """One row per series whose catalog entry carries its class (images from class folders or a CSV)."""
    rows = [{"series_key": k, "patient_key": e["patient_key"], "study_key": e["study_key"],
             "label_name": label_text(e["label"]), "given_split": e.get("split")}
            for k, e in sorted(catalog.items()) if e.get("label") is not None]
    return pd.DataFrame(rows, columns=["series_key", "patient_key", "study_key", "label_name", "given_split"])


def class_order(names, classes: list[str] | None = None) -> list[str]:
    """The classes in index order: ``classes`` as given, else sorted (numbers by value), as Keras'
    ``flow_from_directory`` does. With two classes the second is the positive one.

    >>> class_order(["10", "2", "2"]), class_order(["normal", "effusion"]), class_order(["b"], ["b", "a"])
    (['2', '10'], ['effusion', 'normal'], ['b', 'a'])

    Raises:
        LabelError: a label that is not among ``classes``.
    """
    present = sorted(set(names), key=lambda v: (0, float(v), v) if _is_number(v) else (1, 0.0, v))
    if classes is None:
        return present
    classes = [label_text(c) for c in classes]
    unknown = [v for v in present if v not in classes]
    if unknown:
        raise LabelError(f"labels {unknown[:5]} are not among data.labels.classes {classes}; add them or fix the "
                         "labels")
    return classes


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def mask_cohort(catalog: dict[str, dict], *, missing: str) -> pd.DataFrame:
    """One row per series for segmentation: ``series_key, patient_key, study_key, label`` (1: has foreground).

    Series with a mask are in; series without one are in as empty when ``missing == "empty"``
    (e.g. scans without a lesion), else left out.
    """
    rows = []
    for series_key, entry in sorted(catalog.items()):
        mask = entry.get("mask")
        if mask is None and missing != "empty":
            continue
        rows.append({"series_key": series_key, "patient_key": entry["patient_key"], "study_key": entry["study_key"],
                     "label": int(bool(mask and mask.get("foreground_voxels", 0)))})
    df = pd.DataFrame(rows, columns=["series_key", "patient_key", "study_key", "label"])
    n_masks = sum(1 for e in catalog.values() if "mask" in e)
    logger.info("masks: %d of %d series have a mask; %d series in the cohort (%d with foreground)", n_masks,
                len(catalog), len(df), int(df["label"].sum()))
    return df


def patient_split(df: pd.DataFrame, *, val: float, test: float, stratify: bool = True, seed: int = 0,
                  order: pd.Series | None = None) -> pd.Series:
    """``train``/``val``/``test`` for each row, with every patient in exactly one split.

    Patients are stratified by their label (a patient is positive if any series is). The
    seeded shuffle starts from the patients in a fixed order: by ``order`` (one value per row,
    e.g. the store's ``content`` key of each series; a patient takes its smallest), so that the
    seed alone fixes the split whatever the pseudonyms are; without it, by pseudonym (which
    depends on the store's secret).

    >>> df = pd.DataFrame({"patient_key": list("aabbccddeeffgghhiijj"), "label": [0, 0, 1, 1] * 5})
    >>> s = patient_split(df, val=0.2, test=0.2, seed=1)
    >>> sorted(s.value_counts().to_dict().items())
    [('test', 4), ('train', 12), ('val', 4)]
    """
    patients = df.groupby("patient_key")["label"].max()
    if order is not None:
        first = pd.Series(order.to_numpy(), index=df.index).groupby(df["patient_key"]).min()
        ranked = pd.DataFrame({"first": first, "key": first.index}).sort_values(["first", "key"])
        patients = patients.loc[ranked.index]
    keys, labs = patients.index.to_numpy(), patients.to_numpy()
    if len(keys) < 3:
        raise LabelError(f"Received {len(keys)} labelled patient(s), expected at least 3 for a train/val/test split.")

    def can_stratify(y, n_take):
        counts = np.bincount(y.astype(int), minlength=2)
        return stratify and counts.min() >= 2 and n_take >= 2 and len(y) - n_take >= 2

    n_test = max(1, int(round(test * len(keys))))
    strat = labs if can_stratify(labs, n_test) else None
    rest_k, test_k, rest_y, _ = train_test_split(keys, labs, test_size=n_test, random_state=seed, stratify=strat)
    n_val = max(1, int(round(val * len(keys))))
    strat = rest_y if can_stratify(rest_y, n_val) else None
    train_k, val_k = train_test_split(rest_k, test_size=n_val, random_state=seed + 1, stratify=strat)
    which = {**{k: "train" for k in train_k}, **{k: "val" for k in val_k}, **{k: "test" for k in test_k}}
    return df["patient_key"].map(which).rename("split")


def predefined_split(df: pd.DataFrame, *, val: float, stratify: bool = True, seed: int = 0,
                     order: pd.Series | None = None, where: str = "the layout") -> tuple[pd.Series, str]:
    """The split the data came with (``df["given_split"]``: train, val or test per row) and a line saying so.
    Without validation rows, ``val`` of the training patients (stratified, seeded) become them.

    >>> df = pd.DataFrame({"patient_key": list("abcdefgh"), "label": [0, 1] * 4,
    ...                    "given_split": ["train"] * 6 + ["test"] * 2})
    >>> s, note = predefined_split(df, val=0.34, seed=0)
    >>> sorted(s.value_counts().to_dict().items()), note
    ([('test', 2), ('train', 4), ('val', 2)], 'from the layout: train 6, test 2 patients; 2 of the training patients taken for validation (split.val 0.34)')

    Raises:
        LabelError: rows without a split, a patient in two splits, or no training or test rows.
    """
    given = df["given_split"].fillna("").astype(str)
    missing = int((~given.isin(["train", "val", "test"])).sum())
    if missing:
        raise LabelError(f"{missing} labelled case(s) have no train, val or test in {where}; give every case a split, "
                         "or use split.from: random")
    crossing = df.assign(s=given).groupby("patient_key")["s"].nunique()
    if (crossing > 1).any():
        raise LabelError(f"{int((crossing > 1).sum())} patient(s) have cases in two splits of {where}: a leak; put "
                         "each patient's cases in one split")
    for needed in ("train", "test"):
        if not (given == needed).any():
            raise LabelError(f"{where} has no {needed} cases; a predefined split needs train and test (val is "
                             "optional)")
    per = {s: int(df.loc[given == s, "patient_key"].nunique()) for s in ("train", "val", "test") if (given == s).any()}
    note = f"from {where}: " + ", ".join(f"{s} {n}" for s, n in per.items()) + " patients"
    split = given.rename("split").copy()
    if "val" not in per:
        train = df[given == "train"]
        carved = patient_split(train, val=val, test=val, stratify=stratify, seed=seed,
                               order=order[given == "train"] if order is not None else None)
        # patient_split also sets a test part aside: within the layout's train rows only val is taken
        split.loc[train.index] = carved.where(carved == "val", "train")
        n_val = int(train.loc[carved == "val", "patient_key"].nunique())
        note += f"; {n_val} of the training patients taken for validation (split.val {val:g})"
    return split, note


def patient_folds(df: pd.DataFrame, split: pd.Series, *, k: int, seed: int = 0, stratify: bool = True,
                  order: pd.Series | None = None) -> pd.Series:
    """Fold index 0..k-1 of each row outside the test split (-1 for test rows), every patient in one fold.

    Patients (a patient is positive if any series is) are dealt into ``k`` folds by
    scikit-learn's ``StratifiedKFold`` over patients, so each fold keeps the label balance and
    no patient is in two folds; the seeded shuffle starts from the same fixed patient order as
    ``patient_split`` (``order``), so the seed alone fixes the folds.

    >>> df = pd.DataFrame({"patient_key": list("aabbccddeeffgghhiijj"), "label": [0, 0, 1, 1] * 5})
    >>> split = pd.Series(["val"] * 16 + ["test"] * 4)
    >>> f = patient_folds(df, split, k=4, seed=0)
    >>> sorted(f.value_counts().to_dict().items()), bool((f.groupby(df["patient_key"]).nunique() == 1).all())
    ([(-1, 4), (0, 4), (1, 4), (2, 4), (3, 4)], True)
    """
    from sklearn.model_selection import KFold, StratifiedKFold

    dev = df[split != "test"]
    patients = dev.groupby("patient_key")["label"].max()
    if order is not None:
        first = pd.Series(order.to_numpy(), index=df.index)[dev.index].groupby(dev["patient_key"]).min()
        ranked = pd.DataFrame({"first": first, "key": first.index}).sort_values(["first", "key"])
        patients = patients.loc[ranked.index]
    keys, labs = patients.index.to_numpy(), patients.to_numpy().astype(int)
    if len(keys) < k:
        raise LabelError(f"data.split.folds: {k} folds need at least {k} patients outside the test split; "
                         f"there are {len(keys)}")
    can_stratify = stratify and np.bincount(labs).min(initial=len(labs)) >= k
    splitter = (StratifiedKFold if can_stratify else KFold)(n_splits=k, shuffle=True, random_state=seed)
    fold_of = {}
    for fold, (_, held) in enumerate(splitter.split(keys, labs if can_stratify else None)):
        fold_of.update({keys[i]: fold for i in held})
    return df["patient_key"].map(fold_of).fillna(-1).astype(int).rename("fold")
