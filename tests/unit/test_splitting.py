"""Patient-level split and label join by pseudonym."""

from __future__ import annotations

import pandas as pd
import pytest

from storage.deid import Pseudonymizer
from medflow.errors import LabelError
from medflow.splitting import class_order, join_labels, patient_folds, patient_split, predefined_split
from tasks.train import fold_cases


def _cohort(n_patients=40, series_per_patient=2):
    rows = []
    for p in range(n_patients):
        for s in range(series_per_patient):
            rows.append({"series_key": f"s{p}-{s}", "patient_key": f"p{p}", "label": int(p % 3 == 0)})
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits_and_stratified():
    df = _cohort()
    split = patient_split(df, val=0.2, test=0.2, seed=5)
    per_patient = df.assign(split=split).groupby("patient_key")["split"].nunique()
    assert per_patient.max() == 1
    d = df.assign(split=split).groupby("patient_key").first()
    for name in ("train", "val", "test"):
        part = d[d["split"] == name]
        assert 0.2 < part["label"].mean() < 0.5  # about a third positive everywhere
    assert (split == "test").sum() == 16  # 8 patients x 2 series


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_never_share_a_patient_cover_every_patient_outside_test_and_keep_the_balance(k):
    df = _cohort(n_patients=60, series_per_patient=3)
    df.loc[df.index % 7 == 0, "series_key"] += "-extra"  # patients with several series stay whole
    split = patient_split(df, val=0.15, test=0.2, seed=3)
    folds = patient_folds(df, split, k=k, seed=3, order=df["series_key"])
    assert ((folds == -1) == (split == "test")).all()
    assert df.assign(fold=folds).groupby("patient_key")["fold"].nunique().max() == 1  # no patient in two folds
    patients_per_fold = df.assign(fold=folds)[folds >= 0].groupby("fold")["patient_key"].nunique()
    assert sorted(patients_per_fold.index) == list(range(k))
    assert patients_per_fold.max() - patients_per_fold.min() <= 1
    per_patient = df.assign(fold=folds)[folds >= 0].groupby("patient_key").first()
    for fold in range(k):
        assert 0.15 < per_patient[per_patient["fold"] == fold]["label"].mean() < 0.55
    # each fold's view: its own patients validate, the others train, test untouched
    cases = df.assign(split=split.where(split == "test", "val"), fold=folds)
    for fold in range(k):
        view = fold_cases(cases, fold)
        assert set(view[view["split"] == "val"]["patient_key"]).isdisjoint(view[view["split"] == "train"]["patient_key"])
        assert (view["split"] == "test").equals(split == "test")
        assert set(view.loc[view["split"] == "val", "series_key"]) == set(df.loc[folds == fold, "series_key"])
    assert patient_folds(df, split, k=k, seed=3, order=df["series_key"]).equals(folds)
    assert not patient_folds(df, split, k=k, seed=4, order=df["series_key"]).equals(folds)


def test_split_is_seeded():
    df = _cohort()
    assert patient_split(df, val=0.2, test=0.2, seed=1).equals(patient_split(df, val=0.2, test=0.2, seed=1))
    assert not patient_split(df, val=0.2, test=0.2, seed=1).equals(patient_split(df, val=0.2, test=0.2, seed=2))


def test_join_labels_matches_by_pseudonym_only():
    pseudo = Pseudonymizer(b"k" * 32)
    catalog = {
        "sA": {"patient_key": "pa", "study_key": pseudo.study_key("1.2.3"), "accession_key": ""},
        "sB": {"patient_key": "pb", "study_key": pseudo.study_key("1.2.4"), "accession_key": ""},
        "sC": {"patient_key": "pc", "study_key": pseudo.study_key("9.9"), "accession_key": ""},
    }
    labels = pd.DataFrame({"StudyInstanceUID": ["1.2.3", "1.2.4", "5.5"], "y": [1, 0, 1]})
    df = join_labels(catalog, labels, key="StudyInstanceUID", key_column="StudyInstanceUID", label_column="y",
                     pseudo=pseudo)
    assert df.set_index("series_key")["label_name"].to_dict() == {"sA": "1", "sB": "0"}
    assert "1.2.3" not in df.to_csv()


def test_join_labels_takes_class_names_and_leaves_out_empty_labels():
    pseudo = Pseudonymizer(b"k" * 32)
    catalog = {f"s{i}": {"patient_key": f"p{i}", "study_key": pseudo.study_key(str(i)), "accession_key": ""}
               for i in range(3)}
    labels = pd.DataFrame({"k": ["0", "1", "2"], "y": ["effusion", None, " pneumonia"]})
    df = join_labels(catalog, labels, key="StudyInstanceUID", key_column="k", label_column="y", pseudo=pseudo)
    assert df.set_index("series_key")["label_name"].to_dict() == {"s0": "effusion", "s2": "pneumonia"}
    assert class_order(df["label_name"]) == ["effusion", "pneumonia"]
    with pytest.raises(ValueError, match="not among data.labels.classes"):
        class_order(df["label_name"], ["normal", "effusion"])
    with pytest.raises(ValueError, match="no column 'label'"):
        join_labels({}, pd.DataFrame({"k": ["a"]}), key="StudyInstanceUID", key_column="k", label_column="label",
                    pseudo=pseudo)


@pytest.mark.slow
def test_the_seed_alone_fixes_the_split_whatever_the_store_secret(tmp_path, small_cohort):
    """Two stores of one cohort have different secrets, so different pseudonyms; ordered by the
    series' content keys, the same seed puts the same studies in each split."""
    from tests.helpers import ingest_serial, study_uids

    labels = pd.read_csv(small_cohort.labels_csv, dtype=str)
    by_study, pseudonyms = [], []
    for name in ("a", "b"):
        store = ingest_serial(small_cohort.dicom_dir, tmp_path / f"{name}.zarr")["store"]
        catalog = store.catalog()
        df = join_labels(catalog, labels, key="StudyInstanceUID", key_column="StudyInstanceUID",
                         label_column="nodule", pseudo=store.pseudonymizer())
        df["label"] = df["label_name"].astype(int)
        content = df["series_key"].map(lambda k: catalog[k]["content"])
        split = patient_split(df, val=0.25, test=0.25, seed=5, order=content)
        study = df["series_key"].map(study_uids(store, small_cohort.dicom_dir))
        by_study.append(dict(zip(study, split)))
        pseudonyms.append(set(df["patient_key"]))
    assert pseudonyms[0].isdisjoint(pseudonyms[1])  # the secrets differ
    assert len(by_study[0]) >= 6 and set(by_study[0].values()) == {"train", "val", "test"}
    assert by_study[0] == by_study[1]  # by pseudonym, the two splits agree only by chance


def test_a_split_column_of_the_labels_csv_is_carried_by_pseudonym_and_kept():
    pseudo = Pseudonymizer(b"k" * 32)
    catalog = {f"s{i}": {"patient_key": f"p{i}", "study_key": pseudo.study_key(f"1.{i}"), "accession_key": ""}
               for i in range(8)}
    labels = pd.DataFrame({"StudyInstanceUID": [f"1.{i}" for i in range(8)], "y": [0, 1] * 4,
                           "fold": ["Training", "train", "VAL", "val", "test", "Test", "train", "train"]})
    df = join_labels(catalog, labels, key="StudyInstanceUID", key_column="StudyInstanceUID", label_column="y",
                     pseudo=pseudo, split_column="fold")
    df["label"] = df["label_name"].astype(int)
    split, note = predefined_split(df, val=0.2, where="the labels CSV's column 'fold'")
    assert split.tolist() == ["train", "train", "val", "val", "test", "test", "train", "train"]
    assert note == "from the labels CSV's column 'fold': train 4, val 2, test 2 patients"
    with pytest.raises(LabelError, match="no column 'split'"):
        join_labels(catalog, labels, key="StudyInstanceUID", key_column="StudyInstanceUID", label_column="y",
                    pseudo=pseudo, split_column="split")


@pytest.mark.parametrize(("given", "patients", "message"), [
    (["train", "train", "test", "holdout"], list("abcd"), "1 labelled case"),
    (["train", "test", "test", "train"], list("aabc"), "1 patient.s. have cases in two splits"),
    (["train", "val", "val", "train"], list("abcd"), "has no test cases"),
])
def test_a_predefined_split_that_cannot_be_kept_is_refused(given, patients, message):
    df = pd.DataFrame({"patient_key": patients, "label": [0, 1, 0, 1], "given_split": given})
    with pytest.raises(LabelError, match=message):
        predefined_split(df, val=0.2)
