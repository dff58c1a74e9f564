"""The whole pipeline flow on a tiny cohort, under Prefect's test harness."""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from flows.ingest import ingest_flow
from flows.pipeline import pipeline
from medflow.cli import DEMO_SPEC
from medflow.spec import load_spec
from medflow.synth import synthesize
from medflow.calibration import apply_calibrator, expected_calibration_error
from medflow.metrics import binary_metrics
from medflow.runs import read_metrics

from tests.helpers import assert_report_reads_well

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    synthesize(root / "cohort", patients=16, seed=2, matrix=48)
    spec = yaml.safe_load(DEMO_SPEC.format(seed=2, epochs=2))
    spec["preprocess"][-1] = {"crop_pad": {"shape": [16, 48, 48], "value": 0}}
    spec["preprocess"][0] = {"resample": {"spacing": [8.0, 4.0, 4.0]}}
    spec["evaluate"]["bootstrap"] = 50
    spec["train"]["batch_size"] = 4
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _not_strict_json(constant: str):
    raise AssertionError(f"metrics.json holds {constant}, which strict JSON does not allow")


def _flow_runs_tagged(tag: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])))


def test_pipeline_end_to_end_then_rerun_reuses_everything(tiny, prefect_harness, tmp_path):
    first = pipeline(str(tiny))
    run = first["run_dir"]
    for name in ("report.html", "model.keras", "predictions.csv", "metrics.json", "provenance.json", "split.csv",
                 "checkpoints/last.keras", "history.csv", "spec.yaml", "explain.npz"):
        assert (tiny.parent / "runs" / run.split("/")[-1] / name).exists(), name

    preds = pd.read_csv(f"{run}/predictions.csv")
    json.loads(open(f"{run}/metrics.json").read(), parse_constant=_not_strict_json)
    metrics = read_metrics(f"{run}/metrics.json")  # undefined values (null) back as NaN
    test = preds[preds["split"] == "test"]
    # calibration of the model's own scores (evaluate.calibrate: none), recomputable from predictions.csv
    cal = metrics["calibration"]
    assert cal["method"] == "none" and cal["map"] is None
    assert cal["before"]["test"]["brier"] == pytest.approx(np.mean((test["score"] - test["label"]) ** 2))
    assert cal["before"]["test"]["ece"] == pytest.approx(
        expected_calibration_error(test["label"], test["score"], bins=10)[0])
    again = binary_metrics(test["label"], test["score"], metrics["threshold"])
    for name in ("accuracy", "precision", "recall", "specificity", "f1"):
        assert again[name] == pytest.approx(metrics["test"][name], nan_ok=True)
    assert np.array_equal(test["prediction"], (test["score"] >= metrics["threshold"]).astype(int))
    assert set(preds["patient_key"][preds["split"] == "test"]).isdisjoint(preds["patient_key"][preds["split"] == "train"])

    # the run's TensorBoard events: the training curves per epoch, and the evaluation equal to metrics.json
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train_events = EventAccumulator(f"{run}/tensorboard/train").Reload()
    epochs = len(pd.read_csv(f"{run}/history.csv"))
    assert len(train_events.Tensors("epoch_loss")) == epochs  # TF2 summaries are tensor events
    evaluate_events = EventAccumulator(f"{run}/tensorboard/evaluate").Reload()
    assert "test/auc" in evaluate_events.Tags()["tensors"] or "test/auc" in evaluate_events.Tags()["scalars"]
    from tensorboard.util.tensor_util import make_ndarray

    logged = {e: float(make_ndarray(evaluate_events.Tensors(e)[0].tensor_proto)) for e in evaluate_events.Tags()["tensors"]
              if e.startswith(("test/", "baseline/"))}
    assert logged["test/accuracy"] == pytest.approx(metrics["test"]["accuracy"], rel=1e-6)
    assert logged["baseline/auc"] == pytest.approx(metrics["baseline"]["auc"], rel=1e-6)

    # the model in the run folder reproduces the scores
    model = keras.models.load_model(f"{run}/model.keras", compile=False)
    assert model.output_shape == (None, 1)

    assert_report_reads_well(Path(run) / "report.html", tmp_path / "report.png")  # in a browser, at 1280 px
    html = open(f"{run}/report.html").read()
    strong = {b["name"]: b for b in metrics["strong_baselines"]}  # the demo spec declares radiomics
    assert set(strong) == {"radiomics"} and 0 <= strong["radiomics"]["auc"] <= 1 and strong["radiomics"]["features"] == 25
    assert "difference" in strong["radiomics"]["vs_model"] and 'id="strong-baselines"' in html
    assert f"<td>{metrics['test']['accuracy']:.3f}</td>" in html
    # subgroup tables from the catalog's non-identifying attributes, counts adding up to the test split
    assert {"sg_manufacturer", "sg_thickness", "sg_sex", "sg_age"} <= set(preds.columns)
    summary = json.loads(open(f"{run}/summary.json").read())
    subgroups = summary["tables"].get("subgroups", {}).get("rows", [])
    for attribute in {r["attribute"] for r in subgroups}:
        assert sum(r["series"] for r in subgroups if r["attribute"] == attribute) == len(test)
    from medflow.subgroups import ATTRIBUTES

    varying = {label for column, label in ATTRIBUTES.items() if test[column].nunique() > 1}
    assert {r["attribute"] for r in subgroups} == varying and varying and 'id="subgroups"' in html
    assert 'alt="Reliability diagram"' in html and f"<td>{cal['before']['test']['brier']:.3f}</td>" in html
    assert html.count("data:image/png;base64,") >= 5
    assert 'alt="Grad-CAM examples"' in html
    with np.load(f"{run}/explain.npz") as explained:
        meta = json.loads(str(explained["meta"]))
        assert explained["cams"].shape == explained["images"].shape and len(meta) >= 2
        assert {m["series_key"] for m in meta} <= set(test["series_key"])
    assert re.search(r"not a DICOM file</td><td>2</td>", html)
    assert "ZQXCANARY" not in html

    assert first["ingest"]["ingested"] == 16 and first["preprocess"]["computed"] == 16
    assert len(_flow_runs_tagged(f"medflow-run:{Path(run).name}")) == 6  # the pipeline and its five stages
    assert len(_flow_runs_tagged(f"spec:{load_spec(tiny).name}")) >= 6

    # the same spec with temperature scaling fitted on validation (a new run; the store is reused)
    calibrated = tiny.parent / "spec-calibrated.yaml"
    spec = yaml.safe_load(tiny.read_text())
    spec["evaluate"]["calibrate"] = "temperature"
    calibrated.write_text(yaml.safe_dump(spec))
    second = pipeline(str(calibrated))
    metrics2 = json.loads(open(f"{second['run_dir']}/metrics.json").read(), parse_constant=_not_strict_json)
    preds2 = pd.read_csv(f"{second['run_dir']}/predictions.csv")
    t = metrics2["calibration"]["map"]["temperature"]
    assert 0.05 <= t <= 20
    assert np.allclose(preds2["score"], apply_calibrator(metrics2["calibration"]["map"], preds2["score_uncalibrated"]))
    test2 = preds2[preds2["split"] == "test"]
    assert metrics2["calibration"]["after"]["test"]["brier"] == pytest.approx(
        np.mean((test2["score"] - test2["label"]) ** 2))

    assert second["ingest"]["ingested"] == 0 and second["ingest"]["unchanged"] == (
        first["ingest"]["ingested"] + first["ingest"]["quarantined_series"])
    assert second["ingest"]["quarantined_files"] == first["ingest"]["quarantined_files"]
    assert second["preprocess"]["computed"] == 0 and second["preprocess"]["reused"] == 16
    assert second["run_dir"] != first["run_dir"]


def test_no_phi_in_store_runs_logs_or_artifacts(tiny, prefect_harness, caplog):
    caplog.set_level("DEBUG")
    result = pipeline(str(tiny))
    canary = b"ZQXCANARY"
    uids = set()  # and every UID of a few source files
    for path in sorted((tiny.parent / "cohort" / "dicom").rglob("*.dcm"))[:40]:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # the cohort's broken files
            continue
        uids |= {str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID)}
    needles = [canary, *(u.encode() for u in uids)]
    assert len(needles) > 10
    checked = 0
    for folder in (tiny.parent / "store.zarr", tiny.parent / "runs"):
        for path in folder.rglob("*"):
            if path.is_file() and path.name != "secret":
                data = path.read_bytes()
                data = gzip.decompress(data) if path.name.endswith(".gz") else data
                for needle in needles:
                    assert needle not in data, (needle, path)
                checked += 1
    assert checked > 20
    for needle in needles:
        assert needle.decode() not in caplog.text
    # the Prefect database: flow and task run parameters, logs, artifacts, states
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    url = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    assert url.startswith("sqlite"), url  # the test harness's database: a file to search
    database = Path(url.split("///", 1)[-1])
    searched = list(database.parent.glob(database.name + "*"))  # with its -wal and -shm files
    assert database in searched
    for path in searched:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, (needle, path)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="demo-nodules")))

    found = asyncio.run(artifacts())
    assert {a.key for a in found} >= {"demo-nodules-report", "demo-nodules-metrics", "demo-nodules-quarantine"}
    for art in found:
        assert "ZQXCANARY" not in str(art.data)
    assert result["report"].endswith("report.html")


def test_ingest_flow_skips_unchanged_series(tiny, prefect_harness, caplog):
    spec = load_spec(tiny)
    ingest_flow(spec)  # may or may not have work, depending on test order
    caplog.clear()
    caplog.set_level("INFO")
    result = ingest_flow(spec)
    assert result["ingested"] == 0
    assert "nothing to do" in caplog.text


def test_failed_run_resumes_training_where_it_stopped(tiny, prefect_harness, monkeypatch):
    from models.training import FAULT_ENV, TrainingInterrupted

    spec = yaml.safe_load(tiny.read_text())
    spec["train"]["epochs"] = 3
    spec["train"]["early_stopping"] = None
    path = tiny.parent / "three_epochs.yaml"
    path.write_text(yaml.safe_dump(spec))

    monkeypatch.setenv(FAULT_ENV, "2")
    with pytest.raises(TrainingInterrupted):
        pipeline(str(path))
    monkeypatch.delenv(FAULT_ENV)
    runs = tiny.parent / "runs"
    failed = [p for p in runs.iterdir() if json.loads((p / "run.json").read_text()).get("state") == "failed"]
    assert len(failed) == 1 and json.loads((failed[0] / "state.json").read_text())["epoch"] == 2

    result = pipeline(str(path))
    assert result["run_dir"] == str(failed[0])  # the same run, resumed
    assert result["train"]["resumed_from_epoch"] == 2 and result["train"]["epochs_trained"] == 1
    assert result["ingest"]["ingested"] == 0 and result["preprocess"]["computed"] == 0
    status = json.loads((failed[0] / "run.json").read_text())
    assert status["state"] == "completed" and status["attempts"] == 2
    assert len(pd.read_csv(failed[0] / "history.csv")) == 3


def test_predict_scores_new_studies_with_a_classifier_run(tiny, prefect_harness, tmp_path):
    from flows.predict import predict_flow
    from storage.ingest import IngestOptions
    from medflow.preprocessing import apply_steps
    from tests.helpers import ingest_serial

    result = pipeline(str(tiny))
    run = result["run_dir"]
    new = synthesize(tmp_path / "new", patients=3, seed=21, matrix=48)  # with broken files and a localizer
    out = predict_flow(run, str(new.dicom_dir), str(tmp_path / "out"))
    assert out["series"] == 3 and out["not_used"] > 0
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    threshold = json.loads(open(f"{run}/metrics.json").read())["threshold"]
    assert set(rows["StudyInstanceUID"]) <= set(new.uids) and rows["SeriesInstanceUID"].nunique() == 3
    assert (rows["prediction"] == (rows["score"] >= threshold).astype(int)).all()
    summary = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert summary["task"] == "classification" and {r["reason"] for r in summary["not_used"]}

    # the model leaves medflow: ONNX (and a SavedModel) reproduce the run's test scores in their own runtimes
    from medflow.exporting import export_run, run_exported
    from storage.store import Store

    provenance = json.loads((Path(run) / "provenance.json").read_text())
    run_store = Store(load_spec(tiny).data.store)
    cases = pd.read_csv(Path(run) / "predictions.csv")
    test = cases[cases["split"] == "test"]
    batch = np.stack([run_store.read_prep(provenance["prep_key"], k) for k in test["series_key"]])[..., None]
    for fmt in ("onnx", "savedmodel"):
        contract = export_run(run, fmt, tmp_path / fmt)
        assert contract["input"]["shape"] == [None, *batch.shape[1:]] and contract["output"]["classes"] == ["0", "1"]
        scores = run_exported(contract["path"], fmt, batch.astype("float32"))[:, 0]
        assert np.abs(scores - test["score"].to_numpy()).max() < 1e-4, fmt
        assert json.loads((tmp_path / fmt / "contract.json").read_text())["preprocessing"]["steps"][-1] == {
            "crop_pad": {"shape": [16, 48, 48], "value": 0.0}}

    # as medflow serve runs it: confined to the allowed folders, with its own private scratch store
    import os

    from medflow.access import AccessRefused

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFLOW_ALLOWED_ROOTS", os.pathsep.join([str(tmp_path), str(Path(run).parent)]))
        confined = predict_flow(run, str(new.dicom_dir), str(tmp_path / "confined"))
        assert confined["series"] == 3
        again = pd.read_csv(tmp_path / "confined" / "predictions.csv")
        assert dict(zip(again["SeriesInstanceUID"], again["score"])) == dict(zip(rows["SeriesInstanceUID"],
                                                                                  rows["score"]))
        with pytest.raises(AccessRefused, match="output"):
            predict_flow(run, str(new.dicom_dir), str(Path(run).parents[2] / "elsewhere"))

    # the scores are the run's model on the run's steps
    spec = load_spec(tiny)
    store = ingest_serial(new.dicom_dir, tmp_path / "scratch.zarr", IngestOptions(modalities=("CT",), min_slices=8))["store"]
    model = keras.models.load_model(f"{run}/model.keras", compile=False)
    for row in rows.to_dict("records"):
        key = store.pseudonymizer().series_key(row["SeriesInstanceUID"])
        image, _ = apply_steps(store.read_image(key), store.catalog_entry(key)["spacing"], spec.steps())
        score = float(model.predict(image[None, ..., None], verbose=0)[0, 0])
        assert score == pytest.approx(row["score"], abs=1e-5)


def test_k_fold_trains_each_fold_as_a_task_and_scores_test_with_the_ensemble(tiny, prefect_harness, tmp_path):
    from flows.predict import predict_flow
    from models.training import predict
    from storage.store import Store

    spec = yaml.safe_load(tiny.read_text())
    spec["data"]["split"]["folds"] = 3
    spec["train"]["epochs"] = 1
    path = tiny.parent / "spec-folds.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = pipeline(str(path))
    run = Path(result["run_dir"])

    split = pd.read_csv(run / "split.csv")
    assert split.groupby("patient_key")["fold"].nunique().max() == 1  # folds never share a patient
    manifest = json.loads((run / "folds.json").read_text())
    held = [set(h) for h in manifest["held_out"]]
    assert len(held) == 3 and all(a.isdisjoint(b) for i, a in enumerate(held) for b in held[i + 1:])
    assert set().union(*held) == set(split.loc[split["split"] != "test", "series_key"])
    for fold in range(3):
        assert (run / "folds" / str(fold) / "model.keras").exists()

    # test rows: the mean of the fold models; every other row: its own fold's model (out of fold)
    preds = pd.read_csv(run / "predictions.csv")
    s = load_spec(path)
    store = Store(s.data.store)
    prep_key = json.loads((run / "provenance.json").read_text())["prep_key"]
    loader = lambda k: store.read_prep(prep_key, k)  # noqa: E731
    test = preds[preds["split"] == "test"]
    members = np.stack([predict(run / m, loader, test["series_key"].tolist()) for m in manifest["models"]])
    assert np.allclose(test["score"], members.mean(axis=0), atol=1e-5)
    oof = preds[preds["series_key"].isin(held[1])]
    assert np.allclose(oof["score"], predict(run / manifest["models"][1], loader, oof["series_key"].tolist()), atol=1e-5)

    metrics = read_metrics(run / "metrics.json")
    per_fold = metrics["folds"]["per_fold"]
    assert [r["fold"] for r in per_fold] == [0, 1, 2]
    aucs = [r["test_auc"] for r in per_fold]
    assert metrics["folds"]["test_auc_mean"] == pytest.approx(np.nanmean(aucs), nan_ok=True)
    html = (run / "report.html").read_text()
    assert 'id="folds"' in html and "mean ± SD over 3 fold models" in html

    # medflow predict uses the ensemble
    new = synthesize(tmp_path / "new", patients=2, seed=23, matrix=48)
    predict_flow(str(run), str(new.dicom_dir), str(tmp_path / "out"))
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    from medflow.preprocessing import apply_steps
    from storage.ingest import IngestOptions
    from tests.helpers import ingest_serial

    scratch = ingest_serial(new.dicom_dir, tmp_path / "scratch.zarr", IngestOptions(modalities=("CT",), min_slices=8))["store"]
    models = [keras.models.load_model(run / m, compile=False) for m in manifest["models"]]
    for row in rows.to_dict("records"):
        key = scratch.pseudonymizer().series_key(row["SeriesInstanceUID"])
        image, _ = apply_steps(scratch.read_image(key), scratch.catalog_entry(key)["spacing"], s.steps())
        mean = np.mean([float(m.predict(image[None, ..., None], verbose=0)[0, 0]) for m in models])
        assert mean == pytest.approx(row["score"], abs=1e-5)


def test_the_same_spec_on_two_stores_trains_the_same_model(tiny, prefect_harness, tmp_path):
    """`train.deterministic: true` through the flow, as a user meets it: the same cohort ingested into two
    new stores (two store secrets: other pseudonyms, other catalog order) and run by the pipeline flow,
    with augmentation and Prefect's threads about, gives the same scores to every series."""
    import shutil

    from storage.store import Store

    scores, keys = [], []
    for name in ("a", "b"):
        shutil.copytree(tiny.parent / "cohort", tmp_path / name / "cohort")
        shutil.copy(tiny, tmp_path / name / "spec.yaml")
        result = pipeline(str(tmp_path / name / "spec.yaml"))
        run = Path(result["run_dir"])
        catalog = Store(tmp_path / name / "store.zarr").catalog()
        preds = pd.read_csv(run / "predictions.csv")
        preds["content"] = preds["series_key"].map(lambda k: catalog[k]["content"])
        keys.append(set(preds["series_key"]))
        scores.append(preds.set_index("content")["score"].sort_index())
    assert set(scores[0].index) == set(scores[1].index) and len(scores[0]) == 16
    assert not keys[0] & keys[1]  # two secrets: no pseudonym in common
    assert scores[0].std() > 0  # a trained model: the scores vary
    assert np.array_equal(scores[0].to_numpy(), scores[1].to_numpy()), (scores[0] - scores[1]).abs().max()


def test_a_run_with_overrides_and_tags_as_a_deployment_form_gives_them(quick_spec, prefect_harness):
    from prefect import get_client

    from medflow.errors import SpecError

    result = pipeline(str(quick_spec), overrides={"train.epochs": 1, "evaluate.bootstrap": 20}, tags=["ticket-42"])
    ran = yaml.safe_load((Path(result["run_dir"]) / "spec.yaml").read_text())
    assert ran["train"]["epochs"] == 1 and ran["evaluate"]["bootstrap"] == 20  # the spec as run
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    with get_client(sync_client=True) as client:
        tagged = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["ticket-42"])))
    assert any(r.parameters.get("overrides") == {"train.epochs": 1, "evaluate.bootstrap": 20} for r in tagged)
    with pytest.raises(SpecError, match="train.epoch: unknown field; did you mean 'epochs'"):
        pipeline(str(quick_spec), overrides={"train.epoch": 1})
