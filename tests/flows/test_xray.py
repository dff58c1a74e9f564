"""2D classification end to end: a 3-class DICOM chest X-ray cohort, and the classic Keras program's spec
on PNG class folders, under Prefect's test harness."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.pipeline import pipeline
from medflow.cli import XRAY_DEMO_SPEC
from medflow.synth_xray import synthesize_xray
from medflow.splitting import _is_number
from medflow.tables import read_csv

from tests.helpers import assert_report_reads_well

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def xray_run(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("xray")
    cohort = synthesize_xray(root / "cohort", images=36, seed=5)
    spec = yaml.safe_load(XRAY_DEMO_SPEC.format(seed=5, epochs=2))
    spec["preprocess"][0] = {"resize2d": {"shape": [48, 48], "aspect": "pad"}}
    spec["model"]["params"] = {"filters": [4, 8]}
    spec["evaluate"]["bootstrap"] = 20
    spec["train"]["batch_size"] = 8
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return cohort, pipeline(str(path))


def test_three_class_pipeline_reports_per_class_metrics_and_the_baseline(xray_run, tmp_path):
    cohort, result = xray_run
    run = Path(result["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["normal", "pneumonia", "effusion"] and metrics["n_classes"] == 3
    test = metrics["test"]
    assert [r["class"] for r in test["per_class"]] == ["normal", "pneumonia", "effusion"]
    assert np.array(test["confusion_matrix"]).shape == (3, 3)
    assert np.array(test["confusion_matrix"]).sum() == test["n"]
    assert 0 <= metrics["baseline"]["auc"] <= 1 and "four intensity features" in metrics["baseline"]["name"]
    # the network whose eager Grad-CAM crashed on AVX-512 CPUs (issue 24): explained, in a child process
    assert metrics["explanation"]["status"] == "ok" and metrics["explanation"]["method"] == "Grad-CAM"
    with np.load(run / "explain.npz") as explained:
        assert explained["cams"].shape == explained["images"].shape == (len(metrics["explanation"]["cases"]), 48, 48)

    preds = pd.read_csv(run / "predictions.csv")
    proba = preds[["p_normal", "p_pneumonia", "p_effusion"]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-4)
    assert (preds["prediction"] == proba.argmax(axis=1)).all()
    assert set(preds["label_name"]) == {"normal", "pneumonia", "effusion"}
    labels = pd.read_csv(cohort.labels_csv)
    assert len(preds) == len(labels)  # every DX and CR image, MONOCHROME1 or 2, reached the store

    summary = json.loads((run / "summary.json").read_text())
    assert [r["class"] for r in summary["tables"]["per-class"]["rows"]] == ["normal", "pneumonia", "effusion"]
    assert_report_reads_well(run / "report.html", tmp_path / "report.png",
                             classes=["normal", "pneumonia", "effusion"])
    html = (run / "report.html").read_text()
    strong = {b["name"]: b for b in metrics["strong_baselines"]}  # radiomics and HOG, as the demo declares
    assert set(strong) == {"radiomics", "hog"} and strong["hog"]["features"] == 1764
    assert all(b["vs_model"]["method"].startswith("paired bootstrap") for b in strong.values())
    assert 'id="strong-baselines"' in html
    assert 'id="per-class"' in html and 'id="baseline"' in html and "ROC AUC, macro average" in html
    for canary in cohort.canaries:
        assert canary not in html
    store = Path(yaml.safe_load((run / "spec.yaml").read_text())["data"]["store"])
    for path in store.rglob("*.json"):
        assert "ZQXCANARY" not in path.read_text(), path


def test_predict_writes_per_class_scores(xray_run, tmp_path):
    from flows.predict import predict_flow

    _, result = xray_run
    new = synthesize_xray(tmp_path / "new", images=4, seed=99)
    out = predict_flow(result["run_dir"], str(new.images_dir), str(tmp_path / "out"))
    assert out["series"] == 4
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    proba = rows[["p_normal", "p_pneumonia", "p_effusion"]].to_numpy()
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-4)
    assert list(rows["prediction"]) == [["normal", "pneumonia", "effusion"][i] for i in proba.argmax(axis=1)]
    assert set(rows["StudyInstanceUID"]) <= set(pd.read_csv(new.labels_csv)["StudyInstanceUID"])


FORMULA = "=cmd|' -C calc'!A0"


def test_the_classic_program_as_a_spec_on_png_class_folders(tmp_path, prefect_harness, monkeypatch):
    """Also the containment of a native crash (issue 24): the Grad-CAM child is killed by SIGSEGV (the
    test hook), and the run still completes, its metrics and report naming the failed explanation."""
    from PIL import Image

    from medflow.isolation import FAULT_ENV

    from medflow.spec import load_spec

    cohort = synthesize_xray(tmp_path / "xray-png", images=30, seed=3, fmt="png", classes=["normal", "pneumonia"])
    images = cohort.images_dir
    # issue 31: a class name a spreadsheet would run as a formula, a FIFO and a file name that is not UTF-8
    os.rename(images / "normal", images / FORMULA)
    os.mkfifo(images / "pneumonia" / "pipe.png")
    first = sorted((images / "pneumonia").glob("*.png"))[0]
    os.rename(first, os.fsencode(images / "pneumonia") + b"/bad\xffname.png")
    (images / "pneumonia" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (images / FORMULA / "Thumbs.db").write_bytes(b"\0" * 10)
    (images / "effusion").mkdir()  # an empty class folder
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(images / "stray.png")
    spec = yaml.safe_load((ROOT / "examples" / "xray_seed.yaml").read_text())
    del spec["data"]["layout"]  # one folder per class here (the layout of train/val/test: test_image_folders.py)
    spec["data"]["split"] = {"val": 0.15, "test": 0.2, "seed": 0}
    spec["train"]["epochs"] = 1
    spec["evaluate"]["bootstrap"] = 20
    path = tmp_path / "xray_seed.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert load_spec(path).model.arch == "seed_cnn"

    monkeypatch.setenv(FAULT_ENV, "models.explain:grad_cam_job=SIGSEGV")
    result = pipeline(str(path))
    run = Path(result["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == [FORMULA, "pneumonia"] and metrics["threshold"] == 0.5
    assert 0 <= metrics["test"]["accuracy"] <= 1
    training = json.loads((run / "training.json").read_text())
    assert training["params"] == 19_033_601  # seed_cnn at 150x150x1
    assert result["ingest"]["ingested"] == 30
    paths = read_csv(run.parent.parent / "identifying" / "quarantine-paths.csv")  # outside store and runs
    reasons = dict(zip(paths["path"], paths["reason"]))
    assert reasons["pneumonia/broken.png"].startswith("unreadable image")
    assert reasons[f"{FORMULA}/Thumbs.db"].startswith("not an image file")
    assert reasons["pneumonia/pipe.png"] == "not a regular file (FIFO)"  # listed, never opened
    assert "pneumonia/bad\\xffname.png" not in reasons  # keyed by its bytes and ingested
    # the class name reaches the CSVs neutralised for spreadsheets, and medflow reads back what it wrote
    for name in ("split.csv", "predictions.csv"):
        with open(run / name, newline="") as fh:
            cells = [cell for row in csv.reader(fh) for cell in row]
        assert not [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r") or (c[:1] == "-" and not _is_number(c))]
        assert f"'{FORMULA}" in cells
    assert set(read_csv(run / "split.csv", dtype={"label_name": str})["label_name"]) == {FORMULA, "pneumonia"}
    assert reasons["effusion/"] == "empty class folder (no image)"
    assert reasons["stray.png"].startswith("not in a class folder")

    assert json.loads((run / "run.json").read_text())["state"] == "completed"
    explanation = metrics["explanation"]
    assert explanation["status"] == "failed" and explanation["signal"] == "SIGSEGV"
    assert explanation["where"] == "_child (isolation.py)" and len(explanation["cases"]) >= 2
    with np.load(run / "explain.npz") as kept:  # the cases, without heat maps
        assert "cams" not in kept and len(kept["images"]) == len(explanation["cases"])
    html = (run / "report.html").read_text()
    assert 'id="explanation-failed"' in html and "Grad-CAM failed" in html and "SIGSEGV" in html

    # predict on a new folder of PNGs (any layout): one row per image, named by its file
    from flows.predict import predict_flow

    new = synthesize_xray(tmp_path / "new", images=4, seed=98, fmt="png", classes=["normal", "pneumonia"])
    (new.images_dir / "notes.txt").write_text("not an image")
    out = predict_flow(str(run), str(new.images_dir), str(tmp_path / "out"))
    rows = read_csv(tmp_path / "out" / "predictions.csv", dtype={"prediction": str})
    assert out["series"] == 4 and out["not_used"] == 1 and len(rows) == 4
    assert sorted(rows["file"]) == sorted(str(p.relative_to(new.images_dir)) for p in new.images_dir.rglob("*.png"))
    assert set(rows["prediction"]) <= {FORMULA, "pneumonia"} and rows["score"].between(0, 1).all()
    # nothing to predict: exit 1 with the reason, and a CSV with its header
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("not an image")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_"))}
    env["MEDFLOW_CACHE"] = str(tmp_path / "cache")  # as a user runs it: medflow's own files go to its cache
    cli = subprocess.run([str(Path(sys.executable).parent / "medflow"), "predict", "--model", str(run), "--input",
                          str(tmp_path / "nothing"), "--output", str(tmp_path / "out0")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert cli.returncode == 1, cli.stdout[-2000:] + cli.stderr[-2000:]
    assert "Nothing was predicted" in cli.stderr and "not an image file" in cli.stderr
    assert (tmp_path / "out0" / "predictions.csv").read_text().startswith('"file"')
    beside_model = run.parent.parent
    assert not (beside_model / ".prefect").exists() and not (beside_model / ".dask").exists()
    assert (tmp_path / "cache" / "predict" / ".prefect").is_dir()
    assert html.count("<tr><td>", html.index('id="explained-cases"')) >= len(explanation["cases"])
