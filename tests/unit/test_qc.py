"""Geometry QC: one test per flag, each with its default (quarantine) and its other policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.uid import generate_uid

from storage.ingest import IngestOptions
from storage.qc import measure
from tests.helpers import ingest_serial, write_ct_series

AXIAL = (1, 0, 0, 0, 1, 0)
CORONAL = (1, 0, 0, 0, 0, -1)


def _ramp(z, size=8):
    """Stored values whose HU (intercept -1024) equal 10 * z."""
    return np.stack([np.full((size, size), 1024 + 10 * v, dtype=np.uint16) for v in z])


def _ingest(tmp_path, name="store", **qc):
    return ingest_serial(tmp_path / "src", tmp_path / f"{name}.zarr", IngestOptions(min_slices=2, **qc))


def _only_reason(out) -> str:
    reasons = {row["reason"] for row in out["store"].quarantine()}
    assert len(reasons) == 1, reasons
    return reasons.pop()


def test_duplicates(tmp_path):
    # two acquisitions of the same three positions under one series UID
    z = [0, 2, 4, 0, 2, 4]
    write_ct_series(tmp_path / "src", _ramp([0, 2, 4, 100, 102, 104]), positions=[(0, 0, v) for v in z])
    assert measure([(0, 0, v) for v in z], AXIAL).duplicates == 3
    assert "3 duplicate slice position(s)" in _only_reason(_ingest(tmp_path))

    kept = _ingest(tmp_path, "accept", qc_duplicates="accept")
    (entry,) = kept["store"].catalog().values()
    assert entry["shape"][0] == 3 and "dropped 3 slice(s)" in entry["qc"]["actions"][0]
    np.testing.assert_array_equal(kept["store"].read_image(entry["series_key"])[:, 0, 0], [0, 20, 40])

    split = _ingest(tmp_path, "split", qc_duplicates="split")
    catalog = split["store"].catalog()
    assert len(catalog) == 2 and len({e["parent"] for e in catalog.values()}) == 1
    firsts = sorted(split["store"].read_image(k)[0, 0, 0] for k in catalog)
    assert firsts == [0, 1000]
    # a re-run sees the split series as unchanged
    assert _ingest(tmp_path, "split", qc_duplicates="split")["results"] == []
    # another policy re-ingests it: the two parts are withdrawn, one volume replaces them
    merged = _ingest(tmp_path, "split", qc_duplicates="accept")["store"].catalog()
    assert len(merged) == 1 and "parent" not in next(iter(merged.values()))


def test_missing_slices(tmp_path):
    z = [0, 2, 4, 8, 10]  # the slice at 6 mm is missing
    write_ct_series(tmp_path / "src", _ramp(z), positions=[(0, 0, v) for v in z])
    reason = _only_reason(_ingest(tmp_path))
    assert "1 missing slice(s)" in reason and "ingest.qc.spacing: accept" in reason

    out = _ingest(tmp_path, "accept", qc_spacing="accept")
    (entry,) = out["store"].catalog().values()
    assert entry["qc"]["missing_slices"] == 1 and entry["spacing"][0] == pytest.approx(2.0)
    np.testing.assert_array_equal(out["store"].read_image(entry["series_key"])[:, 0, 0], [0, 20, 40, 60, 80, 100])


def test_non_uniform_spacing(tmp_path):
    z = [0, 2, 4.8, 6.4, 8]  # gaps 2, 2.8, 1.6, 1.6: no slice missing, spacing uneven
    write_ct_series(tmp_path / "src", _ramp(z), positions=[(0, 0, v) for v in z])
    assert "non-uniform slice spacing: deviation" in _only_reason(_ingest(tmp_path))
    out = _ingest(tmp_path, "accept", qc_spacing="accept")
    (entry,) = out["store"].catalog().values()
    volume = out["store"].read_image(entry["series_key"])[:, 0, 0]
    dz = entry["spacing"][0]
    np.testing.assert_allclose(volume, 10 * dz * np.arange(len(volume)), atol=1)  # HU = 10 * z, linear


def test_gantry_tilt(tmp_path):
    tilt = 15.0
    n, size, ps = 6, 32, 1.0
    shift = 2.0 * math.tan(math.radians(tilt))  # lateral mm per 2 mm step
    stored = np.full((n, size, size), 24, dtype=np.uint16)  # air
    positions = []
    for k in range(n):
        y0 = k * shift  # the image origin moves along y as the table moves: a tilted gantry
        positions.append((0.0, y0, 2.0 * k))
        row = int(round((10.0 - y0) / ps))  # a bright rod at y = 10 mm in patient space
        stored[k, row:row + 2, 10:12] = 1124
    write_ct_series(tmp_path / "src", stored, positions=positions, pixel_spacing=(ps, ps))
    reason = _only_reason(_ingest(tmp_path))
    assert "deviate 15.0 deg from the slice normal" in reason

    out = _ingest(tmp_path, "accept", qc_tilt="accept")
    (entry,) = out["store"].catalog().values()
    assert entry["qc"]["tilt_deg"] == pytest.approx(tilt, abs=0.1)
    volume = out["store"].read_image(entry["series_key"])
    rows = [int(np.argmax(volume[k, :, 10])) for k in range(n)]
    assert max(rows) - min(rows) <= 1  # the rod now lines up through the stack


def test_mixed_orientations_and_sizes(tmp_path):
    uid = generate_uid()
    write_ct_series(tmp_path / "src", _ramp([0, 2, 4]), positions=[(0, 0, v) for v in (0, 2, 4)], series_uid=uid,
                    names=["a0", "a1", "a2"])
    write_ct_series(tmp_path / "src", _ramp([0, 2, 4], size=10), positions=[(0, v, 0) for v in (0, 2, 4)],
                    orientation=CORONAL, series_uid=uid, names=["c0", "c1", "c2"])
    assert "mixed orientations or image sizes: 2 groups of 3, 3 slices" in _only_reason(_ingest(tmp_path))

    out = _ingest(tmp_path, "split", qc_mixed="split")
    catalog = out["store"].catalog()
    assert sorted(e["shape"][1] for e in catalog.values()) == [8, 10]
    assert all(e["qc"]["mixed_groups"] == 2 and e["parent"] for e in catalog.values())


def test_qc_summary_counts_quarantined_and_corrected_series():
    from medflow.reporting import qc_summary

    catalog = {
        "sa": {"qc": {"actions": ["resampled to uniform 2 mm spacing (1 missing slice(s))"]}},
        "sbg0": {"parent": "sb", "qc": {"actions": ["split from 2 orientation/size groups"]}},
        "sbg1": {"parent": "sb", "qc": {"actions": ["split from 2 orientation/size groups"]}},
        "sc": {"qc": {"actions": []}},
    }
    quarantine = [{"series_key": "sd", "reason": "2 duplicate slice position(s) (set ...)"},
                  {"series_key": "sd", "reason": "2 duplicate slice position(s) (set ...)"},
                  {"series_key": "se", "reason": "slice positions deviate 3.0 deg from the slice normal"}]
    rows = {r["check"]: (r["series quarantined"], r["series corrected"]) for r in qc_summary(catalog, quarantine)}
    assert rows == {"mixed orientations or sizes": (0, 1), "duplicate positions": (1, 0),
                    "missing slices / uneven spacing": (0, 1), "gantry tilt": (1, 0)}
