"""Detection end to end: SR marks in, a CenterNet-style detector trained and scored with FROC against the
baseline, the report, and ``medflow predict`` writing DICOM SRs whose points are the detections."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from flows.pipeline import pipeline
from flows.predict import predict_flow
from medflow.cli import DET_DEMO_SPEC
from medflow.froc import cpm, froc_curve, sensitivity_at
from medflow.kinds.detection import truth_lesions
from medflow.synth import synthesize
from storage.marks import read_sr
from storage.store import Store

from tests.helpers import assert_report_reads_well

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def det_run(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("detection")
    cohort = synthesize(root / "cohort", patients=16, seed=5, matrix=64, marks=True, nodule_radius=(6.0, 10.0),
                        positive_fraction=0.75)
    spec = yaml.safe_load(DET_DEMO_SPEC.format(seed=5, epochs=3))
    spec["train"]["early_stopping"] = None
    spec["evaluate"]["bootstrap"] = 50
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return root, cohort, pipeline(str(path))


def test_detection_pipeline_scores_froc_against_the_baseline(det_run, tmp_path):
    root, cohort, result = det_run
    run = Path(result["run_dir"])
    store = Store(root / "store.zarr")
    catalog = store.catalog()
    marked = {k: e for k, e in catalog.items() if e.get("marks")}
    assert len(marked) == cohort.n_positive == 12  # one SR per nodule, each placed on its series
    # the marks are the synthetic nodules: the centres in patient space, the diameters
    truth = sorted((round(n["radius"] * 2, 3), tuple(np.round(n["center"], 2))) for n in cohort.nodules.values())
    stored = sorted((round(les["diameter_mm"], 3), tuple(np.round(les["xyz"], 2)))
                    for e in marked.values() for les in truth_lesions(e))
    assert stored == truth
    assert not any("SR" in r["reason"] and r.get("stage") != "scan" for r in store.quarantine())

    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert metrics["task"] == "detection"
    t = metrics["test"]
    rates = metrics["fp_rates"]
    assert t["cpm"] == pytest.approx(np.mean([t[f"sens_{r:g}"] for r in rates]))
    # the test figures again, from the detections the run wrote and the stored marks
    dets = pd.read_csv(run / "detections.csv")
    cases = pd.read_csv(run / "predictions.csv")
    for source, summary in (("model", t), ("baseline", metrics["baseline"])):
        scans = []
        for key in cases.loc[cases["split"] == "test", "series_key"]:
            d = dets[(dets["series_key"] == key) & (dets["source"] == source)]
            scans.append({"detections": [{"xyz": [r.x, r.y, r.z], "score": r.score} for r in d.itertuples()],
                          "lesions": truth_lesions(catalog[key])})
        assert cpm(sensitivity_at(froc_curve(scans))) == pytest.approx(summary["cpm"])
    assert t["n_lesions"] == int(cases.loc[cases["split"] == "test", "n_lesions"].sum()) > 0
    assert 0.0 <= metrics["operating"]["sensitivity"] <= 1.0
    assert metrics["baseline"]["sigma_mm"] in (2.0, 4.0, 6.0)
    paired = metrics["baseline"]["difference"]  # the model minus the baseline on the same scans, paired
    assert paired["difference"] == pytest.approx(t["cpm"] - metrics["baseline"]["cpm"])
    assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1] and 0 <= paired["p_value"] <= 1
    from medflow.compare import list_runs

    listed = list_runs(run.parent).set_index("run").loc[run.name]
    assert listed["metric"] == "cpm" and listed["value"] == pytest.approx(t["cpm"])
    assert listed["baseline"] == pytest.approx(metrics["baseline"]["cpm"])
    from medflow.compare import compare_runs

    itself = compare_runs(run, run, n_boot=50)  # compare pairs detection runs by their test outcomes
    assert itself["metric"] == "CPM" and itself["value_a"] == pytest.approx(t["cpm"]) and itself["difference"] == 0
    assert itself["shared"] == int((cases["split"] == "test").sum())

    assert_report_reads_well(run / "report.html", tmp_path / "report.png")  # in a browser, at 1280 px
    html = (run / "report.html").read_text()
    for fragment in ("FROC curves of the model and the baseline", 'id="baseline"', "Missed lesions", "CPM",
                     "sensitivity at 0.125 FP/scan", "Per-scan results"):
        assert fragment in html
    for folder in (root / "store.zarr", root / "runs"):  # the SRs carry the canary identifiers
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix not in (".gz",) and path.name != "secret":
                assert b"ZQXCANARY" not in path.read_bytes(), path


def test_predict_writes_sr_whose_points_are_the_detections(det_run, tmp_path):
    root, _, result = det_run
    run = tmp_path / "run"
    shutil.copytree(result["run_dir"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["threshold"] = 0.0  # every peak of the (briefly trained) model is reported: the SR is not empty
    (run / "metrics.json").write_text(json.dumps(metrics))
    new = synthesize(tmp_path / "new", patients=2, seed=12, matrix=64, positive_fraction=1.0, broken=False)
    out = predict_flow(str(run), str(new.dicom_dir), str(tmp_path / "out"))
    assert out["series"] == 2
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    dets = pd.read_csv(tmp_path / "out" / "detections.csv")
    assert len(dets) > 0
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in new.dicom_dir.rglob("*") if p.is_file()]
    for row in rows.to_dict("records"):
        path = tmp_path / "out" / row["sr"]
        sr = hd.sr.srread(path)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        series = [d for d in sources if d.SeriesInstanceUID == row["SeriesInstanceUID"]]
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.SeriesInstanceUID == row["SeriesInstanceUID"]
        assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence} == {d.SOPInstanceUID for d in series}
        assert sr.StudyInstanceUID == series[0].StudyInstanceUID
        assert run.name in str(sr.ContentSequence)  # the algorithm's parameters name the run
        points = read_sr(path)["marks"]
        mine = dets[dets["series_key"] == row["series_key"]]
        assert len(points) == len(mine) == row["detections"]
        np.testing.assert_allclose([[p["x"], p["y"], p["z"]] for p in points],
                                   mine[["x_mm", "y_mm", "z_mm"]].to_numpy(), atol=1e-3)
        np.testing.assert_allclose([p["score"] for p in points], mine["score"], atol=1e-4)


def test_a_scan_without_a_detection_gets_no_sr_and_says_so(det_run, tmp_path):
    from medflow.kinds.detection import NO_DETECTION

    _, _, result = det_run
    run = tmp_path / "run"
    shutil.copytree(result["run_dir"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["threshold"] = 2.0  # above any probability: nothing is detected
    (run / "metrics.json").write_text(json.dumps(metrics))
    new = synthesize(tmp_path / "new", patients=2, seed=13, matrix=64, positive_fraction=1.0, broken=False)
    out = predict_flow(str(run), str(new.dicom_dir), str(tmp_path / "out"))
    assert out["series"] == 2
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert rows["sr"].tolist() == ["", ""] and rows["note"].tolist() == [NO_DETECTION] * 2
    assert not list((tmp_path / "out").glob("*.sr.dcm"))
    assert len(pd.read_csv(tmp_path / "out" / "detections.csv")) == 0
