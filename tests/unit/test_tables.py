"""What medflow writes for people: CSV cells a spreadsheet does not run, markdown that shows values as text."""

from __future__ import annotations

import csv
import re

import pandas as pd

from medflow.reporting import markdown_summary
from medflow.tables import read_csv, to_csv, write_csv_atomic

HOSTILE = ["=cmd|' /C calc'!A0", "@SUM(1+1)", "+1+1", "-2+3", "\tx", "\rx", "'quoted", "plain"]


def test_formula_cells_and_headers_are_neutralised_and_read_back_exactly(tmp_path):
    df = pd.DataFrame({"label_name": HOSTILE, "score": [-0.5, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
                       "p_=cmd|' /C calc'!A0": range(8), "@SUM(1+1)": range(8)})
    path = write_csv_atomic(tmp_path / "predictions.csv", df)
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    cells = [c for row in rows for c in row]
    # OWASP: no cell (header included) begins with = + - @ tab or CR, except numbers
    assert [c for c in cells if c[:1] in ("=", "+", "@", "\t", "\r")] == []
    assert [c for c in cells if c.startswith("-")] == ["-0.5"]
    assert rows[0][2:] == ["p_=cmd|' /C calc'!A0", "'@SUM(1+1)"]  # a header is inert unless it begins so
    back = read_csv(path, dtype={"label_name": str})
    assert list(back.columns) == list(df.columns)
    assert back["label_name"].tolist() == HOSTILE and back["score"].tolist() == df["score"].tolist()
    assert to_csv(pd.DataFrame({"n": [1, -2]})) == '"n"\n1\n-2\n'  # numbers stay numbers


def test_the_markdown_summary_shows_user_values_as_text():
    context = {"name": "demo", "run_id": "r1", "warnings": ["class [x](javascript:alert(1)) has 1 case"],
               "metrics": [{"metric": "AUC", "value": "0.900", "ci95": "0.800 – 0.950"}],
               "split_columns": ["split", "=cmd|' /C calc'!A0"],
               "split_counts": [{"split": "test", "=cmd|' /C calc'!A0": "<img src=x onerror=alert(1)>"}],
               "n_quarantined": 1, "quarantine": [{"reason": "modality **XX** not in ingest.modalities", "files": 1}],
               "provenance": {}}
    text = markdown_summary(context, [])
    assert not re.search(r"(?<!\\)\[x\]", text) and "\\[x\\]\\(javascript" in text
    assert not re.search(r"(?<!\\)<img", text) and "\\<img src\\=x onerror\\=alert\\(1\\)\\>" in text
    assert "| split | \\=cmd\\|' /C calc'\\!A0 |" in text
    assert not re.search(r"(?<!\\)\*\*XX", text)
