"""Two runs compared: DeLong's paired test, and the runs listing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medflow.compare import compare_runs, delong_test, list_runs


def _scores(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    good = y * 1.2 + rng.normal(0, 1, n)
    weak = y * 0.4 + rng.normal(0, 1, n)
    return y, good, weak


def test_delong_aucs_equal_scikit_learns_and_its_se_matches_a_paired_bootstrap():
    y, a, b = _scores()
    r = delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(roc_auc_score(y, a)) and r["auc_b"] == pytest.approx(roc_auc_score(y, b))
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(2000):
        i = rng.integers(0, len(y), len(y))
        if len(np.unique(y[i])) == 2:
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    assert r["se"] == pytest.approx(np.std(diffs), rel=0.15)
    assert r["p_value"] < 0.01 and r["ci"][0] > 0


def test_delong_p_values_are_uniform_under_the_null():
    """Two equally good models (independent noise): about 5% of tests reject at 0.05."""
    rng = np.random.default_rng(2)
    p = []
    for _ in range(300):
        y = rng.integers(0, 2, 60)
        p.append(delong_test(y, y + rng.normal(0, 1, 60), y + rng.normal(0, 1, 60))["p_value"])
    assert 0.02 < np.mean(np.array(p) < 0.05) < 0.10


def _run(folder, name, scores, y, split, auc=None):
    run = folder / name
    run.mkdir()
    pd.DataFrame({"series_key": [f"s{i}" for i in range(len(y))], "label": y, "score": scores,
                  "split": split}).to_csv(run / "predictions.csv", index=False)
    (run / "run.json").write_text(json.dumps({"state": "completed", "finished_at": "2026-12-01 10:00:00"}))
    (run / "spec.yaml").write_text("name: demo-nodules\nmodel: {task: classification}\n")
    (run / "metrics.json").write_text(json.dumps({"task": "classification", "test": {"auc": auc, "n": 5},
                                                  "baseline": {"auc": 0.6}}))
    return run


def test_compare_pairs_the_shared_test_cases_and_listing_shows_each_run(tmp_path):
    y, a, b = _scores(120, seed=3)
    split = np.where(np.arange(120) < 80, "train", "test")
    ra = _run(tmp_path, "20261201-100000-aaaaaa-0001", a, y, split, auc=0.8)
    rb = _run(tmp_path, "20261201-110000-bbbbbb-0002", b, y, split, auc=0.6)
    r = compare_runs(ra, rb)
    test = split == "test"
    assert r["shared"] == 40 and r["auc_a"] == pytest.approx(roc_auc_score(y[test], a[test]))
    assert r["difference"] == pytest.approx(r["auc_a"] - r["auc_b"])
    listed = list_runs(tmp_path)
    assert list(listed["run"]) == [rb.name, ra.name]  # newest first
    assert list(listed["value"]) == [0.6, 0.8] and set(listed["spec"]) == {"demo-nodules"}


def test_runs_with_no_shared_test_case_are_refused(tmp_path):
    y, a, b = _scores(20, seed=4)
    ra = _run(tmp_path, "a", a, y, ["test"] * 10 + ["train"] * 10)
    rb = _run(tmp_path, "b", b, y, ["train"] * 10 + ["test"] * 10)
    with pytest.raises(ValueError, match="share no test case"):
        compare_runs(ra, rb)


def test_the_commands_print_the_runs_and_the_test(tmp_path):
    from typer.testing import CliRunner

    from medflow.cli import app

    y, a, b = _scores(120, seed=3)
    split = np.where(np.arange(120) < 80, "train", "test")
    ra, rb = _run(tmp_path, "r1", a, y, split, auc=0.8), _run(tmp_path, "r2", b, y, split, auc=0.6)
    out = CliRunner().invoke(app, ["compare", str(ra), str(rb)])
    assert out.exit_code == 0, out.output
    r = compare_runs(ra, rb)
    assert f"AUC {r['auc_a']:.3f}" in out.output and f"AUC {r['auc_b']:.3f}" in out.output
    assert f"difference A − B: {r['difference']:+.3f}" in out.output and f"p = {r['p_value']:.3g}" in out.output
    listed = CliRunner().invoke(app, ["runs", str(tmp_path)])
    assert listed.exit_code == 0 and "r1" in listed.output and "auc 0.800 (baseline 0.600)" in listed.output


def _frame_run(folder, name, frame):
    run = folder / name
    run.mkdir()
    frame.to_csv(run / "predictions.csv", index=False)
    return run


def test_two_multiclass_runs_are_compared_by_macro_auc_with_a_patient_bootstrap(tmp_path):
    from scipy.special import softmax

    rng = np.random.default_rng(5)
    n = 150
    y = rng.integers(0, 3, n)
    base = {"series_key": [f"s{i}" for i in range(n)], "patient_key": [f"p{i // 2}" for i in range(n)],
            "label": y, "split": "test"}
    good = softmax(np.eye(3)[y] * 2.5 + rng.normal(0, 1, (n, 3)), axis=1)
    weak = softmax(np.eye(3)[y] * 0.3 + rng.normal(0, 1, (n, 3)), axis=1)
    frames = [pd.DataFrame({**base, **{f"p_{c}": p[:, i] for i, c in enumerate(["normal", "=cmd", "effusion"])}})
              for p in (good, weak)]
    ra, rb = _frame_run(tmp_path, "a", frames[0]), _frame_run(tmp_path, "b", frames[1])
    r = compare_runs(ra, rb, n_boot=500)
    assert r["metric"] == "macro AUC" and r["shared"] == n
    assert r["value_a"] == pytest.approx(roc_auc_score(y, good, multi_class="ovr", average="macro"))
    assert r["ci"][0] > 0 and r["p_value"] < 0.01  # the good model is better, and the test says so
    same = compare_runs(ra, _frame_run(tmp_path, "c", frames[0]), n_boot=200)
    assert same["difference"] == 0 and same["ci"] == [0, 0] and same["p_value"] == 1.0


def test_two_segmentation_runs_are_compared_by_dice_on_the_cases_with_a_lesion(tmp_path):
    from scipy import stats

    rng = np.random.default_rng(6)
    n = 40
    label = np.r_[np.ones(30, int), np.zeros(10, int)]
    base = {"series_key": [f"s{i}" for i in range(n)], "patient_key": [f"p{i}" for i in range(n)], "label": label,
            "split": "test"}
    dice_a = np.clip(rng.normal(0.8, 0.05, n), 0, 1)
    dice_b = np.clip(dice_a - rng.normal(0.05, 0.03, n), 0, 1)
    ra = _frame_run(tmp_path, "a", pd.DataFrame({**base, "dice": dice_a}))
    rb = _frame_run(tmp_path, "b", pd.DataFrame({**base, "dice": dice_b}))
    r = compare_runs(ra, rb, n_boot=500)
    lesion = label == 1
    assert r["metric"] == "Dice" and r["value_a"] == pytest.approx(dice_a[lesion].mean())
    assert r["difference"] == pytest.approx((dice_a - dice_b)[lesion].mean())
    assert r["p_value"] == pytest.approx(stats.wilcoxon(dice_a[lesion], dice_b[lesion]).pvalue)
    assert r["ci"][0] > 0
    with pytest.raises(ValueError, match="not of one comparable kind"):
        compare_runs(ra, _run(tmp_path, "bin", rng.normal(size=n), label, ["test"] * n))


def _scans(seed, n=40, skill=1.0):
    """3D scans: a lesion in most, detections at it scored by ``skill``, false positives elsewhere."""
    rng = np.random.default_rng(seed)
    scans = []
    for i in range(n):
        lesions = [{"xyz": [10.0 * i, 0.0, 0.0], "diameter_mm": 8.0}] if i % 4 else []
        dets = [{"xyz": [10.0 * i + 200, 50.0, 0.0], "score": float(rng.uniform(0, 1))} for _ in range(2)]
        if lesions and rng.uniform() < 0.8:
            dets.append({"xyz": lesions[0]["xyz"], "score": float(np.clip(0.5 + skill * rng.normal(0.3, 0.2), 0, 1))})
        scans.append({"series_key": f"s{i}", "patient": f"p{i // 2}", "detections": dets, "lesions": lesions})
    return scans


def _outcome_run(folder, name, outcomes):
    run = folder / name
    run.mkdir()
    (run / "test_outcomes.json").write_text(json.dumps(outcomes))
    return run


def test_two_detection_runs_are_compared_by_cpm_with_a_patient_bootstrap(tmp_path):
    from medflow.froc import froc_summary
    from medflow.kinds.detection import froc_outcomes

    good, weak = _scans(1, skill=1.0), _scans(1, skill=0.0)
    for s in weak:  # the same lesions, the hits scored like the false positives
        s["detections"] = [{**d, "score": d["score"] * 0.3} for d in s["detections"]]
    ra = _outcome_run(tmp_path, "a", froc_outcomes(good))
    rb = _outcome_run(tmp_path, "b", froc_outcomes(weak))
    r = compare_runs(ra, rb, n_boot=300)
    assert r["metric"] == "CPM" and r["shared"] == 40
    assert r["value_a"] == pytest.approx(froc_summary(good, n_boot=0)["cpm"])  # the run's own CPM, recomputed
    assert r["value_b"] == pytest.approx(froc_summary(weak, n_boot=0)["cpm"])
    assert r["difference"] > 0.1 and r["ci"][0] > 0 and r["p_value"] < 0.05, r
    same = compare_runs(ra, _outcome_run(tmp_path, "c", froc_outcomes(good)), n_boot=100)
    assert same["difference"] == 0 and same["ci"] == [0, 0] and same["p_value"] == 1.0
    other = froc_outcomes(good)
    other["cases"][1]["lesion_best"] = [None, None]
    with pytest.raises(ValueError, match="different lesions"):
        compare_runs(ra, _outcome_run(tmp_path, "d", other))


def test_two_box_runs_are_compared_by_ap50_and_ap50_95(tmp_path):
    from medflow.boxes import coco_ap

    rng = np.random.default_rng(0)
    images_a, images_b = [], []
    for i in range(30):
        truth = [[20.0, 20.0, 40.0, 44.0]]
        hit = {"box": [21.0, 20.0, 41.0, 44.0], "score": 0.9}
        far = {"box": [60.0, 60.0, 80.0, 80.0], "score": float(rng.uniform(0.1, 0.5))}
        images_a.append({"series_key": f"s{i}", "patient": f"p{i}", "truth": truth, "detections": [hit, far]})
        loose = {"box": [26.0, 25.0, 46.0, 49.0], "score": 0.9}  # IoU about 0.5 or less: often a miss at 0.5
        images_b.append({"series_key": f"s{i}", "patient": f"p{i}", "truth": truth,
                         "detections": [loose if i % 2 else hit, far]})
    ra = _outcome_run(tmp_path, "a", {"kind": "boxes", "cases": images_a})
    rb = _outcome_run(tmp_path, "b", {"kind": "boxes", "cases": images_b})
    r = compare_runs(ra, rb, n_boot=200)
    assert r["metric"] == "AP50"
    assert r["value_a"] == pytest.approx(coco_ap(images_a)["ap50"]) and r["value_b"] == pytest.approx(coco_ap(images_b)["ap50"])
    assert r["difference"] > 0 and r["ci"][0] > 0
    assert r["also"]["ap50_95"]["difference"] == pytest.approx(coco_ap(images_a)["ap50_95"] - coco_ap(images_b)["ap50_95"])
