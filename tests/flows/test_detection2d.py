"""Box detection end to end: boxes from a CSV onto chest X-rays, a CenterNet-style 2D detector trained and scored
with COCO AP against the baseline, the report, and ``medflow predict`` writing DICOM SRs whose boxes are the
detections."""

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
from medflow.boxes import coco_ap
from medflow.cli import DET2D_DEMO_SPEC
from medflow.synth_xray import synthesize_xray
from storage.marks import read_sr
from storage.store import Store

from tests.helpers import assert_report_reads_well

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def box_run(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("detection2d")
    cohort = synthesize_xray(root / "cohort", images=48, seed=3, classes=["normal", "pneumonia"], marks=True)
    spec = yaml.safe_load(DET2D_DEMO_SPEC.format(seed=3, epochs=2))
    spec["preprocess"][0]["resize2d"]["shape"] = [64, 64]
    spec["model"]["params"]["filters"] = [8, 16]
    spec["train"].update({"early_stopping": None, "batch_size": 8})
    spec["evaluate"]["bootstrap"] = 30
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return root, cohort, pipeline(str(path))


def _truth_by_key(cohort, store) -> dict[str, list[list[float]]]:
    """The synthetic boxes of boxes.csv per stored image key, in pixels (x0, y0, x1, y1)."""
    pseudo = store.pseudonymizer()
    table = pd.read_csv(cohort.boxes_csv)
    out: dict[str, list] = {}
    for row in table.itertuples():
        key = "i" + pseudo.key(row.SOPInstanceUID, kind="sop")[:15]
        out.setdefault(key, []).append([float(row.x0), float(row.y0), float(row.x1), float(row.y1)])
    return out


def _rc(box_px):
    """x0, y0, x1, y1 in pixels as a stored-grid box r0, c0, r1, c1."""
    x0, y0, x1, y1 = box_px
    return [y0 - 0.5, x0 - 0.5, y1 - 0.5, x1 - 0.5]


def test_box_pipeline_scores_ap_against_the_baseline(box_run, tmp_path):
    root, cohort, result = box_run
    run = Path(result["run_dir"])
    store = Store(root / "store.zarr")
    catalog = store.catalog()
    truth = _truth_by_key(cohort, store)
    boxed = {k: e for k, e in catalog.items() if any("box" in m for m in e.get("marks", []))}
    assert set(boxed) == set(truth) and len(boxed) == cohort.counts["pneumonia"]
    for key, entry in boxed.items():  # every box of the table on its image's pixels (none reached past an edge)
        assert sorted(m["box"] for m in entry["marks"]) == sorted(_rc(b) for b in truth[key])

    metrics = json.loads((run / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert metrics["task"] == "detection2d"
    # the test figures again, from the detections the run wrote and the synthetic boxes
    dets = pd.read_csv(run / "detections.csv")
    cases = pd.read_csv(run / "predictions.csv")
    test_keys = cases.loc[cases["split"] == "test", "series_key"].tolist()
    assert metrics["test"]["n_boxes"] == sum(len(truth.get(k, [])) for k in test_keys) > 0
    for source, summary in (("model", metrics["test"]), ("baseline", metrics["baseline"])):
        images = []
        for key in test_keys:
            d = dets[(dets["series_key"] == key) & (dets["source"] == source)]
            images.append({"truth": [_rc(b) for b in truth.get(key, [])],
                           "detections": [{"box": _rc([r.x0, r.y0, r.x1, r.y1]), "score": r.score}
                                          for r in d.itertuples()]})
        again = coco_ap(images)
        for name in ("ap50", "ap50_95", "ap75"):
            assert again[name] == pytest.approx(summary[name], abs=2e-3), (source, name)  # boxes rounded to 0.01 px
    paired = metrics["baseline"]["difference"]  # the model minus the baseline on the same images, paired
    assert paired["difference"] == pytest.approx(metrics["test"]["ap50"] - metrics["baseline"]["ap50"])
    assert paired["ci"][0] <= paired["difference"] <= paired["ci"][1] and 0 <= paired["p_value"] <= 1
    assert 0.0 <= metrics["operating"]["recall"] <= 1.0
    from medflow.compare import list_runs

    listed = list_runs(run.parent).set_index("run").loc[run.name]
    assert listed["metric"] == "ap50" and listed["value"] == pytest.approx(metrics["test"]["ap50"])
    from medflow.compare import compare_runs

    itself = compare_runs(run, run, n_boot=50)  # compare pairs detection runs by their test outcomes
    assert itself["metric"] == "AP50" and itself["value_a"] == pytest.approx(metrics["test"]["ap50"])
    assert itself["difference"] == 0 and itself["shared"] == len(test_keys)

    assert_report_reads_well(run / "report.html", tmp_path / "report.png")  # in a browser, at 1280 px
    html = (run / "report.html").read_text()
    for fragment in ("Precision-recall curves of the model and the baseline", 'id="baseline"', "Missed boxes",
                     "AP at IoU 0.5:0.95 (COCO)", "Per-image results", "bright blobs"):
        assert fragment in html
    for folder in (root / "store.zarr", root / "runs"):  # the images carry the canary identifiers
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix not in (".gz",) and path.name != "secret":
                assert b"ZQXCANARY" not in path.read_bytes(), path


def test_predict_writes_srs_whose_boxes_are_the_detections(box_run, tmp_path):
    root, _, result = box_run
    run = tmp_path / "run"
    shutil.copytree(result["run_dir"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["threshold"] = 0.0  # every peak of the (briefly trained) model is reported: the SRs are not empty
    (run / "metrics.json").write_text(json.dumps(metrics))
    new = synthesize_xray(tmp_path / "new", images=3, seed=21, classes=["normal", "pneumonia"])
    out = predict_flow(str(run), str(new.images_dir), str(tmp_path / "out"))
    assert out["series"] == 3
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    dets = pd.read_csv(tmp_path / "out" / "detections.csv")
    assert len(dets) > 0
    sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(p, stop_before_pixels=True)
                                             for p in new.images_dir.rglob("*.dcm"))}
    for row in rows.to_dict("records"):
        path = tmp_path / "out" / row["sr"]
        sr = hd.sr.srread(path)
        assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        (ref,) = evidence.ReferencedSOPSequence
        image = sources[ref.ReferencedSOPInstanceUID]
        assert evidence.SeriesInstanceUID == row["SeriesInstanceUID"] == image.SeriesInstanceUID
        assert sr.StudyInstanceUID == image.StudyInstanceUID
        assert run.name in str(sr.ContentSequence)  # the algorithm's parameters name the run
        marks = read_sr(path)["marks"]
        mine = dets[dets["series_key"] == row["series_key"]]
        assert len(marks) == len(mine) == row["detections"]
        assert all(m["sop_uid"] == image.SOPInstanceUID for m in marks)
        got = [[m["box"][1] + 0.5, m["box"][0] + 0.5, m["box"][3] + 0.5, m["box"][2] + 0.5] for m in marks]
        np.testing.assert_allclose(got, mine[["x0", "y0", "x1", "y1"]].to_numpy(), atol=1e-3)
        assert [m["score"] for m in marks] == pytest.approx(mine["score"].tolist(), abs=1e-4)


def test_an_image_without_a_detection_gets_no_sr_and_says_so(box_run, tmp_path):
    from medflow.kinds.detection import NO_DETECTION

    _, _, result = box_run
    run = tmp_path / "run"
    shutil.copytree(result["run_dir"], run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["threshold"] = 2.0  # above any probability: nothing is detected
    (run / "metrics.json").write_text(json.dumps(metrics))
    new = synthesize_xray(tmp_path / "new", images=2, seed=22, classes=["normal", "pneumonia"])
    out = predict_flow(str(run), str(new.images_dir), str(tmp_path / "out"))
    assert out["series"] == 2
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv", keep_default_na=False)
    assert rows["sr"].tolist() == ["", ""] and rows["note"].tolist() == [NO_DETECTION] * 2
    assert (rows["detections"] == 0).all()
    assert not list((tmp_path / "out").glob("*.sr.dcm"))
    assert len(pd.read_csv(tmp_path / "out" / "detections.csv")) == 0
