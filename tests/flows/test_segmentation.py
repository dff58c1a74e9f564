"""Segmentation end to end: SEG masks in, U-Net trained and scored, report overlays, and
``medflow predict`` writing DICOM SEGs that reference the new studies' instances."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import keras
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from flows.pipeline import pipeline
from flows.predict import predict_flow
from medflow.cli import SEG_DEMO_SPEC
from medflow.synth import synthesize
from storage.ingest import IngestOptions
from storage.store import Store
from medflow.kinds.segmentation import predict_native
from medflow.preprocessing import preprocess_series, steps_key
from tests.helpers import assert_report_reads_well, ingest_serial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("segmentation")
    synthesize(root / "cohort", patients=14, seed=4, matrix=64, masks=True, nodule_radius=(8.0, 14.0),
               positive_fraction=0.8)
    spec = yaml.safe_load(SEG_DEMO_SPEC.format(seed=4, epochs=12))
    spec["model"]["params"]["filters"] = [8, 16, 32]
    spec["train"].update({"batch_size": 8, "samples_per_volume": 16, "foreground_ratio": 0.7, "early_stopping": None})
    spec["evaluate"]["bootstrap"] = 50
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return root, pipeline(str(path))


def test_segmentation_pipeline_scores_and_reports(seg_run, tmp_path):
    root, result = seg_run
    run = Path(result["run_dir"])
    store = Store(root / "store.zarr")
    catalog = store.catalog()
    with_mask = [k for k, e in catalog.items() if "mask" in e]
    assert len(with_mask) == 11  # 80% of 14 patients have a tumour, each with a SEG
    assert all(store.read_mask(k).sum() == catalog[k]["mask"]["foreground_voxels"] > 0 for k in with_mask)
    assert not any("DICOM SEG" in r["reason"] for r in store.quarantine())

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "segmentation"
    cases = pd.read_csv(run / "predictions.csv")
    test = cases[(cases["split"] == "test") & (cases["label"] == 1)]
    assert metrics["test"]["dice"] == pytest.approx(test["dice"].mean())
    assert set(metrics["test"]) >= {"dice", "iou", "hd95", "assd", "hd95_monai", "assd_monai", "volume_error",
                                    "n_lesion", "missed", "miss_rate"}
    assert metrics["test"]["missed"] == int(test["missed"].sum())
    # the declared threshold-and-largest-component baseline, recomputed on the same test cases
    from medflow.baselines import threshold_component

    baseline = metrics["baseline"]
    assert baseline["n"] == len(test) and -700 <= baseline["threshold"] <= 100
    dice = []
    for key in test["series_key"]:
        truth, image = store.read_mask(key) > 0, store.read_image(key).astype(np.float32)
        rule = threshold_component(image, tuple(catalog[key]["spacing"]), baseline["threshold"])
        dice.append(2 * (rule & truth).sum() / (rule.sum() + truth.sum()))
    assert baseline["dice"] == pytest.approx(np.mean(dice))
    # the paired difference is the mean of the per-case differences on those cases
    by_case = test.set_index("series_key")["dice"]
    expected = np.mean([by_case[k] - d for k, d in zip(test["series_key"], dice)])
    assert baseline["difference"]["difference"] == pytest.approx(expected)
    lo, hi = baseline["difference"]["ci"]
    assert lo <= expected <= hi
    assert (run / "seg_examples.npz").exists()
    assert_report_reads_well(run / "report.html", tmp_path / "report.png")  # in a browser, at 1280 px
    html = (run / "report.html").read_text()
    for fragment in ("Segmentation overlays", "Per-case results", "HD95 (mm)", "Dice", 'id="baseline"',
                     "HD95, MONAI (mm)", "surface elements weighted by their area", "image diagonal"):
        assert fragment in html
    assert "ZQXCANARY" not in html
    model = keras.models.load_model(run / "model.keras", compile=False)
    assert model.name == "unet2d"
    # the SEG objects carry the patients' identifiers; none of them reaches the store or the run
    for folder in (root / "store.zarr", root / "runs"):
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix not in (".gz",) and path.name != "secret":
                assert b"ZQXCANARY" not in path.read_bytes(), path


def _threshold_model(level: float) -> keras.Model:
    """A 2D "segmenter" whose output is known without training: foreground where the preprocessed
    intensity is above ``level`` (a steep sigmoid of one 1x1 convolution)."""
    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(200.0),
                                  bias_initializer=keras.initializers.Constant(-200.0 * level))(inputs)
    return keras.Model(inputs, outputs, name="threshold")


def test_predict_writes_dicom_seg_that_references_the_new_studies(seg_run, tmp_path):
    """The SEG path, with the run's model swapped for one whose foreground is fixed by construction: a
    trained model that happens to find nothing in two new patients would make the comparison vacuous."""
    import shutil

    root, result = seg_run
    run = tmp_path / Path(result["run_dir"]).name
    shutil.copytree(result["run_dir"], run)
    # soft tissue inside the lung fields (the tumours): above 0.8 of the window (-1350 .. 150 HU)
    _threshold_model(0.8).save(run / "model.keras")
    new = synthesize(tmp_path / "new", patients=2, seed=11, matrix=64, positive_fraction=1.0,
                     nodule_radius=(10.0, 14.0), broken=False)
    out = predict_flow(str(run), str(new.dicom_dir), str(tmp_path / "out"))
    assert out["series"] == 2
    rows = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(rows) == 2 and rows["seg"].notna().all()

    # the same prediction, computed independently from the run's model and steps
    spec = yaml.safe_load((run / "spec.yaml").read_text())
    steps = [(next(iter(s)), next(iter(s.values()))) for s in spec["preprocess"]]
    scratch = ingest_serial(new.dicom_dir, tmp_path / "scratch.zarr", IngestOptions(modalities=("CT",), min_slices=8))
    store = scratch["store"]
    model = keras.models.load_model(run / "model.keras", compile=False)
    for row in rows.to_dict("records"):
        seg = hd.seg.segread(tmp_path / "out" / row["seg"])
        assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
        algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
        assert run.name in str(algorithm.AlgorithmParameters)
        source_files = [p for p in new.dicom_dir.rglob("*") if p.is_file()]
        sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in source_files]
        series = [d for d in sources if d.SeriesInstanceUID == row["SeriesInstanceUID"]]
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == {d.SOPInstanceUID for d in series}
        assert seg.StudyInstanceUID == series[0].StudyInstanceUID

        key = store.pseudonymizer().series_key(row["SeriesInstanceUID"])
        prep_key = steps_key(steps)
        preprocess_series(store.url, key, steps, prep_key)
        entry = store.catalog_entry(key)
        expected = predict_native(model, store, key, prep_key, steps, two_d=True, patch=None, batch_size=8) >= 0.5
        # SEG frames per source instance, in the volume's order (ascending along the slice normal)
        normal = np.asarray(entry["direction"][0])
        ordered = sorted(series, key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)))
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[d.SOPInstanceUID for d in ordered], segment_numbers=[1])[..., 0]
        np.testing.assert_array_equal(frames > 0, expected)
        assert 0 < expected.sum() < expected.size // 10  # the tumours (and little else) are foreground
        assert row["foreground_voxels"] == int(expected.sum())
