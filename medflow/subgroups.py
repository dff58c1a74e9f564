"""Subgroup tables: how a model does per manufacturer, slice-thickness band, sex and age band.

The attributes come from the catalog's non-identifying fields only (``acquisition`` and the
ingest's ``demographics``: sex and a ten-year age band). The split stage copies them into
``split.csv`` (``sg_*`` columns), so every kind's predictions carry them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

ATTRIBUTES = {"sg_manufacturer": "manufacturer", "sg_thickness": "slice thickness", "sg_sex": "sex",
              "sg_age": "age band"}


def thickness_band(mm) -> str:
    """A slice-thickness band.

    >>> [thickness_band(v) for v in (0.625, 2.5, 3.0, 5.0, 7.5, None)]
    ['≤ 1.5 mm', '1.5–3 mm', '1.5–3 mm', '3–5 mm', '> 5 mm', 'unknown']
    """
    try:
        mm = float(mm)
    except (TypeError, ValueError):
        return "unknown"
    if mm <= 1.5:
        return "≤ 1.5 mm"
    return "1.5–3 mm" if mm <= 3.0 else "3–5 mm" if mm <= 5.0 else "> 5 mm"


def subgroup_columns(catalog: dict[str, dict], keys) -> pd.DataFrame:
    """The ``sg_*`` columns of the series ``keys`` (missing values as ``unknown``)."""
    rows = []
    for key in keys:
        entry = catalog.get(key, {})
        acq, demo = entry.get("acquisition") or {}, entry.get("demographics") or {}
        rows.append({"sg_manufacturer": str(acq.get("Manufacturer") or "unknown"),
                     "sg_thickness": thickness_band(acq.get("SliceThickness")),
                     "sg_sex": demo.get("sex", "unknown"), "sg_age": demo.get("age_band", "unknown")})
    return pd.DataFrame(rows, columns=list(ATTRIBUTES))


def subgroup_rows(test: pd.DataFrame, score_rows) -> list[dict]:
    """One row per (attribute, value) of the test cases: counts and the kind's metrics.

    ``score_rows(part)`` gives the metrics of a subset of ``test`` as a dict of formatted values.
    Attributes with one value only (nothing to compare) are left out.
    """
    out = []
    for column, label in ATTRIBUTES.items():
        if column not in test or test[column].nunique() < 2:
            continue
        for value, part in sorted(test.groupby(column), key=lambda kv: str(kv[0])):
            out.append({"attribute": label, "value": str(value), "series": int(len(part)),
                        "patients": int(part["patient_key"].nunique()), **score_rows(part)})
    return out


def binary_scores(threshold: float):
    """``score_rows`` for a binary classifier: positives, AUC (both classes present), sensitivity, specificity."""
    from medflow.metrics import binary_summary

    def rows(part: pd.DataFrame) -> dict:
        y, s = part["label"].to_numpy(int), part["score"].to_numpy(float)
        m = binary_summary(y, s, threshold)
        fmt = lambda v: "–" if v is None or v != v else f"{v:.3f}"  # noqa: E731
        return {"positives": int(y.sum()), "AUC": fmt(m["auc"]) if 0 < y.sum() < len(y) else "–",
                "sensitivity": fmt(m["recall"]) if y.sum() else "–",
                "specificity": fmt(m["specificity"]) if (y == 0).any() else "–"}
    return rows


def multiclass_scores(part: pd.DataFrame) -> dict:
    """``score_rows`` for K classes: accuracy of the most probable class."""
    return {"accuracy": f"{float(np.mean(part['prediction'] == part['label'])):.3f}"}
