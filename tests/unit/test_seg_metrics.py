"""Segmentation metrics on shapes whose answers can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from medflow.metrics import mean_ci, segmentation_metrics, summarize_segmentation


def _ball(shape, spacing, centre_mm, radius_mm):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre_mm)) <= radius_mm**2


def test_identical_masks_are_perfect():
    ball = _ball((30, 40, 40), (2.0, 1.0, 1.0), (30, 20, 20), 12)
    m = segmentation_metrics(ball, ball, (2.0, 1.0, 1.0))
    assert m["dice"] == 1.0 and m["iou"] == 1.0 and m["hd95"] == 0.0 and m["assd"] == 0.0
    assert m["volume_error"] == 0.0


def test_overlapping_boxes_give_exact_dice_iou_and_volume_error():
    truth = np.zeros((10, 10, 10), bool)
    pred = np.zeros((10, 10, 10), bool)
    truth[2:6, 2:6, 2:6] = True  # 64 voxels
    pred[2:6, 2:6, 4:8] = True  # 64 voxels, 32 shared
    m = segmentation_metrics(truth, pred, (2.0, 0.5, 0.5))  # 0.5 mm³ per voxel
    assert m["dice"] == 0.5 and m["iou"] == 32 / 96
    assert m["volume_true_ml"] == m["volume_pred_ml"] == 64 * 0.5 / 1000 and m["volume_error"] == 0.0


def test_concentric_spheres_are_their_radius_difference_apart_in_mm():
    spacing = (2.0, 0.7, 0.7)  # anisotropic: distances must be in mm, not voxels
    shape = (40, 120, 120)
    truth = _ball(shape, spacing, (40, 42, 42), 20)
    pred = _ball(shape, spacing, (40, 42, 42), 24)
    m = segmentation_metrics(truth, pred, spacing)
    assert math.isclose(m["hd95"], 4.0, abs_tol=1.0)
    assert math.isclose(m["assd"], 4.0, abs_tol=0.7)
    expected = 2 * 20**3 / (20**3 + 24**3)  # Dice of nested balls: 2 r1³ / (r1³ + r2³)
    assert math.isclose(m["dice"], expected, abs_tol=0.02)
    assert math.isclose(m["volume_error"], 4 / 3 * math.pi * (24**3 - 20**3) / 1000, rel_tol=0.05)


def test_a_missed_lesion_gets_the_image_diagonal_and_a_false_positive_no_distance():
    truth = np.zeros((5, 5, 5), bool)
    truth[1:3, 1:3, 1:3] = True
    m = segmentation_metrics(truth, np.zeros_like(truth), (2, 1, 1))
    diagonal = math.sqrt(10**2 + 5**2 + 5**2)
    assert m["dice"] == 0.0 and m["missed"] == 1
    assert m["hd95"] == m["assd"] == m["hd95_monai"] == m["assd_monai"] == diagonal
    fp = segmentation_metrics(np.zeros_like(truth), truth, (1, 1, 1))
    assert fp["missed"] == 0 and math.isnan(fp["hd95"]) and math.isnan(fp["hd95_monai"])
    both_empty = segmentation_metrics(np.zeros_like(truth), np.zeros_like(truth), (1, 1, 1))
    assert both_empty["dice"] == 1.0 and both_empty["hd95"] == 0.0


def test_summary_is_over_lesion_cases_and_counts_false_positives():
    cases = pd.DataFrame([
        {"label": 1, "dice": 0.8, "hd95": 2.0, "volume_pred_ml": 1.0},
        {"label": 1, "dice": 0.9, "hd95": float("nan"), "volume_pred_ml": 1.0},
        {"label": 0, "dice": 0.0, "hd95": float("nan"), "volume_pred_ml": 0.3},
        {"label": 0, "dice": 1.0, "hd95": 0.0, "volume_pred_ml": 0.0},
    ])
    out = summarize_segmentation(cases, ["dice", "hd95"], n_boot=100)
    s = out["summary"]
    assert math.isclose(s["dice"], 0.85) and s["hd95"] == 2.0
    assert s["n_lesion"] == 2 and s["n_empty"] == 2 and s["empty_with_false_positive"] == 1
    lo, hi = out["ci"]["dice"]
    assert 0.8 <= lo <= hi <= 0.9
    assert mean_ci([1.0]) is None


def _offset_spheres():
    spacing = (2.0, 0.8, 0.8)
    shape = (24, 64, 64)
    return _ball(shape, spacing, (22, 25, 25), 10), _ball(shape, spacing, (24, 28.2, 26), 9), spacing


# MONAI 1.6.1 (torch 2.13.0 CPU) on _offset_spheres(), computed once with
#   HausdorffDistanceMetric(percentile=95)(pred[None, None], truth[None, None], spacing=[2.0, 0.8, 0.8])
#   SurfaceDistanceMetric(symmetric=True)(pred[None, None], truth[None, None], spacing=[2.0, 0.8, 0.8])
# (float32 tensors of the boolean masks); the live comparison below runs where MONAI is installed (`bench` extra).
MONAI_HD95, MONAI_ASSD = 4.4721360206604, 1.8730090856552124


def test_monai_convention_equals_monais_metrics_on_offset_spheres():
    truth, pred, spacing = _offset_spheres()
    m = segmentation_metrics(truth, pred, spacing)
    assert m["hd95_monai"] == pytest.approx(MONAI_HD95, rel=1e-6)
    assert m["assd_monai"] == pytest.approx(MONAI_ASSD, rel=1e-6)
    # the two conventions measure differently: the area-weighted surface gives other values
    assert abs(m["hd95"] - m["hd95_monai"]) > 0.1 and abs(m["assd"] - m["assd_monai"]) > 0.1


def test_monai_convention_live_where_monai_is_installed():
    monai_metrics = pytest.importorskip("monai.metrics")
    import torch

    truth, pred, spacing = _offset_spheres()
    as_tensor = lambda m: torch.as_tensor(m[None, None].astype(np.float32))  # noqa: E731
    hd = monai_metrics.HausdorffDistanceMetric(percentile=95)(as_tensor(pred), as_tensor(truth), spacing=list(spacing))
    asd = monai_metrics.SurfaceDistanceMetric(symmetric=True)(as_tensor(pred), as_tensor(truth), spacing=list(spacing))
    m = segmentation_metrics(truth, pred, spacing)
    assert m["hd95_monai"] == pytest.approx(hd.item(), rel=1e-5)
    assert m["assd_monai"] == pytest.approx(asd.item(), rel=1e-5)


def test_a_missed_lesion_makes_the_mean_hd95_worse_not_better():
    truth, pred, spacing = _offset_spheres()
    found = segmentation_metrics(truth, pred, spacing)
    missed = segmentation_metrics(truth, np.zeros_like(pred), spacing)
    names = ["dice", "hd95", "assd", "hd95_monai"]
    one = summarize_segmentation(pd.DataFrame([{"label": 1, **found}]), names, n_boot=0)["summary"]
    both = summarize_segmentation(pd.DataFrame([{"label": 1, **found}, {"label": 1, **missed}]), names,
                                  n_boot=0)["summary"]
    assert both["hd95"] > one["hd95"] and both["assd"] > one["assd"] and both["hd95_monai"] > one["hd95_monai"]
    assert both["missed"] == 1 and both["miss_rate"] == 0.5
    assert both["hd95_detected"] == pytest.approx(one["hd95"])  # the mean over detected lesions is reported too


def test_examples_show_each_test_case_once_and_warnings_say_small_or_below_baseline():
    import pandas as pd

    from medflow.kinds.segmentation import example_slices, segmentation_warnings

    def cases(n):
        return pd.DataFrame({"split": ["test"] * n, "label": [1] * n, "series_key": [f"s{i}" for i in range(n)],
                             "patient_key": [f"p{i}" for i in range(n)], "dice": np.linspace(0.2, 0.9, n)})

    slices = {f"s{i}": (i, np.zeros((4, 4)), np.zeros((4, 4), bool), np.zeros((4, 4), bool)) for i in range(5)}
    assert [m["which"] for m in example_slices(cases(1), slices)["meta"]] == ["case"]
    assert [m["which"] for m in example_slices(cases(2), slices)["meta"]] == ["best", "worst"]
    assert [m["which"] for m in example_slices(cases(5), slices)["meta"]] == ["best", "median", "worst"]
    one = cases(1).assign(dice=0.0)
    warnings = segmentation_warnings(one, {"dice": 0.7})
    assert len(warnings) == 2 and "only 1 test patient" in warnings[0] and "below its baseline" in warnings[1]
    many = pd.concat([cases(40)] * 1).assign(dice=0.9)
    assert segmentation_warnings(many, {"dice": 0.7}) == []
