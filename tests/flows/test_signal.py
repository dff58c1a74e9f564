"""The signal kind end to end: DICOM ECG waveforms → store → signal steps on Dask → cnn_gru →
multi-class metrics beside the heart-rate baseline → report with traces → predict on new ECGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from flows.pipeline import pipeline
from medflow.cli import ECG_DEMO_SPEC
from medflow.synth_ecg import synthesize_ecg

from tests.helpers import assert_report_reads_well

pytestmark = pytest.mark.slow


def test_ecg_rhythms_through_the_whole_lifecycle(tmp_path, prefect_harness):
    from flows.predict import predict_flow

    synthesize_ecg(tmp_path / "cohort", n=60, seed=5)
    spec = yaml.safe_load(ECG_DEMO_SPEC.format(seed=5, epochs=2))
    spec["evaluate"]["bootstrap"] = 20
    spec["train"]["batch_size"] = 16
    spec["preprocess"].insert(4, {"select_leads": {"leads": ["I", "II", "V1", "V6"]}})
    path = tmp_path / "ecg.yaml"
    path.write_text(yaml.safe_dump(spec))

    result = pipeline(str(path))
    assert result["task"] == "signal" and result["ingest"]["ingested"] == 60
    run = Path(result["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == ["normal", "afib", "bbb"] and metrics["n_classes"] == 3
    assert "mean heart rate" in metrics["baseline"]["name"] and 0 <= metrics["baseline"]["auc"] <= 1
    assert {r["class"] for r in metrics["test"]["per_class"]} == {"normal", "afib", "bbb"}
    training = json.loads((run / "training.json").read_text())
    assert training["params"] > 0
    with np.load(run / "explain.npz") as data:  # integrated gradients over time, errors first
        traces, heats = data["traces"], data["heats"]
    assert traces.shape[1:] == (1000, 4) and heats.shape == traces.shape[:2]  # 10 s at 100 Hz, 4 leads kept
    assert np.all((heats >= 0) & (heats <= 1)) and heats.max() == pytest.approx(1.0)
    assert_report_reads_well(run / "report.html", tmp_path / "report.png", classes=["normal", "afib", "bbb"])
    html = (run / "report.html").read_text()
    strong = metrics["strong_baselines"]
    assert [b["name"] for b in strong] == ["ecg_features"] and 0 <= strong[0]["auc"] <= 1
    assert 'id="strong-baselines"' in html
    assert "integrated gradients" in html and 'alt="Traces with attribution"' in html and "Grad-CAM" not in html

    new = synthesize_ecg(tmp_path / "new", n=3, seed=9)
    out = predict_flow(str(run), str(new.dicom_dir), str(tmp_path / "out"))
    assert out["series"] == 3
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    proba = rows[["p_normal", "p_afib", "p_bbb"]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert set(rows["prediction"]) <= {"normal", "afib", "bbb"}
    assert rows["StudyInstanceUID"].notna().all() and rows["SeriesInstanceUID"].nunique() == 3  # back to the PACS
