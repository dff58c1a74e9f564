"""FROC and CPM against a hand computation; the detection geometry against the real preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from medflow.intervals import wilson_mean

from medflow.froc import FP_RATES, baseline_candidates, cpm, froc_curve, froc_summary, match, sensitivity_at
from medflow.kinds.detection import to_model_grid, to_source_grid
from medflow.preprocessing import apply_steps, shape_trace


def _det(x, score):
    return {"xyz": [float(x), 0.0, 0.0], "score": score}


def _lesion(x, diameter=10.0):
    return {"xyz": [float(x), 0.0, 0.0], "diameter_mm": diameter}


# Four scans, four lesions (radius 5 mm). Hits: L1 by 0.95, L2 by 0.60 (and again by 0.30: not a false
# positive), L3 by 0.20; L4 never (the nearest detection is 6 mm away). False positives: 0.90, 0.70, 0.50,
# 0.40, 0.15, 0.10, 0.05 (seven).
SCANS = [
    {"detections": [_det(0, 0.95), _det(100, 0.90), _det(200, 0.40)], "lesions": [_lesion(2)]},
    {"detections": [_det(50, 0.70), _det(0, 0.60), _det(1, 0.30)], "lesions": [_lesion(-3)]},
    {"detections": [_det(10, 0.50), _det(300, 0.10)], "lesions": []},
    {"detections": [_det(0, 0.20), _det(400, 0.05), _det(26, 0.15)], "lesions": [_lesion(4), _lesion(20)]},
]


def test_froc_equals_the_hand_computation():
    # by hand, with 4 scans (sensitivity at threshold t; false positives at or above t, / 4):
    #   0.95: 1/4 lesions, 0 FP | 0.90: 1/4, 1 | 0.70: 1/4, 2 | 0.60: 2/4, 2 | 0.50: 2/4, 3 | 0.40: 2/4, 4
    #   0.20: 3/4, 4 | 0.15: 3/4, 5 (0.15 misses L4 by 1 mm) | 0.10: 3/4, 6 | 0.05: 3/4, 7
    expected = {0.125: 0.25, 0.25: 0.25, 0.5: 0.5, 1.0: 0.75, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
    sens = sensitivity_at(froc_curve(SCANS))
    assert sens == pytest.approx(expected)
    assert cpm(sens) == pytest.approx((0.25 + 0.25 + 0.5 + 0.75 * 4) / 7)
    assert tuple(sens) == FP_RATES


def test_match_takes_the_radius_as_the_hit_rule():
    hits, scores = match([_det(4.9, 0.5), _det(5.1, 0.4)], [_lesion(0)])
    assert hits.tolist() == [0, -1] and scores.tolist() == [0.5, 0.4]


def test_froc_summary_bootstraps_by_patient():
    out = froc_summary(SCANS, n_boot=200, seed=1, patients=["a", "a", "b", "c"])
    assert out["cpm"] == pytest.approx(cpm(sensitivity_at(froc_curve(SCANS))))
    lo, hi = out["cpm_ci"]
    assert lo <= out["cpm"] <= hi and lo < hi
    assert out["n_lesions"] == 4 and out["n_scans"] == 4
    one = froc_summary(SCANS, n_boot=200, patients=["a"] * 4)  # one patient: no bootstrap, Wilson over the lesions
    assert one["cpm_ci"] == pytest.approx(list(wilson_mean(one["cpm"], 4))) and one["cpm_ci"][0] < one["cpm_ci"][1]
    assert one["ci_method"].startswith("Wilson")
    # every rate's interval has width (a bootstrap's, or Wilson's where the resamples were alike)
    for rate, (lo, hi) in out["sensitivity_ci"].items():
        assert lo <= out["sensitivity"][rate] <= hi and lo < hi, rate
    assert set(one["ci_methods"]) == {"cpm", *map(str, FP_RATES)}


def test_a_sensitivity_the_same_in_every_resample_gets_wilsons_interval_not_a_point():
    # every lesion missed at every rate (a detector that found nothing): each resample's sensitivity is 0
    missed = [{"detections": [_det(400, 0.9)], "lesions": [_lesion(0)]} for _ in range(5)]
    out = froc_summary(missed, n_boot=100, patients=list("abcde"))
    assert out["sensitivity"]["1.0"] == 0.0
    for rate in map(str, FP_RATES):
        assert out["sensitivity_ci"][rate] == pytest.approx(list(wilson_mean(0.0, 5)))
        assert out["ci_methods"][rate].startswith("Wilson")
    assert out["cpm_ci"][1] > 0


def test_no_lesion_gives_no_sensitivity():
    sens = sensitivity_at(froc_curve([{"detections": [_det(0, 0.5)], "lesions": []}]))
    assert all(np.isnan(v) for v in sens.values())


@pytest.mark.parametrize("steps", [
    [("resample", {"spacing": [4.0, 4.0, 4.0]}), ("crop_pad", {"shape": [12, 20, 24], "value": 0.0})],
    [("resize", {"shape": [10, 30, 18]}), ("crop_pad", {"shape": [12, 24, 24], "value": 0.0})],
])
def test_marks_follow_the_preprocessing_geometry(steps):
    """A bright blob at a known voxel of the source grid ends up where ``to_model_grid`` puts it."""
    shape, spacing = (20, 40, 36), (2.5, 1.5, 1.5)
    point = np.array([9.0, 23.0, 12.0])
    grid = np.indices(shape).astype(float)
    image = np.exp(-sum(((g - c) * s) ** 2 for g, c, s in zip(grid, point, spacing)) / (2 * 5.0**2))
    out, _ = apply_steps(image.astype(np.float32), spacing, steps)
    trace = shape_trace(shape, spacing, steps)
    mapped = to_model_grid(point, trace)
    peak = np.unravel_index(np.argmax(out), out.shape)
    w = out[tuple(slice(p - 2, p + 3) for p in peak)]
    idx = np.indices(w.shape) + (np.array(peak) - 2)[:, None, None, None]
    centroid = np.array([(i * w).sum() / w.sum() for i in idx])
    assert np.allclose(centroid, mapped, atol=0.25)
    assert np.allclose(to_source_grid(mapped, trace), point)


def test_baseline_prefers_nodule_sized_blobs_as_its_smoothing_grows():
    """In a body with a lung: a 5 mm-radius soft-tissue nodule and a 1.5 mm calcified speck (800 HU). Little
    smoothing ranks the speck first; nodule-sized smoothing ranks the nodule first. Outside the lungs (the
    body wall, brighter than both after smoothing) nothing is a candidate."""
    z, y, x = np.indices((40, 64, 64)).astype(float)
    image = np.full((40, 64, 64), -1000.0)
    image[(y - 32) ** 2 + (x - 32) ** 2 <= 30**2] = 40.0  # body
    image[((y - 32) ** 2 + (x - 32) ** 2 <= 24**2) & (z > 3) & (z < 36)] = -850.0  # lung
    image[(z - 20) ** 2 + (y - 32) ** 2 + (x - 22) ** 2 <= 5**2] = 40.0  # nodule
    image[(z - 20) ** 2 + (y - 32) ** 2 + (x - 42) ** 2 <= 1.5**2] = 800.0  # calcified speck
    found = baseline_candidates(image, (1.0, 1.0, 1.0), sigmas_mm=(0.7, 4.0))
    assert found[0.7][0]["zyx"] == [20.0, 32.0, 42.0]
    assert found[4.0][0]["zyx"] == [20.0, 32.0, 22.0]
    assert found[4.0][0]["score"] > found[4.0][1]["score"]
    for candidates in found.values():  # all inside the lung (radius 24 about the axis, slices 4-35)
        assert all(np.hypot(c["zyx"][1] - 32, c["zyx"][2] - 32) <= 24 and 3 < c["zyx"][0] < 36 for c in candidates)
